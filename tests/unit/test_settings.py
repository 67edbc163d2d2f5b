"""Settings read from the environment as a newcomer writes them."""

from __future__ import annotations

import pytest

from cellbox.interpreter.config import Settings


@pytest.mark.parametrize(
    ("raw", "keys"),
    [("mykey", ["mykey"]), ("a, b,,c", ["a", "b", "c"]), ('["x", "y"]', ["x", "y"]), ("", [])],
)
def test_api_keys_from_the_environment(monkeypatch: pytest.MonkeyPatch, raw: str, keys: list[str]) -> None:
    monkeypatch.setenv("CELLBOX_API_KEYS", raw)
    assert Settings().api_keys == keys
