"""The one bearer-token check of every Kshipra service (RFC 6750 §2.1).

The scheme is case-insensitive (RFC 9110 §11.1), the comparison constant-time. The upload API,
the purge API, the bucket-event webhook, an edge's purge endpoint and its ``/metrics`` all call
:func:`bearer_check`.
"""

from __future__ import annotations

import hmac
from typing import Literal

BearerCheck = Literal["ok", "missing", "wrong"]


def bearer_check(authorization: str | None, token: str | None) -> BearerCheck:
    """An ``Authorization: Bearer …`` field against *token*: ``missing`` when there is no
    bearer token in the field, ``wrong`` when it is not *token* (or no token is configured),
    else ``ok``."""
    scheme, _, offered = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not offered.strip():
        return "missing"
    if token is None:
        return "wrong"
    return "ok" if hmac.compare_digest(offered.strip().encode(), token.encode()) else "wrong"
