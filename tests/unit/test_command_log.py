"""A command's log: output decoding, terminal output and its replay window, live following."""

from __future__ import annotations

import asyncio
import base64

import pytest

from cellbox.interpreter import commands
from cellbox.interpreter.commands import CommandLog
from cellbox.interpreter.models import CommandExitEvent, CommandPtyEvent, CommandStderrEvent, CommandStdoutEvent


def texts(clog: CommandLog) -> list[tuple[str, str]]:
    return [(e.type, e.text) for e in clog.events if isinstance(e, CommandStdoutEvent | CommandStderrEvent)]


def test_a_character_split_across_chunks_is_decoded_whole() -> None:
    clog = CommandLog(1, "x", "/", max_output_bytes=1 << 20)
    data = "añ€😀".encode()  # 1, 2, 3 and 4 bytes
    for i in range(len(data)):  # one byte at a time, the worst split
        clog.output("stdout", data[i : i + 1])
    clog.output("stderr", "é".encode()[:1])
    clog.output("stdout", b"!")
    clog.output("stderr", "é".encode()[1:])
    clog.flush()
    out = "".join(t for kind, t in texts(clog) if kind == "stdout")
    err = "".join(t for kind, t in texts(clog) if kind == "stderr")
    assert (out, err) == ("añ€😀!", "é")
    assert "\ufffd" not in out + err


def test_a_character_cut_off_at_the_end_shows_as_a_replacement() -> None:
    clog = CommandLog(1, "x", "/", max_output_bytes=1 << 20)
    clog.output("stdout", b"ok" + "€".encode()[:2])
    clog.flush()
    assert "".join(t for _, t in texts(clog)) == "ok\ufffd"


def test_truncation_cuts_at_a_byte_and_flushes() -> None:
    clog = CommandLog(1, "x", "/", max_output_bytes=3)
    clog.output("stdout", "a€".encode())  # 4 bytes: the cut falls inside the euro sign
    clog.output("stdout", b"more")
    clog.flush()
    assert texts(clog)[0] == ("stdout", "a\ufffd")
    assert "output truncated" in texts(clog)[1][1]
    assert len(texts(clog)) == 2


def test_terminal_output_is_raw_and_keeps_a_bounded_past(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(commands, "PTY_REPLAY_BYTES", 10)
    monkeypatch.setattr(commands, "PTY_EVENT_COST", 0)
    clog = CommandLog(7, "sh", "/", max_output_bytes=4, pty=True)  # max_output_bytes is not for terminals
    chunks = [bytes([i]) * 4 for i in range(6)]
    for chunk in chunks:
        clog.output("pty", chunk)
    kept = [e for e in clog.events if isinstance(e, CommandPtyEvent)]
    assert [base64.b64decode(e.data) for e in kept] == chunks[-2:]  # 8 bytes; 12 would be over 10
    assert clog.pty_bytes == 8
    assert [e.seq for e in clog.since(-1)] == [4, 5]
    assert clog.next_seq == 6 and clog.first == 4
    assert clog.info().pty


@pytest.mark.asyncio
async def test_a_follower_behind_the_dropped_events_skips_ahead(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(commands, "PTY_REPLAY_BYTES", 4)
    monkeypatch.setattr(commands, "PTY_EVENT_COST", 0)
    clog = CommandLog(7, "sh", "/", max_output_bytes=0, pty=True)
    clog.output("pty", b"aaaa")
    live = clog.follow(clog.next_seq - 1)  # only what comes from now on
    first = asyncio.ensure_future(anext(live))
    clog.output("pty", b"bbbb")
    clog.output("pty", b"cccc")  # drops bbbb before the follower ran
    clog.add(CommandExitEvent(pid=7, exit_code=0))
    clog.close()
    got = [await first] + [e async for e in live]
    assert [e.type for e in got] == ["pty", "exit"]
    assert isinstance(got[0], CommandPtyEvent) and base64.b64decode(got[0].data) == b"cccc"


def test_a_terminal_written_a_byte_at_a_time_keeps_a_bounded_number_of_events() -> None:
    clog = CommandLog(7, "sh", "/", max_output_bytes=0, pty=True)
    writes = 50_000
    for _ in range(writes):
        clog.output("pty", b"x")
    kept = [e for e in clog.events if isinstance(e, CommandPtyEvent)]
    assert len(kept) <= commands.PTY_REPLAY_BYTES // (1 + commands.PTY_EVENT_COST) + 1
    assert kept and clog.next_seq == writes  # the newest output is still there
