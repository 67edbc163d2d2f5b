"""The rootfs helpers on their own: symlinks resolved inside a root, uid ranges, the image's
user, what the egress may not bind over an image, and sudo's command line (no sandbox)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cellbox.interpreter.errors import RuntimeUnavailable, ServiceAtCapacity
from cellbox.runtimes.isolation.bwrap import resolve_in_root
from cellbox.runtimes.isolation.strategy import _image_user, _is_apt_source
from cellbox.runtimes.isolation.uids import RANGE_SIZE, UidRangePool
from cellbox.runtimes.local import SUDO_SOURCE


def test_resolve_in_root_never_leaves_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "usr" / "bin").mkdir(parents=True)
    os.symlink("usr/bin", root / "bin")  # a merged-/usr link, relative
    os.symlink("/tmp", root / "etc" / "abs")  # absolute: /tmp of the root, not the host's
    os.symlink("../../../../../../../tmp", root / "etc" / "up")  # .. stops at the root
    os.symlink("loop", root / "loop")
    assert resolve_in_root(root, "/bin/sudo") == "/usr/bin/sudo"
    assert resolve_in_root(root, "/etc/abs/x") == "/tmp/x"
    assert resolve_in_root(root, "/etc/up/x") == "/tmp/x"
    assert resolve_in_root(root, "/new/dir/../file") == "/new/file"
    assert resolve_in_root(root, "/etc/hosts") == "/etc/hosts"
    with pytest.raises(OSError, match="too many symlinks"):
        resolve_in_root(root, "/loop/x")


def test_uid_ranges_are_disjoint_and_skip_busy_ones() -> None:
    first = 3 << 30  # no other test's ranges
    pool = UidRangePool(first, 3)
    a, b, c = (pool.acquire(f"sb_{i}") for i in range(3))
    assert sorted({a, b, c}) == [first, first + RANGE_SIZE, first + 2 * RANGE_SIZE]
    assert pool.acquire("sb_0") == a
    with pytest.raises(ServiceAtCapacity):
        pool.acquire("sb_3")
    pool.release("sb_1")
    assert pool.acquire("sb_3") == b
    assert pool.overlaps(310_000, 10_000) is False and pool.overlaps(first + 5, 1) is True
    with pytest.raises(ValueError):
        UidRangePool(2**32 - RANGE_SIZE, 2)
    if os.geteuid() != 0:
        return
    # a range one of whose uids a host process runs as (a leftover) is skipped
    uid = first + 5
    proc = subprocess.Popen(["sleep", "30"], preexec_fn=lambda: os.setresuid(uid, uid, uid))
    try:
        assert UidRangePool(first, 2).acquire("x") == first + RANGE_SIZE
    finally:
        proc.kill()
        proc.wait()


def test_the_images_user(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/bash\nnode:x:1001:1002::/home/node:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n"
    )
    assert _image_user(tmp_path, None) == (1000, 1000)
    assert _image_user(tmp_path, "root") == (1000, 1000)  # USER root: still `user` by default
    assert _image_user(tmp_path, "0:0") == (1000, 1000)
    assert _image_user(tmp_path, "node") == (1001, 1002)
    assert _image_user(tmp_path, "1001") == (1001, 1002)
    assert _image_user(tmp_path, "node:5") == (1001, 5)
    assert _image_user(tmp_path, "2000:2001") == (2000, 2001)  # numeric, no entry: as Docker
    with pytest.raises(RuntimeUnavailable, match="ghost"):
        _image_user(tmp_path, "ghost")
    # a passwd that is a link out of the root is read inside it, not on the host
    (tmp_path / "etc" / "passwd").unlink()
    os.symlink("/etc/shadow", tmp_path / "etc" / "passwd")
    with pytest.raises(RuntimeUnavailable):
        _image_user(tmp_path, "node")


def test_the_images_apt_sources_are_its_own() -> None:
    for target in (
        "/etc/apt/sources.list",
        "/etc/apt/sources.list.d/debian.sources",
        "/etc/apt/trusted.gpg.d/x.gpg",
        "/usr/share/keyrings/debian-archive-keyring.gpg",
    ):
        assert _is_apt_source(target), target
    for target in ("/etc/ssl/certs/ca-certificates.crt", "/etc/pip.conf", "/etc/apt/apt.conf.d/99cellbox-proxy"):
        assert not _is_apt_source(target), target


def _sudo(*args: str) -> subprocess.CompletedProcess[str]:
    """sudo's client as a sandbox's /usr/local/bin/sudo runs it: a bare file, no site."""
    return subprocess.run(
        [sys.executable, "-I", "-S", str(SUDO_SOURCE), *args], capture_output=True, text=True, timeout=30, cwd="/"
    )


def test_sudo_command_line() -> None:
    assert _sudo("-l").stdout.strip().endswith("NOPASSWD: ALL")
    assert _sudo("-v").returncode == 0 and _sudo("-K").returncode == 0
    assert "usage: sudo" in _sudo("-h").stdout
    bad = _sudo("-Z", "true")
    assert bad.returncode == 1 and "invalid option -- 'Z'" in bad.stderr
    assert _sudo().returncode == 1 and _sudo("-u").returncode == 1
    assert _sudo("-u", "no-such-user", "true").stderr.strip() == "sudo: unknown user no-such-user"
    if os.geteuid() == 0:  # already root (this host's tests): sudo runs the command itself
        out = _sudo("-E", "VAR=x", "sh", "-c", 'echo "$VAR $(id -u) $SUDO_USER"')
        assert out.stdout == "x 0 root\n", out
        assert _sudo("sh", "-c", "exit 3").returncode == 3
        assert _sudo("no-such-command-here").returncode == 127
    else:  # no agent outside a sandbox
        out = _sudo("true")
        assert out.returncode == 1 and "agent does not answer" in out.stderr
