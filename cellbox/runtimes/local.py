"""The local runtime: sandboxes on the service's own host.

Every sandbox starts with its agent (``runtimes/agent.py``), the sandbox's first process:
kernels and shell commands are the agent's children, and file operations are its requests.
The service reaches the agent and each kernel over unix sockets in the sandbox's run directory
(``<run dir>/<sandbox id>/<name>/``): no kernel ever listens on a host TCP port.

How a sandbox is confined is a composed strategy (:class:`Isolation`), picked by name from
:data:`ISOLATIONS` and imported only when selected:

* ``"bwrap"`` (:class:`cellbox.runtimes.isolation.strategy.BwrapIsolation`): each sandbox
  gets its own host uid, cgroup (memory, pids, cpu), disk-capped home and rlimits, and **one**
  bubblewrap process with a seccomp filter and no network, whose init is the agent. The
  helpers and their sequence are in :mod:`cellbox.runtimes.isolation`.
* ``"none"`` (:class:`NoIsolation`): the agent is a plain child process of the service in its
  own session (so a group signal such as ``kill -9 -1`` never reaches the service), with its
  own home under the data dir and a clean, allowlisted environment; ``--jail`` keeps its file
  operations in the home. Trusted code only.

Network: a sandbox has only its own loopback. One that asks for egress (``network.internet``,
``allow_out``) gets a proxy of the service's :class:`~cellbox.egress.service.Egress` on a unix
socket in ``<run>/egress/`` (root's), which the agent bridges to ``127.0.0.1:3128`` inside the
sandbox's network namespace; every process gets the proxy variables, the host's CA bundle and
package-index settings (``sbx.trust``). With isolation ``"none"`` the sandbox shares the
service's network: it gets only the CA and index settings, and nothing is enforced.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import posixpath
import shutil
import signal
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

from cellbox.aio import TaskSet, poll_until
from cellbox.egress import bridge as bridge_module
from cellbox.interpreter.errors import Conflict, InterpreterError, InvalidRequest, KernelStartFailed, RuntimeUnavailable
from cellbox.interpreter.models import KernelExit, Limits, NetworkSpec, SandboxUsage
from cellbox.runtimes import agent as agent_module
from cellbox.runtimes import sudo as sudo_module
from cellbox.runtimes.agent_client import AgentClient, ProcessHandle
from cellbox.runtimes.isolation.cgroups import Cgroup
from cellbox.runtimes.isolation.disk import DiskHome
from cellbox.runtimes.isolation.ipc import (
    KERNEL_SOCKETS,
    check_socket_paths,
    wait_for_ipc_sockets,
    write_ipc_connection,
)
from cellbox.runtimes.isolation.layout import MAX_SOCKET_PATH, SANDBOX_HOME
from cellbox.runtimes.specs import KernelProcess, KernelSpec, LocalConfig, TemplateInfo, signal_name

if TYPE_CHECKING:
    from cellbox.egress.policy import SandboxPolicy
    from cellbox.egress.service import Egress, SandboxEgress
    from cellbox.runtimes.isolation.rootfs import RootfsMount
    from cellbox.runtimes.isolation.userns import UserNamespace

__all__ = [
    "ENV_ALLOWLIST",
    "ISOLATIONS",
    "Isolation",
    "LocalRuntime",
    "LocalSandbox",
    "NoIsolation",
    "ResolvedLimits",
    "base_env",
    "describe_exit",
    "resolve_cwd",
    "signal_name",
]

log = logging.getLogger("cellbox.runtime.local")

_LOG_TAIL_BYTES = 2000
# Seconds a process has to exit once told to (its connection closed, or SIGKILL sent) before
# the runtime stops waiting (and kills its whole group).
_REAP_TIMEOUT = 10.0

# Variables a kernel may inherit from the service's environment. Anything else (API keys,
# cloud credentials, ...) stays out: the service's environment is not the sandbox's.
ENV_ALLOWLIST = ("LANG", "LC_ALL", "TZ", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")

# The agent is a single stdlib-only file run by the template's Python inside the sandbox.
AGENT_SOURCE = Path(agent_module.__file__)
# -I: the agent's own directory (cellbox/runtimes, with a types.py) must not shadow the standard
# library, and no PYTHON* variable of the sandbox may change how the agent runs.
AGENT_PYTHON_FLAGS = ("-I",)
AGENT_DIR = "agent"  # its socket directory, next to the kernels' in the sandbox's run dir
AGENT_SOCKET = "a.sock"
# The agent binds "a.sock~" and renames it into place once it listens (see agent.py).
AGENT_SOCKET_NAMES = (AGENT_SOCKET, AGENT_SOCKET + "~")
# The egress bridge (stdlib-only, loaded by the agent) and the proxy's socket directory.
BRIDGE_SOURCE = Path(bridge_module.__file__)
# sudo's client in rootfs sandboxes (stdlib-only, its own small file: each sudo is a new Python).
SUDO_SOURCE = Path(sudo_module.__file__)
EGRESS_DIR = "egress"

# The longest path the runtime puts below its run dir: /<sandbox id>/<dir>/<socket>, with room
# for the core's ids (sb_ + 16 hex digits) and kernel names (8 characters, "-", the restart).
_SOCKET_PATH_ROOM = len("/sb_0123456789abcdef/01234567-9999/" + max(AGENT_SOCKET_NAMES + KERNEL_SOCKETS, key=len))


# -- exits -----------------------------------------------------------------------------------


_SIGNAL_REASONS = {signal.SIGKILL: "killed", signal.SIGSEGV: "segfault", signal.SIGABRT: "aborted"}


def describe_exit(
    returncode: int | None, log_tail: str = "", *, cause: str | None = None, limits: ResolvedLimits | None = None
) -> KernelExit:
    """Turn a process return code into a KernelExit with a human reason.

    ``-N`` (what the agent reports) and ``128+N`` (what bwrap or a shell reports) both mean
    "killed by signal N". ``cause`` (from :func:`cellbox.runtimes.isolation.death_reason`:
    ``oom``, ``pids``, ...) replaces the reason, and with ``limits`` the detail names the
    limit that was hit.
    """
    now = time.time()
    if returncode is None:
        exit_ = KernelExit(reason="unknown", detail=log_tail, at=now)
    elif returncode < 0 or returncode > 128:
        signum = -returncode if returncode < 0 else returncode - 128
        reason = _SIGNAL_REASONS.get(signum, "signal")  # type: ignore[call-overload]  # Signals is an IntEnum
        exit_ = KernelExit(signal=signum, reason=reason, detail=f"killed by {signal_name(signum)}", at=now)
    else:
        detail = f"exited with status {returncode}"
        if log_tail:
            detail += ": " + log_tail.strip().splitlines()[-1][:300]
        exit_ = KernelExit(exit_code=returncode, reason="exited", detail=detail, at=now)
    if cause is None:
        return exit_
    detail = exit_.detail
    if cause == "oom" and limits is not None:
        detail = f"out of memory: the sandbox's {limits.memory_mb} MiB memory limit was reached"
    elif cause == "pids" and limits is not None:
        detail = f"{detail}, after hitting the sandbox's limit of {limits.pids} processes and threads"
    return exit_.model_copy(update={"reason": cause, "detail": detail})


def agent_gone_exit() -> KernelExit:
    """How a kernel ended when the sandbox's agent (its init) went, taking everything along."""
    return KernelExit(
        reason="killed", detail="every process of the sandbox ended (its init process exited)", at=time.time()
    )


# -- environment, files, argv ----------------------------------------------------------------


def base_env(
    template: TemplateInfo,
    home: str,
    envs: dict[str, str],
    kernel: dict[str, str] | None = None,
    trust: dict[str, str] | None = None,
) -> dict[str, str]:
    """The environment of a sandbox process: allowlist + ``trust`` (the egress proxy, CA and
    package-index variables) + template + ``kernel`` + ``envs``. An empty value removes the
    variable."""
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
    env.update(trust or {})
    env.update(template.env)
    env.update(kernel or {})
    env.update(envs)
    return {k: v for k, v in env.items() if v != ""}


def write_profile(home: Path, template: TemplateInfo, uid: int | None = None) -> None:
    """A default ``~/.profile``: commands run as ``bash -lc``, and a login shell's
    /etc/profile resets PATH, so the template's tools (python3, pip) come first again here.
    Left alone if the sandbox's home already has one. Blocking."""
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


def write_user_pip_config(home: Path, template: TemplateInfo, uid: int) -> None:
    """Isolated sandboxes: the template's environment is read-only, so ``pip install`` goes to
    the home's ``~/.local/lib/pythonX.Y/site-packages`` (the template's interpreter puts it first
    on sys.path, see ``templates.add_user_packages_path``) through a user pip.conf. Blocking."""
    if template.env_dir is None:
        return
    versions = sorted(p.name for p in (template.env_dir / "lib").glob("python3*"))
    if not versions:
        return
    rel = Path(".local") / "lib" / versions[-1] / "site-packages"
    made = [
        home / p for p in (".local", ".local/lib", f".local/lib/{versions[-1]}", str(rel), ".config", ".config/pip")
    ]
    for d in made:
        d.mkdir(exist_ok=True)
    conf = home / ".config" / "pip" / "pip.conf"
    if not conf.exists():
        conf.write_text(
            f"# Written by cellbox: the template is read-only; installs go to your home.\n"
            f"[install]\ntarget = {SANDBOX_HOME}/{rel}\n"
        )
        made.append(conf)
    for path in made:
        os.chown(path, uid, uid)


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


def resolve_cwd(home: Path, cwd: str | None) -> str:
    """Map a sandbox path (``/home/user/x`` or relative ``x``) to the host directory under
    ``home``; InvalidRequest for paths outside the home. Creates nothing (the agent makes a
    missing working directory, as the sandbox's user)."""
    if not cwd:
        return str(home)
    rel = cwd[len(SANDBOX_HOME) :] if cwd.startswith(SANDBOX_HOME) else cwd
    target = (home / rel.lstrip("/")).resolve()
    if target != home.resolve() and home.resolve() not in target.parents:
        raise InvalidRequest(f"cwd {cwd!r} is outside the sandbox home", field="cwd")
    return str(target)


def _sandbox_cwd(home: Path, cwd: str | None, template: TemplateInfo | None = None) -> str:
    """A kernel's working directory as a sandbox path (``/home/user/...``). A rootfs sandbox's
    whole tree is its own: any absolute path there, relative ones from the home, and the
    template's ``workdir`` when none is given."""
    if template is not None and template.rootfs is not None:
        if not cwd:
            return template.workdir or SANDBOX_HOME
        return posixpath.normpath(cwd if cwd.startswith("/") else f"{SANDBOX_HOME}/{cwd}")
    if not cwd:
        return SANDBOX_HOME
    rel = Path(resolve_cwd(home, cwd)).relative_to(home.resolve())
    return SANDBOX_HOME if str(rel) == "." else f"{SANDBOX_HOME}/{rel}"


def _log_tail(path: Path) -> str:
    """The end of a log file that sandbox code may have replaced (a kernel's log sits in its
    socket directory, the sandbox's until it is handed back): never through a symlink, never a
    FIFO or device (that would block the service), never a second name of another file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return ""
    with open(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            return ""
        try:
            f.seek(max(0, st.st_size - _LOG_TAIL_BYTES))
            return f.read(_LOG_TAIL_BYTES).decode(errors="replace")
        except OSError:
            return ""


# -- per-sandbox state -----------------------------------------------------------------------


@dataclass(frozen=True)
class ResolvedLimits:
    """A sandbox's limits with the service defaults filled in."""

    memory_mb: int
    cpu: float
    pids: int
    disk_mb: int
    nofile: int
    fsize_mb: int

    @classmethod
    def of(cls, limits: Limits, config: LocalConfig) -> ResolvedLimits:
        return cls(
            memory_mb=limits.memory_mb or config.default_memory_mb,
            cpu=limits.cpu or config.default_cpu,
            pids=limits.pids or config.default_pids,
            disk_mb=limits.disk_mb or config.default_disk_mb,
            nofile=limits.nofile or config.default_nofile,
            fsize_mb=limits.fsize_mb or config.default_fsize_mb,
        )


@dataclass
class LocalSandbox:
    """What the local runtime keeps for one sandbox. Made by :meth:`LocalRuntime.create_sandbox`;
    the isolation fills in its part in :meth:`Isolation.prepare`."""

    sandbox_id: str
    template: TemplateInfo
    limits: Limits
    envs: dict[str, str]  # the sandbox's own variables, for every process started from now on
    resolved: ResolvedLimits
    dir: Path  # <data dir>/sandboxes/<id>: the home (and its image), /etc files
    home: Path  # the sandbox's /home/user, as a host path
    run: Path  # <run dir>/<id>: the agent's and the kernels' socket directories, agent.log
    # isolation "bwrap": the sandbox's host uid (its ``user``'s), cgroup and disk-backed home
    uid: int | None = None
    cgroup: Cgroup | None = None
    disk: DiskHome | None = None
    # rootfs templates: the host uid of root inside (the first of its range), its user
    # namespace and its overlay root
    root_uid: int | None = None
    userns: UserNamespace | None = None
    rootfs: RootfsMount | None = None
    default_user: tuple[int, int] | None = None  # (uid, gid) inside of its processes and files
    # the agent (see LocalRuntime.agent)
    agent: AgentClient | None = None
    agent_proc: asyncio.subprocess.Process | None = None
    agent_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # the sandbox's egress (its proxy, when it has one) and the variables every process gets
    egress: SandboxEgress | None = None
    trust_env: dict[str, str] = field(default_factory=dict)

    def egress_args(self, socket_in_sandbox: str) -> list[str]:
        """The agent's bridge options when the sandbox has a proxy, else none."""
        egress = self.egress
        if egress is None or egress.proxy is None or egress.bridge_port is None:
            return []
        return ["--egress-socket", socket_in_sandbox, "--egress-port", str(egress.bridge_port)]


# -- isolation strategies --------------------------------------------------------------------


class Isolation(Protocol):
    """How the local runtime confines a sandbox. Only :class:`LocalRuntime` calls these, in
    the order of the method list; every method that touches many files or runs a tool is
    async (and keeps blocking work off the event loop)."""

    name: str

    def __init__(self, config: LocalConfig) -> None: ...

    async def startup(self) -> None:
        """Once, from :meth:`LocalRuntime.startup`: make the homes and run dirs, check the host
        (RuntimeUnavailable), reap leftovers of an earlier run."""
        ...

    async def prepare(self, sandbox: LocalSandbox) -> None:
        """From ``create_sandbox``: make the sandbox's home and run dir and whatever confines it,
        filling in ``sandbox``. On failure the runtime calls :meth:`teardown`."""
        ...

    def home_in_sandbox(self, sandbox: LocalSandbox) -> str:
        """The home as the sandbox's processes see it (their ``HOME``)."""
        ...

    def socket_dir(self, sandbox: LocalSandbox, name: str, sockets: Sequence[str]) -> tuple[Path, str]:
        """A fresh, empty directory ``<run>/<name>`` in which the sandbox will bind ``sockets``,
        before each start of the agent (name ``agent``) or a kernel: (host path, sandbox path)."""
        ...

    def secure_socket_dir(self, sandbox: LocalSandbox, host_dir: Path, sockets: Sequence[str]) -> None:
        """Once ``sockets`` are bound and before the service connects: take the directory
        back from the sandbox; KernelStartFailed if a socket was replaced."""
        ...

    async def spawn_agent(
        self, sandbox: LocalSandbox, socket: str, env: dict[str, str], log: IO[bytes]
    ) -> asyncio.subprocess.Process:
        """Start the sandbox's agent (its init) listening on ``socket`` (a sandbox path), with
        ``env``, its output into ``log``. From :meth:`LocalRuntime.agent`."""
        ...

    def exit_describer(self, sandbox: LocalSandbox) -> Callable[[int | None, str], KernelExit]:
        """Called as a kernel starts: a function that explains its exit (code, log tail);
        ``None`` for the code means the agent went away."""
        ...

    async def usage(self, sandbox: LocalSandbox) -> SandboxUsage | None: ...

    async def pause(self, sandbox: LocalSandbox) -> None:
        """Freeze every process of the sandbox; Conflict where this isolation cannot."""
        ...

    async def resume(self, sandbox: LocalSandbox) -> None: ...

    async def kill_leftovers(self, sandbox: LocalSandbox) -> None:
        """Before the agent starts again: kill whatever outlived the previous one."""
        ...

    async def teardown(self, sandbox: LocalSandbox) -> None:
        """From ``destroy_sandbox``, after the agent was reaped: kill what is left and free
        what :meth:`prepare` took (the runtime deletes the directories afterwards). Idempotent,
        and works on a sandbox whose :meth:`prepare` failed halfway."""
        ...

    async def shutdown(self) -> None:
        """Once, when the service stops, after every sandbox was destroyed."""
        ...


class NoIsolation:
    """``isolation="none"``: sandboxes as plain processes of the service (module docstring)."""

    name = "none"

    def __init__(self, config: LocalConfig) -> None:
        self.config = config

    async def startup(self) -> None:
        log.warning(
            "ISOLATION IS OFF (--isolation none): sandboxes run as plain processes of this service, "
            "as its user, with its network and file system. Run trusted code only."
        )
        self.config.homes.mkdir(parents=True, exist_ok=True)
        self.config.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    async def prepare(self, sandbox: LocalSandbox) -> None:
        if sandbox.template.rootfs is not None:
            raise RuntimeUnavailable(
                f"template {sandbox.template.name!r} is a root file system: it needs isolation 'bwrap' (root and "
                "bubblewrap); this service runs with 'none'"
            )

        def make() -> None:
            sandbox.home.mkdir(parents=True, exist_ok=True, mode=0o700)
            sandbox.run.mkdir(parents=True, exist_ok=True, mode=0o700)
            write_profile(sandbox.home, sandbox.template)

        await asyncio.to_thread(make)

    def home_in_sandbox(self, sandbox: LocalSandbox) -> str:
        return str(sandbox.home)

    def socket_dir(self, sandbox: LocalSandbox, name: str, sockets: Sequence[str]) -> tuple[Path, str]:
        host = sandbox.run / name
        check_socket_paths(host, sockets)
        shutil.rmtree(host, ignore_errors=True)
        host.mkdir(mode=0o700)
        return host, str(host)

    def secure_socket_dir(self, sandbox: LocalSandbox, host_dir: Path, sockets: Sequence[str]) -> None:
        return None  # the sandbox runs as the service's own user: nothing to take back

    async def spawn_agent(
        self, sandbox: LocalSandbox, socket: str, env: dict[str, str], log: IO[bytes]
    ) -> asyncio.subprocess.Process:
        python = str(sandbox.template.python)
        argv = [python, *AGENT_PYTHON_FLAGS, str(AGENT_SOURCE), "--socket", socket, "--home", str(sandbox.home)]
        return await asyncio.create_subprocess_exec(
            *argv,
            "--jail",
            env=env,
            cwd=str(sandbox.home),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )

    def exit_describer(self, sandbox: LocalSandbox) -> Callable[[int | None, str], KernelExit]:
        def describe(code: int | None, log_tail: str) -> KernelExit:
            return agent_gone_exit() if code is None else describe_exit(code, log_tail)

        return describe

    async def usage(self, sandbox: LocalSandbox) -> SandboxUsage | None:
        return None  # no cgroup and no own file system without isolation

    async def pause(self, sandbox: LocalSandbox) -> None:
        raise Conflict("pause needs isolation 'bwrap' (its cgroup freezer); this service runs with 'none'")

    async def resume(self, sandbox: LocalSandbox) -> None:
        return None

    async def kill_leftovers(self, sandbox: LocalSandbox) -> None:
        return None  # the agent killed its process groups; without a cgroup nothing else is known

    async def teardown(self, sandbox: LocalSandbox) -> None:
        return None

    async def shutdown(self) -> None:
        return None


#: Isolation strategies by name (the ``isolation`` setting), imported only when selected.
ISOLATIONS: dict[str, str] = {
    "none": "cellbox.runtimes.local:NoIsolation",
    "bwrap": "cellbox.runtimes.isolation.strategy:BwrapIsolation",
}


def load_isolation(config: LocalConfig) -> Isolation:
    """The strategy ``config.isolation`` names; RuntimeUnavailable for an unknown name."""
    target = ISOLATIONS.get(config.isolation)
    if target is None:
        known = "', '".join(sorted(ISOLATIONS))
        raise RuntimeUnavailable(f"unknown isolation {config.isolation!r}: use '{known}'")
    module_name, _, cls_name = target.partition(":")
    cls: type[Isolation] = getattr(importlib.import_module(module_name), cls_name)
    return cls(config)


# -- kernels ---------------------------------------------------------------------------------


class AgentKernelProcess:
    """A kernel started by the sandbox's agent (see ``KernelProcess`` in types.py)."""

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
        self._signals = TaskSet("kernel signals")

    async def wait(self) -> KernelExit:
        # Shielded: cancelling a waiter must not cancel the shared exit future itself.
        code = await asyncio.shield(self._handle.exited)
        return self._describe(code, _log_tail(self._log_path))

    def signal(self, signum: int) -> None:
        self._signals.spawn(self._signal(signum), name=f"signal-{signum}")

    async def _signal(self, signum: int) -> None:
        if not self._handle.exited.done():
            with contextlib.suppress(InterpreterError):  # it exited meanwhile, or the agent went
                await self._agent.signal(self._handle.pid, signum, group=True)

    async def kill(self) -> None:
        await self._signal(signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_REAP_TIMEOUT):
                await asyncio.shield(self._handle.exited)


# -- the runtime -----------------------------------------------------------------------------


class LocalRuntime:
    """Sandboxes on this host (see the module docstring). ``isolation`` is the strategy's name;
    the strategy itself is :attr:`strategy`."""

    name = "local"

    def __init__(self, config: LocalConfig, egress: Egress | None = None) -> None:
        self.config = config
        self.egress = egress
        self.strategy: Isolation = load_isolation(config)
        self.isolation: str = self.strategy.name

    async def startup(self) -> None:
        """Once, before any sandbox: RuntimeUnavailable when this host cannot run the chosen
        isolation (or the run dir is too long for unix socket paths)."""
        if len(str(self.config.run_dir)) + _SOCKET_PATH_ROOM > MAX_SOCKET_PATH:
            raise RuntimeUnavailable(
                f"run dir {self.config.run_dir} is too long for unix socket paths "
                f"(at most {MAX_SOCKET_PATH - _SOCKET_PATH_ROOM} characters)"
            )
        await self.strategy.startup()

    async def shutdown(self) -> None:
        await self.strategy.shutdown()

    # -- sandboxes -------------------------------------------------------------------------

    async def create_sandbox(
        self, sandbox_id: str, template: TemplateInfo, limits: Limits, envs: dict[str, str], network: NetworkSpec
    ) -> LocalSandbox:
        """Provision a sandbox (with its egress, see the module docstring) and start its agent;
        no kernel yet. InvalidRequest for a network spec beyond the service's policy, or any
        outbound network when the runtime was made without an Egress."""
        policy = None
        if self.egress is not None:
            policy = self.egress.parse(network)
        elif network.internet or network.allow_out:
            raise InvalidRequest(
                "outbound network is not available: sandboxes only have their own loopback", field="network"
            )
        sandbox_dir = self.config.homes / sandbox_id
        sandbox = LocalSandbox(
            sandbox_id=sandbox_id,
            template=template,
            limits=limits,
            envs=dict(envs),
            resolved=ResolvedLimits.of(limits, self.config),
            dir=sandbox_dir,
            home=sandbox_dir / "home",
            run=self.config.run_dir / sandbox_id,
        )
        try:
            await self.strategy.prepare(sandbox)
            if self.egress is not None and policy is not None:
                await self._open_egress(sandbox, self.egress, policy)
            await self.agent(sandbox)
        except BaseException:
            await self.destroy_sandbox(sandbox)
            raise
        return sandbox

    async def _open_egress(self, sandbox: LocalSandbox, egress: Egress, policy: SandboxPolicy) -> None:
        if self.strategy.name == "none":
            # The sandbox shares the service's network: a proxy would enforce nothing (a process
            # may just ignore it). It gets the CA bundle and the host's package indexes only.
            from cellbox.egress.hosttrust import sandbox_trust

            trust = sandbox_trust(egress.host, None)
            if policy.wants_egress:
                trust.env.pop("PIP_RETRIES", None)
                log.warning(
                    "sandbox %s: isolation 'none': its network policy is not enforced (it uses the host's network "
                    "directly)",
                    sandbox.sandbox_id,
                )
            sandbox.trust_env = trust.env
            return
        egress_dir = sandbox.run / EGRESS_DIR

        def make() -> None:
            # root's and not writable by the sandbox: it cannot replace the proxy's socket.
            egress_dir.mkdir(mode=0o755, exist_ok=True)
            os.chmod(egress_dir, 0o755)

        await asyncio.to_thread(make)
        sandbox.egress = await egress.open(sandbox.sandbox_id, policy, egress_dir)
        sandbox.trust_env = dict(sandbox.egress.trust.env)

    async def destroy_sandbox(self, handle: LocalSandbox) -> None:
        """Stop the agent (it kills what it started), then everything left; close its egress
        proxy; free the uid, cgroup and home. Idempotent."""
        await self._stop_agent(handle)
        if self.egress is not None:
            await self.egress.close(handle.sandbox_id)
            handle.egress = None
        await self.strategy.teardown(handle)
        await asyncio.to_thread(shutil.rmtree, handle.run, True)
        await asyncio.to_thread(shutil.rmtree, handle.dir, True)

    async def pause(self, handle: LocalSandbox) -> None:
        await self.strategy.pause(handle)

    async def resume(self, handle: LocalSandbox) -> None:
        await self.strategy.resume(handle)

    async def usage(self, handle: LocalSandbox) -> SandboxUsage | None:
        return await self.strategy.usage(handle)

    def home_in_sandbox(self, handle: LocalSandbox) -> str:
        """The home as the sandbox's processes see it."""
        return self.strategy.home_in_sandbox(handle)

    def process_env(self, handle: LocalSandbox, envs: dict[str, str]) -> dict[str, str]:
        """The environment of a command in the sandbox: allowlist + trust + template + sandbox +
        ``envs``."""
        return base_env(handle.template, self.home_in_sandbox(handle), {**handle.envs, **envs}, trust=handle.trust_env)

    # -- the agent -------------------------------------------------------------------------

    async def agent(self, handle: LocalSandbox) -> AgentClient:
        """The sandbox's agent, started again if it died (``kill -9 -1`` inside the sandbox
        takes it down with everything else). Called for every kernel start and by the
        commands and files APIs. KernelStartFailed when it does not come up."""
        async with handle.agent_lock:
            client = handle.agent
            if client is not None and not client.closed.is_set():
                return client
            if client is not None:
                log.warning("sandbox %s: its agent exited; starting it again", handle.sandbox_id)
            await self._stop_agent(handle)
            await self.strategy.kill_leftovers(handle)
            host_dir, sandbox_dir = self.strategy.socket_dir(handle, AGENT_DIR, AGENT_SOCKET_NAMES)
            agent_log = await asyncio.to_thread(open, handle.run / "agent.log", "ab")
            try:
                proc = await self.strategy.spawn_agent(
                    handle, f"{sandbox_dir}/{AGENT_SOCKET}", self.process_env(handle, {}), agent_log
                )
            finally:
                agent_log.close()  # the agent has its own copy
            handle.agent_proc = proc
            try:
                socket = host_dir / AGENT_SOCKET
                # The socket appears once the agent listens (agent.py renames it into place).
                started = await poll_until(
                    socket.exists, timeout=self.config.kernel_start_timeout, alive=lambda: proc.returncode is None
                )
                if not started:
                    tail = _log_tail(handle.run / "agent.log").strip()[-500:]
                    raise KernelStartFailed(f"the sandbox's agent did not start: {tail or 'no output'}")
                self.strategy.secure_socket_dir(handle, host_dir, (AGENT_SOCKET,))
                handle.agent = await AgentClient.connect(str(socket))
            except BaseException:
                await self._stop_agent(handle)
                raise
            return handle.agent

    async def _stop_agent(self, handle: LocalSandbox) -> None:
        """Close the connection (the agent then kills what it started and exits) and reap it."""
        client, handle.agent = handle.agent, None
        if client is not None:
            await client.close()
        proc, handle.agent_proc = handle.agent_proc, None
        if proc is None:
            return
        try:
            async with asyncio.timeout(_REAP_TIMEOUT):
                await proc.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()

    # -- kernels ---------------------------------------------------------------------------

    async def start_kernel(self, handle: LocalSandbox, spec: KernelSpec, name: str, cwd: str | None) -> KernelProcess:
        """Start a kernel as a child of the sandbox's agent and return once its sockets are
        bound (not yet answering: the kernel session waits for that). KernelStartFailed, with
        the end of the kernel's log, when it dies or does not bind in time; InvalidRequest for
        a ``cwd`` outside the home."""
        agent = await self.agent(handle)
        workdir = _sandbox_cwd(handle.home, cwd, handle.template)
        host_dir, sandbox_dir = self.strategy.socket_dir(handle, name, KERNEL_SOCKETS)
        conn = write_ipc_connection(host_dir, sandbox_path=sandbox_dir)
        # ipykernel rewrites its connection file after binding whenever it finds something to
        # "update"; the socket directory may be handed back to root by then, so the file is
        # world-writable (see ``write_ipc_connection``) and ipykernel must accept that mode.
        kernel_vars = {"JUPYTER_ALLOW_INSECURE_WRITES": "1", **spec.env}
        env = base_env(handle.template, self.home_in_sandbox(handle), handle.envs, kernel_vars, trust=handle.trust_env)
        argv = kernel_argv(handle.template, spec, conn.sandbox_file)
        describe = self.strategy.exit_describer(handle)
        proc = await agent.spawn(argv, env, workdir, log=f"{sandbox_dir}/kernel.log", tag=f"kernel:{name}")
        kernel = AgentKernelProcess(agent, proc, conn.connection_info, host_dir / "kernel.log", describe)
        try:
            await wait_for_ipc_sockets(
                host_dir, timeout=self.config.kernel_start_timeout, alive=lambda: not proc.exited.done()
            )
            self.strategy.secure_socket_dir(handle, host_dir, KERNEL_SOCKETS)
        except BaseException as exc:
            await kernel.kill()
            if isinstance(exc, KernelStartFailed):
                raw = _log_tail(host_dir / "kernel.log")
                lines = raw.strip().splitlines()[1 if len(raw) >= _LOG_TAIL_BYTES else 0 :]  # whole lines
                tail = "\n".join(lines[-12:])[-1000:]
                raise KernelStartFailed(f"{exc.message}:\n{tail}" if tail else exc.message) from exc
            raise
        return kernel
