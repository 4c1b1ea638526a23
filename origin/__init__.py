"""Kshipra origin: upload API, asset catalogue and the content read API for edges."""
