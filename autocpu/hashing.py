"""Short, stable hashes of JSON-able data: plan keys, fingerprints, version sets."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def stable_hash(data: Any, length: int = 16) -> str:
    """Hex digest of ``data`` as sorted JSON: equal data gives equal hashes in every process."""
    raw = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(raw.encode()).hexdigest()[:length]
