"""The local runtime: sandboxes on the service's own host.

With ``isolation="none"`` each kernel is a plain child process in its own session (so an
interrupt or ``kill -9 -1``-style group signal never reaches the service), with its own home
directory under the data dir and a clean, allowlisted environment. Kernels talk ZMQ over
``ipc`` sockets in a per-sandbox run directory: no kernel ever listens on a host TCP port.

With ``isolation="bwrap"`` (:class:`IsolatedLocalRuntime`, chosen by ``LocalRuntime(settings)``
itself) each sandbox gets its own host uid, cgroup (memory, pids, cpu), disk-capped home and
rlimits, and each kernel runs in its own bubblewrap sandbox with a seccomp filter and no
network; the helpers and the call sequence are in :mod:`cellbox.runtimes.isolation`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cellbox.interpreter.config import Settings
from cellbox.interpreter.errors import InvalidRequest, KernelStartFailed, RuntimeUnavailable
from cellbox.interpreter.models import KernelExit, Limits
from cellbox.runtimes import isolation as iso
from cellbox.runtimes.base import KernelSpec, SandboxHandle, TemplateInfo

log = logging.getLogger("cellbox.runtime.local")

# A unix socket path must fit in sockaddr_un.sun_path (108 bytes with the NUL); ZMQ appends
# "-N" to the ip we give it.
_MAX_IPC_PATH = 100
_LOG_TAIL_BYTES = 2000

# Variables a kernel may inherit from the service's environment. Anything else (API keys,
# cloud credentials, ...) stays out: the service's environment is not the sandbox's.
ENV_ALLOWLIST = ("LANG", "LC_ALL", "TZ", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def describe_exit(returncode: int | None, log_tail: str = "") -> KernelExit:
    """Turn a process return code into a KernelExit with a human reason."""
    now = time.time()
    if returncode is None:
        return KernelExit(reason="unknown", detail=log_tail, at=now)
    if returncode < 0 or returncode > 128:
        signum = -returncode if returncode < 0 else returncode - 128
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        reasons = {signal.SIGKILL: "killed", signal.SIGSEGV: "segfault", signal.SIGABRT: "aborted"}
        reason = reasons.get(signum, "signal")  # type: ignore[call-overload]  # Signals is an IntEnum
        return KernelExit(signal=signum, reason=reason, detail=f"killed by {name}", at=now)
    detail = f"exited with status {returncode}"
    if log_tail:
        detail += ": " + log_tail.strip().splitlines()[-1][:300]
    return KernelExit(exit_code=returncode, reason="exited", detail=detail, at=now)


class LocalKernelProcess:
    """A kernel child process (see ``KernelProcess`` in base.py)."""

    def __init__(self, proc: asyncio.subprocess.Process, connection_info: dict[str, Any], log_path: Path) -> None:
        self._proc = proc
        self.connection_info = connection_info
        self.pid: int | None = proc.pid
        self._log_path = log_path

    async def wait(self) -> KernelExit:
        code = await self._proc.wait()
        return describe_exit(code, self._log_tail())

    def _log_tail(self) -> str:
        try:
            with open(self._log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - _LOG_TAIL_BYTES))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, signum)

    async def kill(self) -> None:
        if self._proc.returncode is None:
            self.signal(signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            await self._proc.wait()


def write_connection_file(path: Path, ipc_prefix: str) -> dict[str, Any]:
    """Write an ipc-transport connection file; return its contents."""
    info: dict[str, Any] = {
        "transport": "ipc",
        "ip": ipc_prefix,
        "shell_port": 1,
        "iopub_port": 2,
        "stdin_port": 3,
        "control_port": 4,
        "hb_port": 5,
        "key": secrets.token_hex(32),
        "signature_scheme": "hmac-sha256",
        "kernel_name": "",
    }
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(info, f)
    return info


def kernel_env(template: TemplateInfo, spec: KernelSpec, home: str, envs: dict[str, str]) -> dict[str, str]:
    """The complete environment of a kernel: allowlist + template + sandbox envs."""
    env = {k: os.environ[k] for k in ENV_ALLOWLIST if k in os.environ}
    bindir = str(template.python.parent)
    env.update(
        {
            "PATH": f"{bindir}:/usr/local/bin:/usr/bin:/bin",
            "HOME": home,
            "USER": "user",
            "LANG": env.get("LANG", "C.UTF-8"),
            "PYTHONUNBUFFERED": "1",
            "MPLBACKEND": "module://matplotlib_inline.backend_inline",
            "JPY_PARENT_PID": "",
            "TERM": "xterm-256color",
        }
    )
    env.update(template.env)
    env.update(spec.env)
    env.update(envs)
    return {k: v for k, v in env.items() if v != ""}


def kernel_argv(template: TemplateInfo, spec: KernelSpec, connection_file: str) -> list[str]:
    argv = [a.replace("{python}", str(template.python)).replace("{connection_file}", connection_file)
            for a in spec.argv]
    if spec.language == "python":
        # History off: nothing to write in the home, and no sqlite lock contention.
        argv += ["--HistoryManager.enabled=False"]
        for f in template.startup_files:
            argv.append(f"--IPKernelApp.exec_files={f}")
    return argv


class LocalRuntime:
    """Sandboxes as directories and child processes of the service (see module docstring)."""

    name = "local"

    def __new__(cls, settings: Settings) -> LocalRuntime:
        # ``load_runtime`` only knows "local"; the isolation setting picks the implementation.
        if cls is LocalRuntime and settings.isolation == "bwrap":
            cls = IsolatedLocalRuntime
        return super().__new__(cls)

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.isolation = settings.isolation
        self.homes = settings.data_dir / "sandboxes"
        self.run_root = settings.resolved_run_dir()

    async def startup(self) -> None:
        if self.isolation != "none":
            raise RuntimeUnavailable(
                f"isolation {self.isolation!r} is not available in this build; use 'none'"
            )
        self.homes.mkdir(parents=True, exist_ok=True)
        self.run_root.mkdir(parents=True, exist_ok=True, mode=0o700)
        if len(str(self.run_root)) > _MAX_IPC_PATH - 30:
            raise RuntimeUnavailable(f"run dir {self.run_root} is too long for unix socket paths")

    async def create_sandbox(
        self, sandbox_id: str, template: TemplateInfo, limits: Limits, envs: dict[str, str]
    ) -> SandboxHandle:
        home = self.homes / sandbox_id / "home"
        home.mkdir(parents=True, exist_ok=True, mode=0o700)
        run = self.run_root / sandbox_id
        run.mkdir(parents=True, exist_ok=True, mode=0o700)
        return SandboxHandle(sandbox_id, home, template, limits, dict(envs), extra={"run": run})

    async def start_kernel(
        self, sandbox: SandboxHandle, spec: KernelSpec, name: str, cwd: str | None
    ) -> LocalKernelProcess:
        run: Path = sandbox.extra["run"]
        workdir = resolve_cwd(sandbox.home, cwd)
        conn_file = run / f"{name}.json"
        info = write_connection_file(conn_file, str(run / name))
        log_path = run / f"{name}.log"
        logf = open(log_path, "ab")
        try:
            proc = await asyncio.create_subprocess_exec(
                *kernel_argv(sandbox.template, spec, str(conn_file)),
                env=kernel_env(sandbox.template, spec, str(sandbox.home), sandbox.envs),
                cwd=workdir,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=logf,
                stderr=logf,
                start_new_session=True,
            )
        finally:
            logf.close()
        return LocalKernelProcess(proc, info, log_path)

    async def destroy_sandbox(self, sandbox: SandboxHandle) -> None:
        run: Path = sandbox.extra["run"]
        await asyncio.to_thread(shutil.rmtree, run, True)
        await asyncio.to_thread(shutil.rmtree, sandbox.home.parent, True)

    async def shutdown(self) -> None:
        return None


def _log_tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - _LOG_TAIL_BYTES))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


# =============================================================================================
# isolation="bwrap"


class IsolatedKernelProcess:
    """A kernel inside bwrap (see ``KernelProcess`` in base.py). ``proc`` is the outer bwrap
    process, a child of the service running as the sandbox's uid; the kernel is its
    grandchild (pid 2 of the sandbox's pid namespace), so killing bwrap ends the kernel and
    everything it started (``--die-with-parent`` + the pid namespace)."""

    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        connection_info: dict[str, Any],
        log_path: Path,
        cgroup: iso.Cgroup,
        limits: _Resolved,
    ) -> None:
        self._proc = proc
        self.connection_info = connection_info
        self.pid: int | None = proc.pid
        self._log_path = log_path
        self._cgroup = cgroup
        self._limits = limits
        self._before = cgroup.counters()

    async def wait(self) -> KernelExit:
        code = await self._proc.wait()
        after = self._cgroup.counters()
        reason = iso.death_reason(code, self._before, after)
        self._before = after
        return describe_isolated_exit(code, reason, self._limits, _log_tail(self._log_path))

    def _kernel_pid(self) -> int | None:
        """The kernel's host pid: outer bwrap -> bwrap as pid 1 -> kernel."""
        pid = self._proc.pid
        for _ in range(2):
            try:
                children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except OSError:
                return None
            if not children:
                return None
            pid = int(children[0])
        return pid

    def signal(self, signum: int) -> None:
        if self._proc.returncode is not None:
            return
        if signum == signal.SIGKILL:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._proc.pid, signum)
            return
        pid = self._kernel_pid()
        if pid is None:
            return
        # bwrap --new-session makes the kernel a session (and process group) leader.
        try:
            os.killpg(pid, signum)
        except (ProcessLookupError, PermissionError):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signum)

    async def kill(self) -> None:
        if self._proc.returncode is None:
            self.signal(signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            await self._proc.wait()


@dataclass(frozen=True)
class _Resolved:
    """A sandbox's limits with the service defaults filled in."""

    memory_mb: int
    cpu: float
    pids: int
    disk_mb: int
    nofile: int
    fsize_mb: int

    @classmethod
    def of(cls, limits: Limits, settings: Settings) -> _Resolved:
        return cls(
            memory_mb=limits.memory_mb or settings.default_memory_mb,
            cpu=limits.cpu or settings.default_cpu,
            pids=limits.pids or settings.default_pids,
            disk_mb=limits.disk_mb or settings.default_disk_mb,
            nofile=limits.nofile or settings.default_nofile,
            fsize_mb=limits.fsize_mb or settings.default_fsize_mb,
        )


def describe_isolated_exit(returncode: int | None, reason: str, limits: _Resolved, log_tail: str = "") -> KernelExit:
    """A KernelExit for a sandboxed kernel; ``reason`` from :func:`isolation.death_reason`.

    bwrap exits with 128+N when the kernel died of signal N, and with -N when bwrap itself
    was killed (by the service: ``kill -9 -1`` from inside cannot reach it)."""
    base = describe_exit(returncode, log_tail)
    signum, exit_code, detail = base.signal, base.exit_code, base.detail
    if returncode is not None and returncode > 128:  # bwrap passes on the kernel's signal
        signum, exit_code = returncode - 128, None
        try:
            detail = f"killed by {signal.Signals(signum).name}"
        except ValueError:
            detail = f"killed by signal {signum}"
    if reason == "oom":
        detail = f"out of memory: the sandbox's {limits.memory_mb} MiB memory limit was reached"
    elif reason == "pids":
        detail = f"{detail}, after hitting the sandbox's limit of {limits.pids} processes and threads"
    return KernelExit(exit_code=exit_code, signal=signum, reason=reason, detail=detail, at=base.at)


def _allow_traverse(path: Path) -> None:
    """Give others search (x) permission on a service-owned directory, so the sandbox uid can
    reach the paths below it that bwrap binds (bwrap opens its sources as that uid)."""
    mode = path.stat().st_mode
    if mode & 0o001 == 0:
        os.chmod(path, (mode & 0o7777) | 0o011)


def _check_traversable(path: Path) -> None:
    for parent in [path, *path.parents]:
        if parent.stat().st_mode & 0o001 == 0:
            raise RuntimeUnavailable(
                f"{parent} is not searchable by other users; sandbox uids must reach {path} "
                "(chmod o+x, or pick a data/run dir elsewhere)"
            )


class IsolatedLocalRuntime(LocalRuntime):
    """``isolation="bwrap"``: sandboxes as uid + cgroup + disk home, kernels in bubblewrap."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.isolation = "bwrap"
        self.uids = iso.UidPool(settings.sandbox_uid_first, settings.sandbox_uid_count)
        self.tree: iso.CgroupTree | None = None
        self.bpf: Path | None = None

    async def startup(self) -> None:
        if os.geteuid() != 0:
            raise RuntimeUnavailable("isolation 'bwrap' needs the service to run as root")
        self.homes.mkdir(parents=True, exist_ok=True)
        self.run_root.mkdir(parents=True, exist_ok=True, mode=0o711)
        if len(str(self.run_root)) > _MAX_IPC_PATH - 30:
            raise RuntimeUnavailable(f"run dir {self.run_root} is too long for unix socket paths")
        # The sandbox uids must reach their home and ipc dirs; the service's own dirs may be
        # opened up for search (never read), the directories above them are checked.
        for d in (self.settings.data_dir, self.homes, self.run_root):
            _allow_traverse(d)
        _check_traversable(self.homes)
        _check_traversable(self.run_root)
        last_uid = self.settings.sandbox_uid_first + self.settings.sandbox_uid_count - 1
        report = await iso.check_host(self.run_root, probe_uid=last_uid, cgroup_prefix=self.settings.cgroup_prefix)
        report.require()
        for w in report.warnings:
            log.warning("isolation: %s", w)
        self.tree = iso.CgroupTree.detect(self.settings.cgroup_prefix)
        self.tree.prepare()
        reaped = await self.tree.reap_leftovers()
        await iso.DiskHome.reap_leftovers(self.homes)
        for sid in reaped:
            log.warning("reaped leftover sandbox %s", sid)
            await asyncio.to_thread(shutil.rmtree, self.homes / sid, True)
            await asyncio.to_thread(shutil.rmtree, self.run_root / sid, True)
        self.bpf = iso.seccomp_bpf(self.run_root)

    async def create_sandbox(
        self, sandbox_id: str, template: TemplateInfo, limits: Limits, envs: dict[str, str]
    ) -> SandboxHandle:
        assert self.tree is not None, "startup() was not called"
        resolved = _Resolved.of(limits, self.settings)
        if template.env_dir is not None:
            _allow_traverse(template.env_dir.parent)
        sandbox_dir = self.homes / sandbox_id
        run = self.run_root / sandbox_id
        uid = self.uids.acquire(sandbox_id)
        extra: dict[str, Any] = {"run": run, "dir": sandbox_dir, "uid": uid, "procs": [], "limits": resolved}
        handle = SandboxHandle(sandbox_id, sandbox_dir / "home", template, limits, dict(envs), extra=extra)
        try:
            sandbox_dir.mkdir(parents=True, exist_ok=True, mode=0o711)
            os.chmod(sandbox_dir, 0o711)
            run.mkdir(parents=True, exist_ok=True, mode=0o711)
            os.chmod(run, 0o711)
            cgroup = self.tree.create(sandbox_id)
            extra["cgroup"] = cgroup
            cgroup.set_limits(memory_bytes=resolved.memory_mb << 20, pids=resolved.pids, cpu=resolved.cpu)
            extra["home"] = home = await iso.DiskHome.create(
                sandbox_dir / "home", size_bytes=resolved.disk_mb << 20, uid=uid
            )
            handle.home = home.path
            iso.write_etc_files(sandbox_dir / "etc")
        except BaseException:
            await self.destroy_sandbox(handle)
            raise
        return handle

    async def start_kernel(  # type: ignore[override]  # a KernelProcess, not a LocalKernelProcess
        self, sandbox: SandboxHandle, spec: KernelSpec, name: str, cwd: str | None
    ) -> IsolatedKernelProcess:
        assert self.bpf is not None
        extra = sandbox.extra
        uid: int = extra["uid"]
        cgroup: iso.Cgroup = extra["cgroup"]
        resolved: _Resolved = extra["limits"]
        run: Path = extra["run"]
        workdir = self._sandbox_cwd(sandbox.home, cwd, uid)
        ipc_dir = iso.prepare_ipc_dir(run / name, uid)
        conn = iso.write_ipc_connection(ipc_dir)
        template = sandbox.template
        env = kernel_env(template, spec, iso.SANDBOX_HOME, sandbox.envs)
        binds: list[tuple[Path, str]] = []
        if template.env_dir is not None:
            # the template dir holds the startup (exec) files next to the venv
            binds.append((template.env_dir.parent, str(template.env_dir.parent)))
        cmd = iso.build_bwrap_argv(
            kernel_argv(template, spec, conn.sandbox_file),
            home=sandbox.home,
            run_dir=ipc_dir,
            etc_dir=extra["dir"] / "etc",
            seccomp=self.bpf,
            template_env=template.env_dir,
            env=env,
            cwd=workdir,
            tmp_size=self.settings.sandbox_tmp_mb << 20,
            extra_ro_binds=binds,
        )
        rlimits = iso.Rlimits(nofile=resolved.nofile, fsize_bytes=resolved.fsize_mb << 20)
        log_path = run / f"{name}.log"
        logf = open(log_path, "ab")
        try:
            with cmd.open() as (argv, fds):
                proc = await asyncio.create_subprocess_exec(
                    *argv,
                    pass_fds=fds,
                    cwd="/",
                    env={},
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=logf,
                    stderr=logf,
                    start_new_session=True,
                    preexec_fn=iso.make_preexec(cgroup, uid, rlimits),
                )
        finally:
            logf.close()
        procs: list[asyncio.subprocess.Process] = extra["procs"]
        procs[:] = [p for p in procs if p.returncode is None]
        procs.append(proc)
        kernel = IsolatedKernelProcess(proc, conn.connection_info, log_path, cgroup, resolved)
        try:
            await iso.wait_for_ipc_sockets(
                ipc_dir, timeout=self.settings.kernel_start_timeout, alive=lambda: proc.returncode is None
            )
            iso.hand_back_ipc_dir(ipc_dir, uid)
        except BaseException as exc:
            await kernel.kill()
            if isinstance(exc, KernelStartFailed):
                raw = _log_tail(log_path)
                lines = raw.strip().splitlines()[1 if len(raw) >= _LOG_TAIL_BYTES else 0 :]  # whole lines
                tail = "\n".join(lines[-12:])[-1000:]
                raise KernelStartFailed(f"{exc.message}:\n{tail}" if tail else exc.message) from exc
            raise
        return kernel

    @staticmethod
    def _sandbox_cwd(home: Path, cwd: str | None, uid: int) -> str:
        """The kernel's cwd as a sandbox path; created (owned by the sandbox uid) if missing."""
        host = Path(resolve_cwd(home, cwd))
        rel = host.relative_to(home.resolve())
        p = host
        while p != home.resolve() and p.stat().st_uid == 0:  # made by resolve_cwd, as root
            os.chown(p, uid, uid)
            p = p.parent
        return str(Path(iso.SANDBOX_HOME) / rel) if str(rel) != "." else iso.SANDBOX_HOME

    async def destroy_sandbox(self, sandbox: SandboxHandle) -> None:
        extra = sandbox.extra
        cgroup: iso.Cgroup | None = extra.get("cgroup")
        if cgroup is None and self.tree is not None:
            with contextlib.suppress(ValueError):
                cgroup = self.tree.sandbox(sandbox.sandbox_id)
        if cgroup is not None:
            await cgroup.kill_all()
        for proc in extra.get("procs", []):
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            with contextlib.suppress(ProcessLookupError):
                await proc.wait()
        if cgroup is not None:
            await cgroup.remove()
        home: iso.DiskHome | None = extra.get("home")
        if home is not None:
            await home.destroy()
        await asyncio.to_thread(shutil.rmtree, extra["run"], True)
        await asyncio.to_thread(shutil.rmtree, extra["dir"], True)
        self.uids.release(sandbox.sandbox_id)

    async def shutdown(self) -> None:
        if self.tree is not None:  # the prefix itself, once every sandbox is gone
            for d in self.tree._unique_dirs():
                with contextlib.suppress(OSError):
                    d.rmdir()


def resolve_cwd(home: Path, cwd: str | None) -> str:
    """Map a sandbox path (``/home/user/x`` or relative ``x``) to the host directory, creating
    it; refuses paths outside the home."""
    if not cwd:
        return str(home)
    rel = cwd[len("/home/user"):] if cwd.startswith("/home/user") else cwd
    target = (home / rel.lstrip("/")).resolve()
    if target != home.resolve() and home.resolve() not in target.parents:
        raise InvalidRequest(f"cwd {cwd!r} is outside the sandbox home", field="cwd")
    target.mkdir(parents=True, exist_ok=True)
    return str(target)
