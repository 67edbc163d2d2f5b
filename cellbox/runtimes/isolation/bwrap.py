"""bubblewrap: the one unprivileged bwrap process that holds a sandbox's namespaces.

:func:`build_bwrap_argv` lays out the sandbox's file system and namespaces,
:class:`BwrapCommand` passes the options through a memfd, :func:`write_etc_files` writes the
sandbox's own ``/etc/passwd`` and friends.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cellbox.runtimes.isolation.layout import SANDBOX_GID, SANDBOX_HOME, SANDBOX_RUN, SANDBOX_UID

__all__ = [
    "HOST_ETC",
    "ROOT_CAPS",
    "BwrapCommand",
    "build_bwrap_argv",
    "build_rootfs_bwrap_argv",
    "resolve_in_root",
    "root_binds",
    "write_etc_files",
]


#: Host /etc entries bound read-only when present: the dynamic loader's cache, name-service
#: switch, time zone, TLS roots, MIME types, fonts (matplotlib) and the alternatives symlinks
#: that some /usr/bin commands point through.
HOST_ETC: tuple[str, ...] = (
    "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "nsswitch.conf", "localtime", "timezone",
    "mime.types", "ssl", "ca-certificates", "ca-certificates.conf", "alternatives", "fonts",
    "bash.bashrc", "profile", "inputrc", "os-release",
)  # fmt: skip

_PASSWD = (
    "root:x:0:0:root:/root:/usr/sbin/nologin\n"
    f"user:x:{SANDBOX_UID}:{SANDBOX_GID}:user:{SANDBOX_HOME}:/bin/bash\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
)
_GROUP = f"root:x:0:\nuser:x:{SANDBOX_GID}:\nnogroup:x:65534:\n"
_HOSTS = "127.0.0.1\tlocalhost sandbox\n::1\tlocalhost ip6-localhost ip6-loopback\n"


def write_etc_files(etc_dir: Path, *, hostname: str = "sandbox") -> dict[str, Path]:
    """Write the sandbox's own ``passwd``, ``group`` and ``hosts`` (root-owned, 0644).

    Called by ``create_sandbox`` (the bwrap isolation's ``prepare``); pass the same ``etc_dir``
    to :func:`build_bwrap_argv`. Real
    files rather than ``--ro-bind-data`` keep the sandbox checkpointable (see CRIU notes).
    """
    etc_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(etc_dir, 0o755)
    files = {
        "passwd": _PASSWD,
        "group": _GROUP,
        "hosts": _HOSTS.replace("sandbox", hostname),
        "hostname": hostname + "\n",
    }
    out = {}
    for name, text in files.items():
        path = etc_dir / name
        path.write_text(text)
        os.chmod(path, 0o644)
        out[name] = path
    return out


def root_binds() -> list[str]:
    """bwrap options mirroring the host's top-level /bin, /lib …: symlinks into /usr on
    merged-/usr systems, read-only binds otherwise."""
    out: list[str] = []
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        host = Path("/") / name
        if host.is_symlink():
            out += ["--symlink", os.readlink(host), f"/{name}"]
        elif host.is_dir():
            out += ["--ro-bind", str(host), f"/{name}"]
    return out


@dataclass(frozen=True)
class BwrapCommand:
    """A bwrap invocation: ``options`` go through ``--args FD`` so the sandbox's
    ``/proc/1/cmdline`` does not show the host layout; ``command`` runs inside.

    Use :meth:`open` right around the spawn::

        with cmd.open() as (argv, pass_fds):
            proc = await asyncio.create_subprocess_exec(*argv, pass_fds=pass_fds, ...)
    """

    bwrap: str
    options: tuple[str, ...]
    command: tuple[str, ...]
    seccomp: Path | None

    @contextlib.contextmanager
    def open(self) -> Iterator[tuple[list[str], tuple[int, ...]]]:
        """Open the fds bwrap reads (options in a memfd, the seccomp program) and yield the
        argv and the fds to pass; closes them on exit (the child keeps its copies)."""
        fds: list[int] = []
        try:
            options = list(self.options)
            if self.seccomp is not None:
                sfd = os.open(self.seccomp, os.O_RDONLY | os.O_CLOEXEC)
                fds.append(sfd)
                options += ["--seccomp", str(sfd)]
            afd = os.memfd_create("cellbox-bwrap-args", os.MFD_CLOEXEC)
            fds.append(afd)
            os.write(afd, b"".join(o.encode() + b"\0" for o in options))
            os.lseek(afd, 0, os.SEEK_SET)
            yield [self.bwrap, "--args", str(afd), "--", *self.command], tuple(fds)
        finally:
            for fd in fds:
                os.close(fd)


def build_bwrap_argv(
    command: Sequence[str],
    *,
    home: Path,
    run_dir: Path,
    etc_dir: Path,
    seccomp: Path | None,
    env: Mapping[str, str],
    template_env: Path | None = None,
    cwd: str = SANDBOX_HOME,
    tmp_size: int = 256 << 20,
    shm_size: int = 64 << 20,
    hostname: str = "sandbox",
    hide_usr_local: bool = True,
    extra_ro_binds: Sequence[tuple[Path, str]] = (),
    bwrap: str = "bwrap",
) -> BwrapCommand:
    """Build the bwrap command that starts a sandbox: its first process (the agent) runs
    ``command`` inside, as the sandbox's init; everything else the sandbox runs (kernels,
    commands, file operations) is that process's child, inside the same namespaces.

    Namespaces: user (uid/gid 1000 inside, no nested user namespaces), pid, ipc, uts
    (hostname ``sandbox``), cgroup, mount and **net** (only ``lo``: the service reaches the
    sandbox over unix sockets in ``run_dir``, so it needs no network). ``--die-with-parent``,
    ``--new-session`` and ``--cap-drop ALL``. Filesystem: read-only ``/usr`` (``/usr/local``
    hidden unless ``hide_usr_local=False``) and the top-level symlinks, a few host ``/etc``
    files (:data:`HOST_ETC`) plus ``etc_dir``'s passwd/group/hosts, ``template_env`` read-only
    at the same absolute path (so its shebangs and ``pyvenv.cfg`` resolve), ``/proc``, a fresh
    ``/dev``, size-limited tmpfs ``/tmp`` and ``/dev/shm``, ``home`` read-write at
    :data:`SANDBOX_HOME`, ``run_dir`` (the sandbox's run directory: the agent's and every
    kernel's socket directory) at :data:`SANDBOX_RUN`, then ``/`` remounted read-only. ``env``
    is the complete environment of ``command`` (the service's own environment never leaks in).

    Called by the bwrap isolation's ``spawn_agent``, once per agent start. The host paths given
    here must be reachable (search permission on every parent) by the sandbox's host uid:
    bwrap binds them as that uid.
    """
    o: list[str] = [
        "--unshare-user", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_GID), "--disable-userns",
        "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-net", "--unshare-cgroup-try",
        "--hostname", hostname,
        "--die-with-parent", "--new-session", "--cap-drop", "ALL",
        "--clearenv",
    ]  # fmt: skip
    for key, value in env.items():
        o += ["--setenv", key, value]
    o += ["--ro-bind", "/usr", "/usr"]
    if hide_usr_local and Path("/usr/local").is_dir():
        o += ["--perms", "0755", "--tmpfs", "/usr/local", "--remount-ro", "/usr/local"]
    o += root_binds()
    for name in HOST_ETC:
        o += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
    for name in ("passwd", "group", "hosts", "hostname"):
        o += ["--ro-bind", str(etc_dir / name), f"/etc/{name}"]
    o += ["--proc", "/proc", "--dev", "/dev"]
    # tmpfs before the binds: a template env under the host's /tmp must land on top of it.
    o += ["--perms", "1777", "--size", str(tmp_size), "--tmpfs", "/tmp"]
    o += ["--perms", "1777", "--size", str(shm_size), "--tmpfs", "/dev/shm"]
    if template_env is not None:
        o += ["--ro-bind", str(template_env), str(template_env)]
    for src, dest in extra_ro_binds:
        o += ["--ro-bind", str(src), dest]
    o += ["--bind", str(home), SANDBOX_HOME]
    o += ["--bind", str(run_dir), SANDBOX_RUN]
    o += ["--remount-ro", "/", "--chdir", cwd]
    return BwrapCommand(bwrap, tuple(o), tuple(command), seccomp)


#: What root inside a rootfs sandbox may do: the capabilities a Docker container's root gets
#: (without NET_RAW), each only over the sandbox's own user namespace and what it owns.
ROOT_CAPS: tuple[str, ...] = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL", "CAP_SETGID", "CAP_SETUID",
    "CAP_SETPCAP", "CAP_SETFCAP", "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_MKNOD", "CAP_AUDIT_WRITE",
)  # fmt: skip


def resolve_in_root(root: Path, path: str, *, max_links: int = 40) -> str:
    """``path`` (absolute, inside the sandbox) with every symlink of ``root``'s tree followed
    as if ``root`` were ``/`` (``..`` stops at it): where bwrap must mount, so that no link a
    template or an earlier run of the sandbox left can point a mount (or a mountpoint bwrap
    creates) at the host's own tree. Components that do not exist are kept as they are.
    Blocking (lstat per component); call while no process of the sandbox runs."""
    todo = [p for p in path.split("/") if p and p != "."]
    out: list[str] = []
    links = 0
    while todo:
        name = todo.pop(0)
        if name == "..":
            if out:
                out.pop()
            continue
        try:
            st = os.lstat(root.joinpath(*out, name))
        except (FileNotFoundError, NotADirectoryError):
            out.append(name)
            continue
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > max_links:
                raise OSError(40, f"too many symlinks resolving {path} in the sandbox's root")  # ELOOP
            target = os.readlink(root.joinpath(*out, name))
            if target.startswith("/"):
                out = []
            todo = [p for p in target.split("/") if p and p != "."] + todo
            continue
        out.append(name)
    return "/" + "/".join(out)


def build_rootfs_bwrap_argv(
    command: Sequence[str],
    *,
    root: Path,
    home: Path,
    run_dir: Path,
    etc_dir: Path,
    seccomp: Path | None,
    env: Mapping[str, str],
    cwd: str = SANDBOX_HOME,
    tmp_size: int = 256 << 20,
    shm_size: int = 64 << 20,
    hostname: str = "sandbox",
    extra_ro_binds: Sequence[tuple[Path, str]] = (),
    caps: Sequence[str] = ROOT_CAPS,
    owner: tuple[int, int] | None = None,
    bwrap: str = "bwrap",
) -> BwrapCommand:
    """The bwrap command of a rootfs sandbox: like :func:`build_bwrap_argv`, but bwrap runs as
    root of the sandbox's own user namespace (entered by :func:`~.child.make_preexec` with
    ``userns_fd``), so there is no ``--unshare-user`` (and hence no ``--disable-userns``: that
    namespace's ``max_user_namespaces`` is 0 and the seccomp filter refuses ``unshare`` and
    namespace flags of ``clone``). ``command`` runs as root inside with only ``caps``.

    Filesystem: ``root`` (the sandbox's merged overlay, :class:`~.rootfs.RootfsMount`)
    read-write as ``/``, then ``/proc``, a fresh ``/dev``, tmpfs ``/tmp`` and ``/dev/shm``,
    ``etc_dir``'s ``hosts`` and ``hostname``, ``extra_ro_binds``, ``home`` at
    :data:`SANDBOX_HOME` and ``run_dir`` at :data:`SANDBOX_RUN`. The rootfs's own ``/etc``
    (passwd, group, ld.so.cache, ...) is used as it is. Every destination is resolved inside
    ``root`` first (:func:`resolve_in_root`); with ``owner`` (the host uid/gid of root inside)
    their missing parent directories are made here, 0755 and root's inside (bwrap 0.8 would
    make them 0700: ``/etc/xdg/pip`` of a bound pip config would be root's only). Blocking.
    """
    o: list[str] = [
        "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-net", "--unshare-cgroup-try",
        "--hostname", hostname,
        "--die-with-parent", "--new-session", "--cap-drop", "ALL",
    ]  # fmt: skip
    for cap in caps:
        o += ["--cap-add", cap]
    o += ["--clearenv"]
    for key, value in env.items():
        o += ["--setenv", key, value]

    def dest(path: str) -> str:
        inside = resolve_in_root(root, path)
        if owner is not None:
            parent = root
            for part in inside.split("/")[1:-1]:
                parent = parent / part
                if not os.path.lexists(parent):  # resolved: no link left on the way
                    os.mkdir(parent, 0o755)
                    os.chown(parent, *owner)
                    os.chmod(parent, 0o755)
        return inside

    o += ["--bind", str(root), "/"]
    dev = dest("/dev")
    o += ["--proc", dest("/proc"), "--dev", dev]
    o += ["--perms", "1777", "--size", str(tmp_size), "--tmpfs", dest("/tmp")]
    o += ["--perms", "1777", "--size", str(shm_size), "--tmpfs", f"{dev}/shm"]  # in bwrap's fresh /dev
    for name in ("hosts", "hostname"):
        o += ["--ro-bind", str(etc_dir / name), dest(f"/etc/{name}")]
    for src, target in extra_ro_binds:
        o += ["--ro-bind", str(src), dest(target)]
    o += ["--bind", str(home), dest(SANDBOX_HOME)]
    o += ["--bind", str(run_dir), dest(SANDBOX_RUN)]
    o += ["--chdir", cwd]
    return BwrapCommand(bwrap, tuple(o), tuple(command), seccomp)
