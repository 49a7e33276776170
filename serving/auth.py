"""Bearer-token checks, the same on every front end (the gRPC interceptor and the HTTP middleware call it)."""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from typing import Any


def token_matches(metadata: Iterable[tuple[str, Any]] | None, token: str) -> bool:
    """Whether the call's `authorization` metadata (or header) is `Bearer <token>` (compared in constant time)."""
    for key, value in metadata or ():
        if key.lower() != "authorization":
            continue
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
        scheme, _, given = text.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode()):
            return True
    return False
