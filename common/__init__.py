"""What every Kshipra service shares: HTTP semantics, one error shape, the bearer check, the
wire contract between origin, workers and edges, and serving aiohttp applications. Imports no
other Kshipra package but ``cdn_config``."""
