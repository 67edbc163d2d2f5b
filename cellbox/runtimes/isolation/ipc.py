"""Socket directories: how the service reaches a sandbox's agent and kernels without a network.

Every socket a sandbox offers (the agent's, and each kernel's five ZMQ ``ipc`` sockets) lives in
a directory of its own under the sandbox's run directory, ``<run dir>/<sandbox id>/<name>``.
The whole run directory is bound at :data:`~cellbox.runtimes.isolation.layout.SANDBOX_RUN`
inside the sandbox, so every process of a sandbox sees every socket directory of that
sandbox (they all run as the sandbox's uid anyway); one directory per start means a restart
always begins with a fresh, empty one.

A socket directory belongs to the sandbox's uid until the sockets are bound
(:func:`prepare_ipc_dir`), then goes back to root (:func:`hand_back_ipc_dir`) before the
service connects, so the sandbox cannot swap a socket for a symlink to a host socket.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cellbox.aio import poll_until
from cellbox.interpreter.errors import KernelStartFailed
from cellbox.runtimes.isolation._fs import check_name
from cellbox.runtimes.isolation.layout import MAX_SOCKET_PATH, SANDBOX_RUN

__all__ = [
    "CONNECTION_FILE",
    "IPC_BASENAME",
    "IPC_PORTS",
    "KERNEL_SOCKETS",
    "IpcConnection",
    "check_socket_paths",
    "hand_back_ipc_dir",
    "prepare_ipc_dir",
    "wait_for_ipc_sockets",
    "write_ipc_connection",
]

#: The connection file's name inside a kernel's socket directory.
CONNECTION_FILE = "kernel.json"
#: The ipc socket base name; ZMQ appends ``-<port>``, so the sockets are ``k-1`` … ``k-5``.
IPC_BASENAME = "k"
IPC_PORTS: dict[str, int] = {"shell_port": 1, "iopub_port": 2, "stdin_port": 3, "control_port": 4, "hb_port": 5}
#: The names of a kernel's five sockets.
KERNEL_SOCKETS: tuple[str, ...] = tuple(f"{IPC_BASENAME}-{port}" for port in sorted(IPC_PORTS.values()))


@dataclass(frozen=True)
class IpcConnection:
    """A kernel's connection over ipc sockets, as the two sides see it.

    ``connection_info`` is for the host client (``ip`` = ``<ipc dir>/k``); ``sandbox_file`` is
    what to pass to ``ipykernel_launcher -f`` (``ip`` = ``<sandbox path>/k``).
    """

    sandbox_file: str
    connection_info: dict[str, Any]


def check_socket_paths(directory: Path, sockets: Sequence[str] = KERNEL_SOCKETS) -> None:
    """ValueError unless every socket of ``sockets`` fits a unix socket path in ``directory``."""
    longest = max(len(name) for name in sockets)
    if len(str(directory)) + 1 + longest > MAX_SOCKET_PATH:
        raise ValueError(f"socket paths under {directory} exceed {MAX_SOCKET_PATH} bytes; use a shorter run_dir")


def prepare_ipc_dir(ipc_dir: Path, uid: int, sockets: Sequence[str] = KERNEL_SOCKETS) -> Path:
    """Make a fresh, empty socket directory, owned by the sandbox uid (0700).

    Called before every start of the agent or a kernel (the process must be able to (re)create
    its sockets; the previous start's directory was handed back to root). ``sockets`` are the
    names that will be bound there (checked against :data:`MAX_SOCKET_PATH`). Parents are
    created root-owned 0711.
    """
    check_name("socket directory name", ipc_dir.name)
    check_socket_paths(ipc_dir, sockets)
    parent = ipc_dir.parent
    parent.mkdir(parents=True, exist_ok=True, mode=0o711)
    os.chmod(parent, 0o711)
    if ipc_dir.exists() or ipc_dir.is_symlink():
        shutil.rmtree(ipc_dir)
    ipc_dir.mkdir(mode=0o700)
    os.chown(ipc_dir, uid, uid)
    return ipc_dir


def write_ipc_connection(
    ipc_dir: Path, *, key: str | None = None, kernel_name: str = "", sandbox_path: str = SANDBOX_RUN
) -> IpcConnection:
    """Write :data:`CONNECTION_FILE` for the kernel (root's, 0666) and return both views.

    ``transport: "ipc"``, ``ip`` ``<sandbox_path>/k``, ports 1..5 (sockets ``k-1`` … ``k-5``), a
    random 256-bit HMAC key. The file holds what ipykernel would write, but ipykernel may still
    rewrite it (see below). Called by ``start_kernel`` after
    :func:`prepare_ipc_dir`. ``sandbox_path`` is where the sandbox sees ``ipc_dir``.
    """
    info: dict[str, Any] = {
        "transport": "ipc",
        "ip": f"{sandbox_path}/{IPC_BASENAME}",
        **IPC_PORTS,
        "key": key or secrets.token_hex(32),
        "signature_scheme": "hmac-sha256",
        "kernel_name": kernel_name,
    }
    host_file = ipc_dir / CONNECTION_FILE
    host_file.write_text(json.dumps(info, indent=1))
    # Root-owned but writable: ipykernel 7 sometimes rewrites the file in place after binding
    # (jupyter_core's secure_write: unlink, which the handed-back directory refuses, then open
    # for writing). Under load the hand-back came first and the kernel died with "Permission
    # denied: kernel.json". Writing it is harmless: the host never reads it back (it keeps
    # ``host_info``), and the sandbox still cannot chmod, replace or unlink it.
    os.chmod(host_file, 0o666)
    host_info = {**info, "ip": str(ipc_dir / IPC_BASENAME)}
    return IpcConnection(f"{sandbox_path}/{CONNECTION_FILE}", host_info)


def _socket_ready(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


async def wait_for_ipc_sockets(
    ipc_dir: Path,
    *,
    timeout: float = 60.0,
    alive: Callable[[], bool] | None = None,
    sockets: Sequence[str] = KERNEL_SOCKETS,
) -> None:
    """Wait until every socket of ``sockets`` is bound in ``ipc_dir``.

    Called by ``start_kernel`` between the spawn and :func:`hand_back_ipc_dir`. ``alive`` (e.g.
    ``lambda: proc.returncode is None``) makes a kernel that died while starting fail at once.
    Raises ``KernelStartFailed`` on death or timeout.
    """
    paths = [ipc_dir / name for name in sockets]
    if await poll_until(lambda: all(_socket_ready(p) for p in paths), timeout=timeout, alive=alive):
        return
    if alive is not None and not alive():
        raise KernelStartFailed("the kernel exited before binding its sockets")
    raise KernelStartFailed(f"the kernel did not bind its sockets within {timeout} s")


def hand_back_ipc_dir(ipc_dir: Path, uid: int | None = None, sockets: Sequence[str] = KERNEL_SOCKETS) -> None:
    """Make the socket directory root:root 0755 once its sockets are bound, and check that
    each socket still is the sandbox's own socket.

    Until then the sandbox owns the directory and could replace a socket with a symlink to a
    host socket, which the host client would follow on (re)connect. After the hand-back it
    cannot rename, replace or add entries. Called after the sockets appeared and **before**
    any client connects. With ``uid``, each of ``sockets`` must be a real socket (not a
    symlink) owned by that uid; otherwise ``KernelStartFailed``.
    """
    os.chown(ipc_dir, 0, 0)
    os.chmod(ipc_dir, 0o755)
    if uid is None:
        return
    for name in sockets:
        path = ipc_dir / name
        try:
            st = os.lstat(path)
        except FileNotFoundError as exc:
            raise KernelStartFailed(f"ipc socket {path.name} is missing") from exc
        if not stat.S_ISSOCK(st.st_mode) or st.st_uid != uid:
            raise KernelStartFailed(f"ipc socket {path.name} was replaced (mode {st.st_mode:o}, uid {st.st_uid})")
