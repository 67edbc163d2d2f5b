"""cellbox keys have the E2B key shape."""

from __future__ import annotations

from cellbox.keys import is_portable_key, new_key


def test_new_keys_are_e2b_shaped_and_distinct() -> None:
    keys = {new_key() for _ in range(50)}
    assert len(keys) == 50
    for key in keys:
        assert key.startswith("e2b_") and len(key) == 44
        assert is_portable_key(key)


def test_portable_shape() -> None:
    assert is_portable_key("e2b_0123abcdef")
    for key in ("", "e2b_", "e2b_XYZ", "E2B_abc", "sk-abc", "e2b_abc\n", " e2b_abc"):
        assert not is_portable_key(key), key
