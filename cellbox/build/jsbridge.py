"""Run a TCP-only Jupyter kernel behind the IPC endpoints cellbox connects to.

Copied into rootfs templates as /opt/cellbox/jsbridge.py and started as the ``javascript``
kernel: ``python jsbridge.py CONNECTION_FILE -- KERNEL ARGV...`` where one argument of the
kernel's argv is ``{tcp_connection_file}``. Deno's kernel (``deno jupyter --kernel``) binds
only TCP; cellbox talks to kernels over IPC sockets in the sandbox's socket directory. The
bridge writes a second connection file with free ports on 127.0.0.1 (the sandbox's own loopback,
in its own network namespace), starts the kernel with it, and relays each channel: shell,
control, stdin and heartbeat from a ROUTER to one DEALER per client (carrying the client's
routing id), iopub through XPUB/XSUB (holding each idle status until iopub is quiet for 10 ms:
Deno can send a cell's last output just after it). Signals (SIGINT, SIGTERM, SIGHUP) are passed
to the kernel (Deno interrupts with a control message, not SIGINT); the bridge exits with the
kernel's status.

Runs on the template's venv (pyzmq comes with ipykernel); no cellbox import.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from typing import Any

import zmq

CHANNELS = ("shell", "control", "stdin", "hb", "iopub")


def _endpoint(info: dict[str, Any], channel: str) -> str:
    port = info[f"{channel}_port"]
    if info.get("transport", "tcp") == "ipc":
        return f"ipc://{info['ip']}-{port}"
    return f"tcp://{info['ip']}:{port}"


def _free_ports(count: int) -> list[int]:
    holders = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            holders.append(s)
        return [s.getsockname()[1] for s in holders]
    finally:
        for s in holders:
            s.close()


# Deno's kernel sometimes publishes a cell's last stdout a fraction of a millisecond *after* its
# "idle" status (seen in 2 of 30 cells, 0.2-0.3 ms late): clients take idle as the end of the cell
# and would drop that output. The relay holds an idle status until iopub has been quiet this long.
IDLE_HOLD = 0.010


def _is_idle(frames: list[bytes]) -> bool:
    try:
        delim = frames.index(b"<IDS|MSG>")
        header = json.loads(frames[delim + 2])
        content = json.loads(frames[delim + 5])
    except (ValueError, IndexError):
        return False
    return bool(header.get("msg_type") == "status" and content.get("execution_state") == "idle")


def _pubsub(ctx: zmq.Context[Any], front: str, back: str, ready: threading.Barrier) -> None:
    """Relay iopub (XPUB/XSUB: subscriptions up, messages down), holding idle statuses (above)."""
    frontend = ctx.socket(zmq.XPUB)
    backend = ctx.socket(zmq.XSUB)
    frontend.linger = backend.linger = 0
    frontend.bind(front)
    backend.connect(back)
    ready.wait()
    poller = zmq.Poller()
    poller.register(frontend, zmq.POLLIN)
    poller.register(backend, zmq.POLLIN)
    held: list[bytes] | None = None
    while True:
        events = dict(poller.poll(int(IDLE_HOLD * 1000) if held is not None else None))
        if frontend in events:
            backend.send_multipart(frontend.recv_multipart())
        if backend in events:
            frames = backend.recv_multipart()
            if _is_idle(frames):
                if held is not None:
                    frontend.send_multipart(held)
                held = frames
            else:
                frontend.send_multipart(frames)  # before a held idle: that is the point
        elif held is not None and frontend not in events:
            frontend.send_multipart(held)
            held = None


def _routers(ctx: zmq.Context[Any], pairs: list[tuple[str, str]], ready: threading.Barrier) -> None:
    """Relay ROUTER channels: each client (routing id) of a front socket gets its own DEALER to
    the kernel with the same routing id, so the kernel sees the client as if it were direct
    (Deno's kernel keeps one identity frame only: a broker's two would be lost)."""
    poller = zmq.Poller()
    fronts: dict[zmq.Socket[Any], str] = {}
    dealers: dict[tuple[zmq.Socket[Any], bytes], zmq.Socket[Any]] = {}
    owner: dict[zmq.Socket[Any], tuple[zmq.Socket[Any], bytes]] = {}
    for front, back in pairs:
        sock = ctx.socket(zmq.ROUTER)
        sock.linger = 0
        sock.bind(front)
        fronts[sock] = back
        poller.register(sock, zmq.POLLIN)
    ready.wait()
    while True:
        for sock, _ in poller.poll():
            if sock in fronts:
                ident, *frames = sock.recv_multipart()
                dealer = dealers.get((sock, ident))
                if dealer is None:
                    dealer = ctx.socket(zmq.DEALER)
                    dealer.linger = 0
                    dealer.setsockopt(zmq.ROUTING_ID, ident)
                    dealer.connect(fronts[sock])
                    dealers[(sock, ident)] = dealer
                    owner[dealer] = (sock, ident)
                    poller.register(dealer, zmq.POLLIN)
                dealer.send_multipart(frames)
            else:
                front_sock, ident = owner[sock]
                front_sock.send_multipart([ident, *sock.recv_multipart()])


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: jsbridge.py CONNECTION_FILE -- KERNEL ARGV ({tcp_connection_file} in it)", file=sys.stderr)
        return 2
    connection_file, kernel_argv = argv[0], argv[2:]
    with open(connection_file) as f:
        outer = json.load(f)
    inner = dict(outer, transport="tcp", ip="127.0.0.1")
    ports = _free_ports(len(CHANNELS))
    for index, channel in enumerate(CHANNELS):  # (no zip(strict=): images may have Python 3.9)
        inner[f"{channel}_port"] = ports[index]
    inner_file = f"{connection_file}.tcp.json"
    fd = os.open(inner_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(inner, f)

    ctx = zmq.Context()
    ready = threading.Barrier(3)
    pairs = [(_endpoint(outer, c), _endpoint(inner, c)) for c in CHANNELS if c != "iopub"]
    threading.Thread(target=_routers, args=(ctx, pairs, ready), daemon=True).start()
    threading.Thread(
        target=_pubsub, args=(ctx, _endpoint(outer, "iopub"), _endpoint(inner, "iopub"), ready), daemon=True
    ).start()
    ready.wait()

    kernel = subprocess.Popen([a.replace("{tcp_connection_file}", inner_file) for a in kernel_argv])

    def forward(signum: int, _frame: object) -> None:
        kernel.send_signal(signum)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, forward)
    status = kernel.wait()
    try:
        os.unlink(inner_file)
    except OSError:
        pass
    return status if status >= 0 else 128 - status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
