"""The local runtime: sandboxes on the service's own host.

With ``isolation="none"`` each kernel is a plain child process in its own session (so an
interrupt or ``kill -9 -1``-style group signal never reaches the service), with its own home
directory under the data dir and a clean, allowlisted environment. Kernels talk ZMQ over
``ipc`` sockets in a per-sandbox run directory: no kernel ever listens on a host TCP port.
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
from pathlib import Path
from typing import Any

from cellbox.interpreter.config import Settings
from cellbox.interpreter.errors import InvalidRequest, RuntimeUnavailable
from cellbox.interpreter.models import KernelExit, Limits
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
