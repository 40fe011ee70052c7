"""The one digest behind every cache key, record and derived name in a run directory."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def digest(payload: Any, length: int = 16) -> str:
    """Hex SHA-256 of ``payload`` (bytes as they are, anything else as sorted JSON), cut to
    ``length`` characters."""
    if not isinstance(payload, bytes):
        payload = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(payload).hexdigest()[:length]
