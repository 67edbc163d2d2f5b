"""The isolation helpers' pure parts: no root, no kernels (the real thing is in
``tests/integration/test_isolation_helpers.py``)."""

from __future__ import annotations

import json
import os
import random
import resource
from pathlib import Path

import pytest

from cellbox.interpreter.errors import ServiceAtCapacity
from cellbox.runtimes import isolation
from cellbox.runtimes.isolation import (
    CgroupCounters,
    CgroupTree,
    Rlimits,
    UidPool,
    build_bwrap_argv,
    death_reason,
    seccomp,
    write_etc_files,
    write_ipc_connection,
)
from cellbox.runtimes.local import ENV_ALLOWLIST, ResolvedLimits, base_env, describe_exit
from cellbox.runtimes.specs import TemplateInfo

# ---------------------------------------------------------------------------------------------
# uids


def test_uid_pool_hands_out_distinct_uids_round_robin() -> None:
    pool = UidPool(2_000_000_000, 3)
    a, b = pool.acquire("a"), pool.acquire("b")
    assert (a, b) == (2_000_000_000, 2_000_000_001)
    assert pool.acquire("a") == a  # idempotent
    pool.release("a")
    assert pool.acquire("c") == 2_000_000_002  # a just-freed uid is reused last
    assert pool.acquire("d") == a
    with pytest.raises(ServiceAtCapacity):
        pool.acquire("e")
    pool.release("nobody-had-it")  # idempotent


def test_uid_pool_skips_host_users() -> None:
    pool = UidPool(65_533, 3)  # 65534 is "nobody" in every passwd
    assert [pool.acquire(s) for s in "ab"] == [65_533, 65_535]


# ---------------------------------------------------------------------------------------------
# bwrap argv


def _pairs(options: tuple[str, ...], flag: str) -> list[tuple[str, str]]:
    return [(options[i + 1], options[i + 2]) for i, o in enumerate(options) if o == flag]


def _template(venv: Path) -> TemplateInfo:
    return TemplateInfo(name="t", python=venv / "bin" / "python", env_dir=venv, kernels={})


def test_bwrap_argv_layout(tmp_path: Path) -> None:
    venv = Path("/tmp/some-venv")
    cmd = build_bwrap_argv(
        ["python", "-m", "ipykernel_launcher"],
        home=tmp_path / "home",
        run_dir=tmp_path / "run",
        etc_dir=tmp_path / "etc",
        seccomp=None,
        template_env=venv,
        env=base_env(_template(venv), "/home/user", {"FOO": "bar"}),
    )
    o = cmd.options
    for flag in ("--unshare-user", "--disable-userns", "--unshare-pid", "--unshare-net", "--unshare-ipc"):
        assert flag in o
    assert {"--die-with-parent", "--new-session", "--clearenv"} <= set(o)
    assert _pairs(o, "--uid")[0][0] == "1000"
    # the tmpfs on /tmp comes before the venv bind, or it would hide a venv under /tmp
    mounts = [(o[i], o[i + 1]) for i in range(len(o) - 1) if o[i] in {"--tmpfs", "--ro-bind"}]
    assert mounts.index(("--tmpfs", "/tmp")) < mounts.index(("--ro-bind", str(venv)))
    assert (str(venv), str(venv)) in _pairs(o, "--ro-bind")
    assert (str(tmp_path / "home"), "/home/user") in _pairs(o, "--bind")
    assert (str(tmp_path / "run"), "/run/cellbox") in _pairs(o, "--bind")
    assert o[-4:] == ("--remount-ro", "/", "--chdir", "/home/user")
    env = {key: value for key, value in _pairs(o, "--setenv")}
    assert env["FOO"] == "bar" and env["PATH"].startswith(f"{venv}/bin:") and env["HOME"] == "/home/user"


def test_base_env_keeps_the_service_environment_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t")
    monkeypatch.setenv("TZ", "Europe/Paris")
    venv = Path("/tmp/some-venv")
    template = TemplateInfo(
        name="t", python=venv / "bin" / "python", env_dir=venv, kernels={}, env={"A": "template", "B": "template"}
    )
    env = base_env(template, "/home/user", {"B": "sandbox", "MPLBACKEND": ""}, {"A": "kernel"})
    assert "AWS_SECRET_ACCESS_KEY" not in env
    assert "TZ" in ENV_ALLOWLIST and env["TZ"] == "Europe/Paris"
    assert env["PATH"].startswith(f"{venv}/bin:") and env["HOME"] == "/home/user"
    assert (env["A"], env["B"]) == ("kernel", "sandbox")  # sandbox envs win over the kernel's
    assert "MPLBACKEND" not in env  # an empty value unsets


def test_bwrap_command_passes_options_through_a_memfd(tmp_path: Path) -> None:
    bpf = tmp_path / "f.bpf"
    bpf.write_bytes(b"\0" * 8)
    cmd = isolation.BwrapCommand("bwrap", ("--unshare-net", "--setenv", "A", "b c"), ("true",), bpf)
    with cmd.open() as (argv, fds):
        assert argv[:2] == ["bwrap", "--args"] and argv[3:] == ["--", "true"]
        args_fd = int(argv[2])
        assert args_fd in fds and len(fds) == 2
        with open(f"/proc/self/fd/{args_fd}", "rb") as f:
            parts = f.read().split(b"\0")
        assert parts[:4] == [b"--unshare-net", b"--setenv", b"A", b"b c"]
        assert parts[4] == b"--seccomp" and int(parts[5]) in fds
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)


def test_etc_files(tmp_path: Path) -> None:
    files = write_etc_files(tmp_path / "etc")
    assert "user:x:1000:1000:user:/home/user:/bin/bash" in files["passwd"].read_text()
    assert files["hosts"].stat().st_mode & 0o777 == 0o644


# ---------------------------------------------------------------------------------------------
# ipc


def test_ipc_connection_has_two_views(tmp_path: Path) -> None:
    conn = write_ipc_connection(tmp_path, kernel_name="python3")
    inside = json.loads((tmp_path / isolation.CONNECTION_FILE).read_text())
    assert inside["transport"] == "ipc" and inside["ip"] == "/run/cellbox/k"
    assert [inside[k] for k in ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")] == [1, 2, 3, 4, 5]
    assert len(inside["key"]) == 64
    assert conn.connection_info == {**inside, "ip": str(tmp_path / "k")}
    assert conn.sandbox_file == "/run/cellbox/kernel.json"
    assert isolation.KERNEL_SOCKETS == ("k-1", "k-2", "k-3", "k-4", "k-5")


def test_ipc_dir_path_must_fit_a_unix_socket(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="107"):
        isolation.prepare_ipc_dir(tmp_path / ("x" * 100) / "python", os.getuid())
    with pytest.raises(ValueError, match="socket directory name"):
        isolation.prepare_ipc_dir(tmp_path / "..", os.getuid())


# ---------------------------------------------------------------------------------------------
# seccomp policy


def _denied(rules: list[seccomp._Rule], syscall: str, args: list[int]) -> bool:
    def matches(cmp: tuple[int, int, int, int]) -> bool:
        arg, op, a, b = cmp
        assert op == seccomp._SCMP_CMP_MASKED_EQ
        return args[arg] & a == b

    return any(r.syscall == syscall and all(matches(c) for c in r.args) for r in rules)


def test_personality_rules_allow_only_linux_and_the_query() -> None:
    rules = seccomp._seccomp_rules()
    assert not _denied(rules, "personality", [0])
    assert not _denied(rules, "personality", [0xFFFFFFFF])
    assert not _denied(rules, "personality", [0xFFFFFFFFFFFFFFFF])  # glibc sign-extends -1
    rng = random.Random(7)
    for value in [8, 0x0040000, 0x0400000, 0x7FFFFFFF, 0xFFFFFFFE, 1, *(rng.getrandbits(32) for _ in range(2000))]:
        if value not in (0, 0xFFFFFFFF):
            assert _denied(rules, "personality", [value]), hex(value)


def test_clone_rules_deny_namespace_flags_only() -> None:
    rules = seccomp._seccomp_rules()
    sigchld = 17
    thread_flags = 0x003D0F00  # what glibc's pthread_create passes
    assert not _denied(rules, "clone", [sigchld])
    assert not _denied(rules, "clone", [thread_flags])
    assert _denied(rules, "clone", [sigchld | 0x10000000])  # CLONE_NEWUSER
    assert _denied(rules, "clone", [sigchld | 0x40000000])  # CLONE_NEWNET
    assert _denied(rules, "ioctl", [0, 0x5412])  # TIOCSTI
    assert not _denied(rules, "ioctl", [0, 0x5401])  # TCGETS


# ---------------------------------------------------------------------------------------------
# cgroup knobs, against a fake tree (this host may not have the other cgroup version)


def _fake_tree(tmp_path: Path, version: int) -> CgroupTree:
    if version == 2:
        return CgroupTree(2, {"": tmp_path / "cellbox"}, {"memory", "pids", "cpu"})
    return CgroupTree(1, {c: tmp_path / c / "cellbox" for c in isolation.REQUIRED_V1}, isolation.REQUIRED_V1)


def _touch(cgroup: isolation.Cgroup, *names: str) -> None:
    for d in cgroup.unique_dirs:
        for name in names:
            (d / name).write_text("")


def test_v2_limits_are_written_to_the_v2_knobs(tmp_path: Path) -> None:
    tree = _fake_tree(tmp_path, 2)
    (tmp_path / "cellbox").mkdir()
    cgroup = tree.create("sbx1")
    _touch(cgroup, "memory.max", "memory.swap.max", "pids.max", "cpu.max")
    cgroup.set_limits(memory_bytes=512 << 20, pids=256, cpu=0.5)
    d = tmp_path / "cellbox" / "sbx1"
    assert (d / "memory.max").read_text() == str(512 << 20)
    assert (d / "memory.swap.max").read_text() == "0"
    assert (d / "pids.max").read_text() == "256"
    assert (d / "cpu.max").read_text() == "50000 100000"
    cgroup.set_limits(memory_bytes=None, pids=None, cpu=None)
    assert [(d / f).read_text() for f in ("memory.max", "pids.max", "cpu.max")] == ["max", "max", "max 100000"]
    assert cgroup.procs_files == [d / "cgroup.procs"]


def test_v1_limits_are_written_to_each_controller(tmp_path: Path) -> None:
    tree = _fake_tree(tmp_path, 1)
    for d in tree.dirs.values():
        d.mkdir(parents=True)
    cgroup = tree.create("sbx1")
    _touch(cgroup, "memory.limit_in_bytes", "memory.memsw.limit_in_bytes", "pids.max")
    _touch(cgroup, "cpu.cfs_period_us", "cpu.cfs_quota_us")
    cgroup.set_limits(memory_bytes=256 << 20, pids=64, cpu=2)
    assert (tmp_path / "memory/cellbox/sbx1/memory.memsw.limit_in_bytes").read_text() == str(256 << 20)
    assert (tmp_path / "pids/cellbox/sbx1/pids.max").read_text() == "64"
    assert (tmp_path / "cpu/cellbox/sbx1/cpu.cfs_quota_us").read_text() == "200000"
    assert len(cgroup.procs_files) == len(isolation.REQUIRED_V1)
    assert tree.sandbox_ids() == ["sbx1"]


def test_sandbox_ids_must_be_path_safe(tmp_path: Path) -> None:
    tree = _fake_tree(tmp_path, 2)
    for bad in ("..", "a/b", "", ".hidden", "x" * 65):
        with pytest.raises(ValueError):
            tree.sandbox(bad)


# ---------------------------------------------------------------------------------------------
# small pure helpers


@pytest.mark.parametrize(
    ("returncode", "after", "reason"),
    [
        (137, CgroupCounters(1, 0), "oom"),
        (137, CgroupCounters(0, 3), "pids"),
        (137, CgroupCounters(0, 0), "killed"),
        (-9, CgroupCounters(0, 0), "killed"),
        (0, CgroupCounters(0, 5), "exited"),
        (1, CgroupCounters(0, 0), "exited"),
    ],
)
def test_death_reason(returncode: int, after: CgroupCounters, reason: str) -> None:
    assert death_reason(returncode, CgroupCounters(0, 0), after) == reason


def test_rlimits_never_exceed_the_hard_limit() -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    eff = dict(Rlimits(nofile=10**9, fsize_bytes=1 << 30).effective())
    if hard != resource.RLIM_INFINITY:
        assert eff[resource.RLIMIT_NOFILE] == hard
    assert eff[resource.RLIMIT_CORE] == 0
    assert resource.RLIMIT_FSIZE in eff
    assert resource.RLIMIT_NOFILE not in dict(Rlimits(nofile=None).effective())


def test_describe_exit_names_the_cause_and_the_limit() -> None:
    limits = ResolvedLimits(memory_mb=160, cpu=1, pids=64, disk_mb=1, nofile=1, fsize_mb=1)
    oom = describe_exit(137, cause="oom", limits=limits)
    assert (oom.reason, oom.signal, oom.exit_code) == ("oom", 9, None)
    assert "160 MiB memory limit" in oom.detail
    pids = describe_exit(-9, cause="pids", limits=limits)
    assert (
        pids.reason == "pids"
        and pids.detail == "killed by SIGKILL, after hitting the sandbox's limit of 64 processes and threads"
    )
    assert describe_exit(-11).reason == "segfault" and describe_exit(-11, cause="killed").reason == "killed"
    assert describe_exit(-99).detail == "killed by signal 99"
    assert describe_exit(None, "tail").reason == "unknown"
