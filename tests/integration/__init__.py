"""Real servers and processes on loopback: Valkey, moto, ffmpeg, the origin, edges, the CLI."""
