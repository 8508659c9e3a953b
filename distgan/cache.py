"""Where distgan caches what it computes once (reference statistics, the digits classifier)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def cache_dir(kind: str) -> Path:
    """$DISTGAN_CACHE/<kind>, else $XDG_CACHE_HOME/distgan/<kind>, else ~/.cache/distgan/<kind>.

    Not created here: a writer creates it when it writes, and warns instead of failing when it cannot (a cache
    is an optimisation, and a read-only home must not stop a run).
    """
    root = (
        os.environ.get("DISTGAN_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "distgan"
    )
    return Path(root) / kind


def content_key(*parts: bytes | str) -> str:
    """A short hex key for the content that defines a cached result (data bytes, settings, code version)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()[:16]
