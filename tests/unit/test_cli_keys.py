"""``cellbox keys new``: a key every SDK takes."""

from __future__ import annotations

from click.testing import CliRunner

from cellbox import cli
from cellbox.keys import is_portable_key


def test_keys_new_prints_a_fresh_portable_key() -> None:
    runner = CliRunner()
    first = runner.invoke(cli.main, ["keys", "new"])
    second = runner.invoke(cli.main, ["keys", "new"])
    assert first.exit_code == 0 and second.exit_code == 0
    a, b = first.output.strip(), second.output.strip()
    assert is_portable_key(a) and len(a) == 44 and a != b
