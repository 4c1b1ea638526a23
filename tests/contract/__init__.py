"""One suite over every implementation of a Protocol (blob stores, cache tiers), and the disk
tier's own guarantees."""
