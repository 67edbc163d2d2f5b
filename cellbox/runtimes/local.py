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
import logging
import os
import shutil
import signal
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cellbox.interpreter.config import Settings
from cellbox.interpreter.errors import Conflict, InterpreterError, InvalidRequest, KernelStartFailed, RuntimeUnavailable
from cellbox.interpreter.models import KernelExit, Limits, NetworkSpec, SandboxUsage
from cellbox.runtimes import agent as agent_module
from cellbox.runtimes import isolation as iso
from cellbox.runtimes.agent_client import AgentClient, ProcessHandle
from cellbox.runtimes.specs import KernelSpec, SandboxHandle, TemplateInfo

log = logging.getLogger("cellbox.runtime.local")

# A unix socket path must fit in sockaddr_un.sun_path (108 bytes with the NUL); ZMQ appends
# "-N" to the ip we give it.
_MAX_IPC_PATH = 100
_LOG_TAIL_BYTES = 2000

# Variables a kernel may inherit from the service's environment. Anything else (API keys,
# cloud credentials, ...) stays out: the service's environment is not the sandbox's.
ENV_ALLOWLIST = ("LANG", "LC_ALL", "TZ", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")

# The agent is a single stdlib-only file run by the template's Python inside the sandbox.
AGENT_SOURCE = Path(agent_module.__file__)
_AGENT_SOCKET = "a.sock"
SANDBOX_AGENT = "/opt/cellbox/agent.py"


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


def kernel_env(template: TemplateInfo, spec: KernelSpec, home: str, envs: dict[str, str]) -> dict[str, str]:
    """The complete environment of a kernel: allowlist + template + kernel spec + sandbox envs."""
    return base_env(template, home, envs, spec.env)


def base_env(
    template: TemplateInfo, home: str, envs: dict[str, str], kernel: dict[str, str] | None = None
) -> dict[str, str]:
    """The environment of a sandbox process: allowlist + template + ``kernel`` + ``envs``."""
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
    env.update(kernel or {})
    env.update(envs)
    return {k: v for k, v in env.items() if v != ""}


def write_profile(home: Path, template: TemplateInfo, uid: int | None = None) -> None:
    """A default ``~/.profile``: commands run as ``bash -lc``, and a login shell's
    /etc/profile resets PATH, so the template's tools (python3, pip) come first again here.
    Left alone if the sandbox's home already has one."""
    profile = home / ".profile"
    if profile.exists():
        return
    profile.write_text(
        "# Written by cellbox when the sandbox was created; edit freely.\n"
        '[ -f "$HOME/.bashrc" ] && [ -n "$BASH_VERSION" ] && . "$HOME/.bashrc"\n'
        f'export PATH="{template.python.parent}:$HOME/.local/bin:$PATH"\n'
    )
    if uid is not None:
        os.chown(profile, uid, uid)


def kernel_argv(template: TemplateInfo, spec: KernelSpec, connection_file: str) -> list[str]:
    argv = [
        a.replace("{python}", str(template.python)).replace("{connection_file}", connection_file) for a in spec.argv
    ]
    if spec.language == "python":
        # History off: nothing to write in the home, and no sqlite lock contention.
        argv += ["--HistoryManager.enabled=False"]
        for f in template.startup_files:
            argv.append(f"--IPKernelApp.exec_files={f}")
    return argv


class AgentKernelProcess:
    """A kernel started by the sandbox's agent (see ``KernelProcess`` in base.py)."""

    def __init__(
        self,
        agent: AgentClient,
        handle: ProcessHandle,
        connection_info: dict[str, Any],
        log_path: Path,
        describe: Callable[[int | None, str], KernelExit],
    ) -> None:
        self._agent = agent
        self._handle = handle
        self.connection_info = connection_info
        self.pid: int | None = handle.pid
        self._log_path = log_path
        self._describe = describe
        self._signals: set[asyncio.Task[None]] = set()

    async def wait(self) -> KernelExit:
        # Shielded: cancelling a waiter must not cancel the shared exit future itself.
        code = await asyncio.shield(self._handle.exited)
        return self._describe(code, _log_tail(self._log_path))

    def signal(self, signum: int) -> None:
        task = asyncio.ensure_future(self._signal(signum))
        self._signals.add(task)
        task.add_done_callback(self._signals.discard)

    async def _signal(self, signum: int) -> None:
        if not self._handle.exited.done():
            with contextlib.suppress(InterpreterError):
                await self._agent.signal(self._handle.pid, signum, group=True)

    async def kill(self) -> None:
        await self._signal(signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                await asyncio.shield(self._handle.exited)


def _agent_gone_exit() -> KernelExit:
    return KernelExit(
        reason="killed", detail="every process of the sandbox ended (its init process exited)", at=time.time()
    )


class LocalRuntime:
    """Sandboxes on this host (see module docstring). Every sandbox starts with its agent
    (``agent.py``); kernels and commands are the agent's children."""

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
            raise RuntimeUnavailable(f"unknown isolation {self.isolation!r}: use 'bwrap' or 'none'")
        log.warning(
            "ISOLATION IS OFF (--isolation none): sandboxes run as plain processes of this service, "
            "as its user, with its network and file system. Run trusted code only."
        )
        self.homes.mkdir(parents=True, exist_ok=True)
        self.run_root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._check_run_root()

    def _check_run_root(self) -> None:
        if len(str(self.run_root)) > _MAX_IPC_PATH - 50:
            raise RuntimeUnavailable(f"run dir {self.run_root} is too long for unix socket paths")

    # -- sandboxes -------------------------------------------------------------------------

    async def create_sandbox(
        self, sandbox_id: str, template: TemplateInfo, limits: Limits, envs: dict[str, str], network: NetworkSpec
    ) -> SandboxHandle:
        if network.internet:
            raise InvalidRequest(
                "outbound network is not available: sandboxes only have their own loopback", field="network"
            )
        handle = await self._prepare(sandbox_id, template, limits, envs)
        try:
            await self.agent(handle)
        except BaseException:
            await self.destroy_sandbox(handle)
            raise
        return handle

    async def _prepare(
        self, sandbox_id: str, template: TemplateInfo, limits: Limits, envs: dict[str, str]
    ) -> SandboxHandle:
        home = self.homes / sandbox_id / "home"
        home.mkdir(parents=True, exist_ok=True, mode=0o700)
        run = self.run_root / sandbox_id
        run.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_profile(home, template)
        return SandboxHandle(sandbox_id, home, template, limits, dict(envs), extra={"run": run})

    async def agent(self, sandbox: SandboxHandle) -> AgentClient:
        """The sandbox's agent, started again if it died (``kill -9 -1`` inside the sandbox
        takes it down with everything else). Called for every kernel start and by the
        commands and files APIs."""
        extra = sandbox.extra
        lock: asyncio.Lock = extra.setdefault("agent_lock", asyncio.Lock())
        async with lock:
            client: AgentClient | None = extra.get("agent")
            if client is not None and not client.closed.is_set():
                return client
            if client is not None:
                log.warning("sandbox %s: its agent exited; starting it again", sandbox.sandbox_id)
            await self._reap_agent(sandbox)
            agent_dir = extra["run"] / "agent"
            self._prepare_agent_dir(sandbox, agent_dir)
            logf = open(extra["run"] / "agent.log", "ab")
            try:
                proc = await self._spawn_agent(sandbox, logf)
            finally:
                logf.close()
            extra["agent_proc"] = proc
            sock = agent_dir / _AGENT_SOCKET
            try:
                deadline = time.monotonic() + self.settings.kernel_start_timeout
                delay = 0.002
                secured = False
                client = None
                while client is None:
                    if sock.exists():
                        if not secured:
                            self._secure_agent_dir(sandbox, agent_dir)
                            secured = True
                        # Bound is not yet listening: ECONNREFUSED for a moment.
                        with contextlib.suppress(ConnectionRefusedError):
                            client = await AgentClient.connect(str(sock))
                            break
                    if proc.returncode is not None or time.monotonic() > deadline:
                        tail = _log_tail(extra["run"] / "agent.log").strip()[-500:]
                        raise KernelStartFailed(f"the sandbox's agent did not start: {tail or 'no output'}")
                    await asyncio.sleep(delay)  # a short back-off while the agent starts
                    delay = min(delay * 1.5, 0.02)
            except BaseException:
                await self._reap_agent(sandbox)
                raise
            extra["agent"] = client
            return client

    def _prepare_agent_dir(self, sandbox: SandboxHandle, agent_dir: Path) -> None:
        shutil.rmtree(agent_dir, ignore_errors=True)
        agent_dir.mkdir(mode=0o700)

    def _secure_agent_dir(self, sandbox: SandboxHandle, agent_dir: Path) -> None:
        return None

    async def _spawn_agent(self, sandbox: SandboxHandle, logf: Any) -> asyncio.subprocess.Process:
        argv = [
            str(sandbox.template.python),
            str(AGENT_SOURCE),
            "--socket",
            str(sandbox.extra["run"] / "agent" / _AGENT_SOCKET),
            "--home",
            str(sandbox.home),
            "--jail",
        ]
        return await asyncio.create_subprocess_exec(
            *argv,
            env=self.process_env(sandbox, {}),
            cwd=str(sandbox.home),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=logf,
            stderr=logf,
            start_new_session=True,
        )

    async def _reap_agent(self, sandbox: SandboxHandle) -> None:
        """Close the connection (the agent then kills what it started and exits) and reap it."""
        client: AgentClient | None = sandbox.extra.pop("agent", None)
        if client is not None:
            await client.close()
        proc: asyncio.subprocess.Process | None = sandbox.extra.pop("agent_proc", None)
        if proc is None:
            return
        try:
            async with asyncio.timeout(10):
                await proc.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()

    def home_in_sandbox(self, sandbox: SandboxHandle) -> str:
        """The home as the sandbox's processes see it."""
        return str(sandbox.home)

    def process_env(self, sandbox: SandboxHandle, envs: dict[str, str]) -> dict[str, str]:
        """The environment of a command in the sandbox: allowlist + template + sandbox + ``envs``."""
        return base_env(sandbox.template, self.home_in_sandbox(sandbox), {**sandbox.envs, **envs})

    # -- kernels ---------------------------------------------------------------------------

    async def start_kernel(
        self, sandbox: SandboxHandle, spec: KernelSpec, name: str, cwd: str | None
    ) -> AgentKernelProcess:
        agent = await self.agent(sandbox)
        host_dir, sandbox_dir = self._kernel_dir(sandbox, name)
        conn = iso.write_ipc_connection(host_dir, sandbox_path=sandbox_dir)
        workdir = self._kernel_cwd(sandbox, cwd)
        env = kernel_env(sandbox.template, spec, self.home_in_sandbox(sandbox), sandbox.envs)
        argv = kernel_argv(sandbox.template, spec, conn.sandbox_file)
        describe = self._describer(sandbox)
        handle = await agent.spawn(argv, env, workdir, log=f"{sandbox_dir}/kernel.log", tag=f"kernel:{name}")
        kernel = AgentKernelProcess(agent, handle, conn.connection_info, host_dir / "kernel.log", describe)
        try:
            await iso.wait_for_ipc_sockets(
                host_dir, timeout=self.settings.kernel_start_timeout, alive=lambda: not handle.exited.done()
            )
            self._secure_kernel_dir(sandbox, host_dir)
        except BaseException as exc:
            await kernel.kill()
            if isinstance(exc, KernelStartFailed):
                raw = _log_tail(host_dir / "kernel.log")
                lines = raw.strip().splitlines()[1 if len(raw) >= _LOG_TAIL_BYTES else 0 :]  # whole lines
                tail = "\n".join(lines[-12:])[-1000:]
                raise KernelStartFailed(f"{exc.message}:\n{tail}" if tail else exc.message) from exc
            raise
        return kernel

    def _kernel_dir(self, sandbox: SandboxHandle, name: str) -> tuple[Path, str]:
        """A fresh directory for one kernel's sockets: (host path, path inside the sandbox)."""
        host = sandbox.extra["run"] / name
        shutil.rmtree(host, ignore_errors=True)
        host.mkdir(mode=0o700)
        return host, str(host)

    def _kernel_cwd(self, sandbox: SandboxHandle, cwd: str | None) -> str:
        resolve_cwd(sandbox.home, cwd)  # refuses paths outside, creates the directory
        return cwd or iso.SANDBOX_HOME

    def _secure_kernel_dir(self, sandbox: SandboxHandle, host_dir: Path) -> None:
        return None

    def _describer(self, sandbox: SandboxHandle) -> Callable[[int | None, str], KernelExit]:
        def describe(code: int | None, log_tail: str) -> KernelExit:
            return _agent_gone_exit() if code is None else describe_exit(code, log_tail)

        return describe

    async def pause(self, sandbox: SandboxHandle) -> None:
        raise Conflict("pause needs isolation 'bwrap' (its cgroup freezer); this service runs with 'none'")

    async def resume(self, sandbox: SandboxHandle) -> None:
        return None

    async def usage(self, sandbox: SandboxHandle) -> SandboxUsage | None:
        return None  # no cgroup and no own file system without isolation

    async def destroy_sandbox(self, sandbox: SandboxHandle) -> None:
        await self._reap_agent(sandbox)
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
        self.agent_file: Path | None = None

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
        # The agent is bound into every sandbox from a root-owned copy the sandbox uids can reach.
        self.agent_file = self.run_root / "agent.py"
        shutil.copyfile(AGENT_SOURCE, self.agent_file)
        os.chmod(self.agent_file, 0o644)

    async def _prepare(
        self, sandbox_id: str, template: TemplateInfo, limits: Limits, envs: dict[str, str]
    ) -> SandboxHandle:
        assert self.tree is not None, "startup() was not called"
        resolved = _Resolved.of(limits, self.settings)
        if template.env_dir is not None:
            _allow_traverse(template.env_dir.parent)
        sandbox_dir = self.homes / sandbox_id
        run = self.run_root / sandbox_id
        uid = self.uids.acquire(sandbox_id)
        extra: dict[str, Any] = {"run": run, "dir": sandbox_dir, "uid": uid, "limits": resolved}
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
            write_profile(handle.home, template, uid)
            iso.write_etc_files(sandbox_dir / "etc")
        except BaseException:
            await self.destroy_sandbox(handle)
            raise
        return handle

    # -- the agent: the sandbox's first process, inside bwrap --------------------------------

    def _prepare_agent_dir(self, sandbox: SandboxHandle, agent_dir: Path) -> None:
        iso.prepare_ipc_dir(agent_dir, sandbox.extra["uid"])

    def _secure_agent_dir(self, sandbox: SandboxHandle, agent_dir: Path) -> None:
        # As for kernels' sockets: once bound, the directory goes back to root, and the socket
        # must be the agent's own (not a symlink the sandbox planted to a host socket).
        os.chown(agent_dir, 0, 0)
        os.chmod(agent_dir, 0o755)
        st = os.lstat(agent_dir / _AGENT_SOCKET)
        if not stat.S_ISSOCK(st.st_mode) or st.st_uid != sandbox.extra["uid"]:
            raise KernelStartFailed("the sandbox's agent socket was replaced")

    async def _spawn_agent(self, sandbox: SandboxHandle, logf: Any) -> asyncio.subprocess.Process:
        assert self.bpf is not None and self.agent_file is not None
        extra = sandbox.extra
        template = sandbox.template
        resolved: _Resolved = extra["limits"]
        binds: list[tuple[Path, str]] = [(self.agent_file, SANDBOX_AGENT)]
        if template.env_dir is not None:
            # the template dir holds the startup (exec) files next to the venv
            binds.append((template.env_dir.parent, str(template.env_dir.parent)))
        cmd = iso.build_bwrap_argv(
            [
                str(template.python),
                SANDBOX_AGENT,
                "--socket",
                f"{iso.SANDBOX_RUN}/agent/{_AGENT_SOCKET}",
                "--home",
                iso.SANDBOX_HOME,
            ],
            home=sandbox.home,
            run_dir=extra["run"],
            etc_dir=extra["dir"] / "etc",
            seccomp=self.bpf,
            template_env=template.env_dir,
            env=self.process_env(sandbox, {}),
            cwd=iso.SANDBOX_HOME,
            tmp_size=self.settings.sandbox_tmp_mb << 20,
            extra_ro_binds=binds,
        )
        rlimits = iso.Rlimits(nofile=resolved.nofile, fsize_bytes=resolved.fsize_mb << 20)
        with cmd.open() as (argv, fds):
            return await asyncio.create_subprocess_exec(
                *argv,
                pass_fds=fds,
                cwd="/",
                env={},
                stdin=asyncio.subprocess.DEVNULL,
                stdout=logf,
                stderr=logf,
                start_new_session=True,
                preexec_fn=iso.make_preexec(extra["cgroup"], extra["uid"], rlimits),
            )

    async def _reap_agent(self, sandbox: SandboxHandle) -> None:
        await super()._reap_agent(sandbox)
        cgroup: iso.Cgroup | None = sandbox.extra.get("cgroup")
        if cgroup is not None and cgroup.pids():
            await cgroup.kill_all()  # anything that outlived the sandbox's pid namespace

    def home_in_sandbox(self, sandbox: SandboxHandle) -> str:
        return iso.SANDBOX_HOME

    # -- kernels -------------------------------------------------------------------------------

    def _kernel_dir(self, sandbox: SandboxHandle, name: str) -> tuple[Path, str]:
        host = iso.prepare_ipc_dir(sandbox.extra["run"] / name, sandbox.extra["uid"])
        return host, f"{iso.SANDBOX_RUN}/{name}"

    def _kernel_cwd(self, sandbox: SandboxHandle, cwd: str | None) -> str:
        return self._sandbox_cwd(sandbox.home, cwd, sandbox.extra["uid"])

    def _secure_kernel_dir(self, sandbox: SandboxHandle, host_dir: Path) -> None:
        iso.hand_back_ipc_dir(host_dir, sandbox.extra["uid"])

    def _describer(self, sandbox: SandboxHandle) -> Callable[[int | None, str], KernelExit]:
        cgroup: iso.Cgroup = sandbox.extra["cgroup"]
        limits: _Resolved = sandbox.extra["limits"]
        before = cgroup.counters()

        def describe(code: int | None, log_tail: str) -> KernelExit:
            after = cgroup.counters()
            reason = iso.death_reason(-9 if code is None else code, before, after)
            if code is None and reason == "killed":
                return _agent_gone_exit()
            return describe_isolated_exit(code, reason, limits, log_tail)

        return describe

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

    async def pause(self, sandbox: SandboxHandle) -> None:
        await sandbox.extra["cgroup"].freeze()

    async def resume(self, sandbox: SandboxHandle) -> None:
        sandbox.extra["cgroup"].thaw()

    async def usage(self, sandbox: SandboxHandle) -> SandboxUsage | None:
        cgroup: iso.Cgroup | None = sandbox.extra.get("cgroup")
        if cgroup is None:
            return None
        u = cgroup.usage()
        out = SandboxUsage(
            memory_bytes=u.memory_bytes, memory_peak_bytes=u.memory_peak_bytes, pids=u.pids, cpu_seconds=u.cpu_seconds
        )
        with contextlib.suppress(OSError):
            st = os.statvfs(sandbox.home)
            out.disk_total_bytes = st.f_blocks * st.f_frsize
            out.disk_used_bytes = (st.f_blocks - st.f_bfree) * st.f_frsize
        return out

    async def destroy_sandbox(self, sandbox: SandboxHandle) -> None:
        extra = sandbox.extra
        cgroup: iso.Cgroup | None = extra.get("cgroup")
        if cgroup is None and self.tree is not None:
            with contextlib.suppress(ValueError):
                cgroup = self.tree.sandbox(sandbox.sandbox_id)
        await LocalRuntime._reap_agent(self, sandbox)
        if cgroup is not None:
            await cgroup.kill_all()
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
    rel = cwd[len("/home/user") :] if cwd.startswith("/home/user") else cwd
    target = (home / rel.lstrip("/")).resolve()
    if target != home.resolve() and home.resolve() not in target.parents:
        raise InvalidRequest(f"cwd {cwd!r} is outside the sandbox home", field="cwd")
    target.mkdir(parents=True, exist_ok=True)
    return str(target)
