"""The service reads the end of kernel logs that sandbox code may have replaced: a symlink, a
FIFO or a hard link must give nothing (not a host file's contents, not a blocked service)."""

from __future__ import annotations

import os
from pathlib import Path

from cellbox.runtimes.local import _log_tail


def test_a_regular_log_gives_its_end(tmp_path: Path) -> None:
    log = tmp_path / "kernel.log"
    log.write_bytes(b"x" * 10_000 + b"\nTraceback: the end")
    assert _log_tail(log).endswith("Traceback: the end")


def test_a_symlink_fifo_or_second_name_gives_nothing(tmp_path: Path) -> None:
    secret = tmp_path / "host-secret"
    secret.write_text("root:$6$hash")
    link = tmp_path / "kernel.log"
    link.symlink_to(secret)
    assert _log_tail(link) == ""
    fifo = tmp_path / "fifo.log"
    os.mkfifo(fifo)
    assert _log_tail(fifo) == ""  # and returns at once: a blocking open would hang this test
    hard = tmp_path / "hard.log"
    os.link(secret, hard)
    assert _log_tail(hard) == ""
    assert _log_tail(tmp_path / "missing.log") == ""
