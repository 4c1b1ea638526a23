"""The asset model and its storage: the catalogue (manifests, versions, renditions), blob stores
(local directory, S3), content hashing, content sniffing and the question-bank schema. Shared
by the origin and the workers; imports only ``common`` and ``cdn_config``."""
