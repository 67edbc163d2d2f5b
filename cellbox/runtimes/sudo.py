"""``sudo`` inside a rootfs sandbox: a small stdlib-only client of the sandbox's agent.

Bound read-only at ``/opt/cellbox/sudo.py`` (like the agent and the egress bridge) and run by
the template's Python from ``/usr/local/bin/sudo`` (``python -I -S``: no site, no user
variables; the standard library only). It passes its argv, cwd, environment and its
stdin/stdout/stderr (SCM_RIGHTS) to the agent over the abstract unix socket
:data:`SUDO_SOCKET` (private to the sandbox's network namespace), which runs the command as
root and answers its exit status: no_new_privs makes a setuid sudo inert. When stdin is a
terminal (and sudo is in its foreground), the command gets a terminal of its own, and this
client relays the caller's to it in raw mode until the command ends (sudo's ``use_pty``). The
agent side is ``SudoServer`` in :mod:`cellbox.runtimes.agent`.

Its own file, not the agent's: every ``sudo`` is a new interpreter, and importing the agent
(asyncio, ctypes, the whole service side) was most of a call's time.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pwd
import signal
import socket
import sys
import termios
import time

#: The agent's sudo socket (``SUDO_SOCKET`` of agent.py; a unit test keeps them equal).
SUDO_SOCKET = "\0cellbox-sudo"
#: root's PATH (Debian's sudo secure_path; ``ROOT_PATH`` of agent.py).
ROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

_SUDO_KEEP = (
    "TERM", "COLORTERM", "LANG", "LANGUAGE", "DISPLAY", "TZ", "PYTHONUNBUFFERED",
    "http_proxy", "https_proxy", "no_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY",
    "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS",
)  # fmt: skip
_SUDO_USAGE = "usage: sudo [-EHinsS] [-u user] [VAR=value] [-i | -s | command [arg ...]]"


def sudo_main(args: list[str]) -> int:
    """``sudo`` in a rootfs sandbox: run a command as root (or ``-u user``) through the agent.

    Options: ``-E``/``--preserve-env`` (keep the whole environment; default: a reset one that
    keeps the terminal, locale, proxy and CA variables, with root's HOME and PATH), ``-u
    USER``, ``-i`` (login shell), ``-s`` (shell), ``VAR=value`` before the command; ``-n``,
    ``-H``, ``-S``, ``-k`` are accepted and ignored (no password is ever asked); ``-v``,
    ``-K`` succeed; ``-l`` lists the one rule. Exits with the command's status (128 + N when
    signal N ended it)."""
    preserve = login = shell = False
    target = "root"
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--":
            i += 1
            break
        if a in ("-h", "--help"):
            print(_SUDO_USAGE)
            return 0
        if a in ("-V", "--version"):
            print("cellbox sudo: runs commands as root through the sandbox's agent")
            return 0
        if a.startswith("--preserve-env"):
            preserve = True
        elif a.startswith("--user="):
            target = a.split("=", 1)[1]
        elif a == "--user" and i + 1 < len(args):
            i += 1
            target = args[i]
        elif a == "--login":
            login = True
        elif a == "--shell":
            shell = True
        elif a in ("--non-interactive", "--set-home", "--stdin", "--reset-timestamp"):
            pass
        elif a.startswith("-") and len(a) > 1 and not a.startswith("--"):
            flags = a[1:]
            for j, c in enumerate(flags):
                if c in "ug":
                    value = flags[j + 1 :]
                    if not value:
                        if i + 1 >= len(args):
                            print(f"sudo: option requires an argument -- '{c}'\n{_SUDO_USAGE}", file=sys.stderr)
                            return 1
                        i += 1
                        value = args[i]
                    if c == "u":
                        target = value[1:] if value.startswith("#") else value
                    break
                if c == "E":
                    preserve = True
                elif c == "i":
                    login = True
                elif c == "s":
                    shell = True
                elif c in "vKl":
                    if c == "l":
                        print("User may run the following commands on this sandbox:\n    (ALL : ALL) NOPASSWD: ALL")
                    return 0
                elif c not in "nHSkAbP":
                    print(f"sudo: invalid option -- '{c}'\n{_SUDO_USAGE}", file=sys.stderr)
                    return 1
        else:
            break
        i += 1
    cmd = args[i:]
    env = (
        dict(os.environ)
        if preserve
        else {k: v for k, v in os.environ.items() if k in _SUDO_KEEP or k.startswith(("LC_", "PIP_"))}
    )
    while cmd and "=" in cmd[0] and not cmd[0].startswith("="):
        key, _, value = cmd.pop(0).partition("=")
        env[key] = value
    try:
        entry = pwd.getpwuid(int(target)) if target.isdigit() else pwd.getpwnam(target)
    except (KeyError, ValueError):
        print(f"sudo: unknown user {target}", file=sys.stderr)
        return 1
    if login or shell:
        sh = entry.pw_shell or "/bin/sh"
        cmd = ([sh, "-l"] if login else [sh]) + (["-c", " ".join(cmd)] if cmd else [])
    if not cmd:
        print(_SUDO_USAGE, file=sys.stderr)
        return 1
    caller = pwd.getpwuid(os.getuid()).pw_name if _has_uid(os.getuid()) else str(os.getuid())
    env.update({"SUDO_USER": caller, "SUDO_UID": str(os.getuid()), "SUDO_GID": str(os.getgid())})
    env["SUDO_COMMAND"] = " ".join(cmd)[:4096]
    if not preserve:
        env.update({"HOME": entry.pw_dir, "USER": entry.pw_name, "LOGNAME": entry.pw_name, "SHELL": entry.pw_shell})
        path = ROOT_PATH.split(":")
        env["PATH"] = ":".join(path + [p for p in os.environ.get("PATH", "").split(":") if p and p not in path])
    try:
        cwd = os.getcwd()
    except OSError:
        cwd = "/"
    if os.geteuid() == entry.pw_uid == 0:  # already root: nothing to ask
        # Python ignores SIGPIPE and SIGXFSZ, and exec keeps what is ignored: the command gets
        # the defaults back (else `sudo yes | head -1` as root ends in "Broken pipe")
        for signum in (signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(signum, signal.SIG_DFL)
        try:
            os.chdir(cwd)
            os.execvpe(cmd[0], cmd, env)
        except OSError as exc:
            print(f"sudo: {cmd[0]}: {exc.strerror}", file=sys.stderr)
            return 127 if isinstance(exc, FileNotFoundError) else 126
    return _sudo_request({"argv": cmd, "cwd": cwd, "env": env, "user": entry.pw_name})


def _has_uid(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


def _sudo_request(request: dict[str, object]) -> int:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(SUDO_SOCKET)
    except OSError as exc:
        print(
            f"sudo: the sandbox's agent does not answer ({exc.strerror}); sudo needs a rootfs sandbox", file=sys.stderr
        )
        return 1
    fds, opened = [], []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
            fds.append(fd)
        except OSError:
            opened.append(os.open(os.devnull, os.O_RDWR))
            fds.append(opened[-1])
    use_pty = _foreground_terminal()
    if use_pty:
        request["pty"] = True
    payload = json.dumps(request).encode() + b"\n"
    sent = socket.send_fds(sock, [payload], fds)
    if sent < len(payload):
        sock.sendall(payload[sent:])
    for fd in opened:
        os.close(fd)

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(OSError):
            sock.sendall(json.dumps({"signal": signum}).encode() + b"\n")

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, forward)
    data = b""
    if use_pty:
        data, got, _flags, _addr = socket.recv_fds(sock, 65536, 1)
        if got:  # the command's own terminal: relay the caller's to it until the command ends
            _, _, data = data.partition(b"\n")  # the {"pty": true} line
            data = _relay_terminal(sock, got[0], data)
    while not data.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            print("sudo: the sandbox's agent went away", file=sys.stderr)
            return 1
        data += chunk
    reply = json.loads(data.splitlines()[-1])
    if "error" in reply:
        print(f"sudo: {reply['error']}", file=sys.stderr)
        return 1
    code = int(reply["returncode"])
    return 128 - code if code < 0 else code


def _foreground_terminal() -> bool:
    """Whether sudo's stdin is a terminal it may take over (raw mode) while the command runs:
    a terminal, and not one whose foreground job is another (``sudo cmd &``)."""
    if not os.isatty(0):
        return False
    try:
        return os.tcgetpgrp(0) == os.getpgrp()
    except OSError:  # a terminal, but not this session's controlling one: nobody else's job
        return True


def _relay_terminal(sock: socket.socket, master: int, data: bytes) -> bytes:
    """Copy the caller's terminal (stdin, in raw mode meanwhile) to the command's terminal
    ``master`` and its output back, keep its size the caller's, until the agent's reply line
    arrives on ``sock``; then the output still buffered is read out. Returns what was read
    from ``sock`` (``data`` first)."""
    import select
    import tty

    out = next((fd for fd in (1, 2) if os.isatty(fd)), 0)
    saved = termios.tcgetattr(0)

    def winch(_signum: int = 0, _frame: object = None) -> None:
        with contextlib.suppress(OSError):
            fcntl.ioctl(master, termios.TIOCSWINSZ, fcntl.ioctl(0, termios.TIOCGWINSZ, b"\0" * 8))

    previous = signal.signal(signal.SIGWINCH, winch)
    os.set_blocking(master, False)
    pending = b""  # typed, not yet taken by the command's terminal
    reading, master_open = True, True
    try:
        tty.setraw(0, termios.TCSANOW)
        winch()
        while b"\n" not in data:
            rlist = [sock] + ([master] if master_open else []) + ([0] if reading and not pending else [])
            wlist = [master] if pending and master_open else []
            readable, writable, _ = select.select(rlist, wlist, [])
            if master in readable:
                master_open = _copy_output(master, out)
            if master in writable:
                with contextlib.suppress(BlockingIOError):
                    pending = pending[os.write(master, pending) :]
            if 0 in readable:
                chunk = os.read(0, 65536)
                reading = bool(chunk)
                pending += chunk
            if sock in readable:
                chunk = sock.recv(65536)
                if not chunk:
                    return data
                data += chunk
        # the command ended: what it wrote is read until every holder closed the terminal, or
        # it stayed quiet a moment (a background child may keep it open)
        deadline = time.monotonic() + 2.0
        while master_open and (left := deadline - time.monotonic()) > 0:
            if not select.select([master], [], [], min(0.1, left))[0]:
                break
            master_open = _copy_output(master, out)
        return data
    finally:
        termios.tcsetattr(0, termios.TCSADRAIN, saved)
        signal.signal(signal.SIGWINCH, previous)
        os.close(master)


def _copy_output(master: int, out: int) -> bool:
    """Copy what the command's terminal has to ``out``; False once it is closed (EIO)."""
    try:
        chunk = os.read(master, 65536)
    except BlockingIOError:
        return True
    except OSError:  # EIO: nothing holds the terminal any more
        return False
    view = memoryview(chunk)
    with contextlib.suppress(OSError):  # a stdin opened read-only (no stdout terminal): the echo is lost
        while view:
            view = view[os.write(out, view) :]
    return bool(chunk)


if __name__ == "__main__":
    sys.exit(sudo_main(sys.argv[1:]))
