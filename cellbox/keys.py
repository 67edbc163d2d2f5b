"""API keys: making new ones, and the one format every client accepts.

A cellbox key is ``e2b_`` followed by 40 lowercase hex digits (160 random bits), the shape of
an E2B key, so the E2B SDKs (any release, including those that check the format client-side)
take a cellbox key as ``E2B_API_KEY`` unchanged, and cellbox's own SDK takes the same key.
The server accepts any configured key whatever its shape (``Settings.api_keys``); this module
only makes keys and tells whether one has the portable shape.
"""

from __future__ import annotations

import re
import secrets

__all__ = ["KEY_PREFIX", "is_portable_key", "new_key"]

KEY_PREFIX = "e2b_"
_KEY_HEX_CHARS = 40
_PORTABLE = re.compile(r"e2b_[0-9a-f]+")


def new_key() -> str:
    """A fresh random key, ``e2b_`` + 40 hex digits (``cellbox keys new`` prints one)."""
    return KEY_PREFIX + secrets.token_hex(_KEY_HEX_CHARS // 2)


def is_portable_key(key: str) -> bool:
    """Whether ``key`` has the shape both E2B SDKs accept: ``e2b_`` followed by hex digits."""
    return _PORTABLE.fullmatch(key) is not None
