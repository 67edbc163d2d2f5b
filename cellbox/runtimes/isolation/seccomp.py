"""seccomp: the deny-list every sandbox runs under, compiled to BPF for ``bwrap --seccomp``.

libseccomp is bound with ctypes (:func:`build_seccomp_bpf`); the compiled filter is cached in
the run directory (:func:`seccomp_bpf`).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import platform
from dataclasses import dataclass
from pathlib import Path

from cellbox.interpreter.errors import RuntimeUnavailable

__all__ = ["DENIED_SYSCALLS", "build_seccomp_bpf", "seccomp_bpf"]


#: Syscalls a sandbox gets EPERM for. The sandbox has no capabilities anyway; this removes
#: kernel attack surface (ptrace, keyrings, bpf, io_uring, userfaultfd, new mount API …) and
#: everything that could nest namespaces.
DENIED_SYSCALLS: tuple[str, ...] = (
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp",
    "mount", "umount2", "pivot_root", "chroot",
    "fsopen", "fsconfig", "fsmount", "fspick", "move_mount", "open_tree", "mount_setattr",
    "unshare", "setns",
    "keyctl", "add_key", "request_key",
    "bpf", "perf_event_open", "userfaultfd",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load",
    "reboot", "swapon", "swapoff", "acct",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex",
    "quotactl", "quotactl_fd", "syslog", "iopl", "ioperm",
    "open_by_handle_at", "name_to_handle_at", "fanotify_init",
    "lookup_dcookie", "vhangup", "nfsservctl", "uselib",
)  # fmt: skip

# clone() flags that create namespaces. CLONE_NEWTIME (0x80) is left out on purpose: in clone()
# the low byte is the exit signal; new time namespaces need clone3 or unshare, both denied.
_CLONE_NEW_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000)
_TIOCSTI = 0x5412  # push bytes into a terminal's input queue
_TIOCLINUX = 0x541C  # console ioctls (selection paste); same risk as TIOCSTI

_SCMP_ACT_ALLOW = 0x7FFF0000
_SCMP_CMP_MASKED_EQ = 7
_NR_SCMP_ERROR = -1


def _scmp_act_errno(err: int) -> int:
    return 0x00050000 | (err & 0xFFFF)


@dataclass(frozen=True)
class _Rule:
    syscall: str
    errno: int
    # (arg index, op, datum_a, datum_b); several entries are ANDed, on different args only.
    args: tuple[tuple[int, int, int, int], ...] = ()


def _seccomp_rules() -> list[_Rule]:
    rules = [_Rule(name, errno.EPERM) for name in DENIED_SYSCALLS]
    # clone3 passes its flags in a struct seccomp cannot read: answer ENOSYS so glibc falls
    # back to clone(), whose flags are checked below.
    rules.append(_Rule("clone3", errno.ENOSYS))
    rules += [_Rule("clone", errno.EPERM, ((0, _SCMP_CMP_MASKED_EQ, bit, bit),)) for bit in _CLONE_NEW_FLAGS]
    rules += [
        _Rule("ioctl", errno.EPERM, ((1, _SCMP_CMP_MASKED_EQ, 0xFFFFFFFF, cmd),)) for cmd in (_TIOCSTI, _TIOCLINUX)
    ]
    # personality: allow only PER_LINUX (0) and the query 0xffffffff, so nothing can turn off
    # ASLR or ask for READ_IMPLIES_EXEC. The kernel reads only the low 32 bits (and glibc
    # passes personality(-1) sign-extended), so only those are compared. libseccomp cannot
    # AND two comparisons on one argument, so "x not in {0, 0xffffffff}" is an OR of rules:
    # a 32-bit value other than all-zeros and all-ones has some set bit i whose (cyclic)
    # neighbour i+1 is clear.
    for i in range(32):
        mask = (1 << i) | (1 << ((i + 1) % 32))
        rules.append(_Rule("personality", errno.EPERM, ((0, _SCMP_CMP_MASKED_EQ, mask, 1 << i),)))
    return rules


class _ScmpArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


class _ScmpVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint), ("minor", ctypes.c_uint), ("micro", ctypes.c_uint)]


def _libseccomp() -> ctypes.CDLL:
    # libseccomp2 is the library python3-seccomp wraps; binding it with ctypes works from any
    # interpreter (the service venv does not see Debian's python3-seccomp module).
    try:
        lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    except OSError as exc:
        raise RuntimeUnavailable("libseccomp.so.2 not found (apt-get install libseccomp2)") from exc
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(_ScmpArgCmp),
    ]  # fmt: skip
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.seccomp_version.restype = ctypes.POINTER(_ScmpVersion)
    return lib


def _policy_id(lib: ctypes.CDLL) -> str:
    v = lib.seccomp_version().contents
    text = repr((_seccomp_rules(), platform.machine(), (v.major, v.minor, v.micro)))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def build_seccomp_bpf(out: Path) -> None:
    """Compile the deny-list to classic BPF for ``bwrap --seccomp`` and write it to ``out``.

    Default action: allow; listed syscalls: EPERM (``clone3``: ENOSYS); other architectures'
    syscall ABIs (i386 via int 0x80, x32): kill. Raises ``RuntimeUnavailable`` if libseccomp is
    missing or does not know a listed syscall (fail closed rather than skip it). Most callers
    want the cached :func:`seccomp_bpf` instead.
    """
    lib = _libseccomp()
    ctx = lib.seccomp_init(_SCMP_ACT_ALLOW)
    if not ctx:
        raise RuntimeUnavailable("seccomp_init failed")
    try:
        for rule in _seccomp_rules():
            nr = lib.seccomp_syscall_resolve_name(rule.syscall.encode())
            if nr == _NR_SCMP_ERROR:
                raise RuntimeUnavailable(f"libseccomp does not know syscall {rule.syscall!r}")
            cmps = (_ScmpArgCmp * max(1, len(rule.args)))(*(_ScmpArgCmp(*a) for a in rule.args))
            rc = lib.seccomp_rule_add_array(ctx, _scmp_act_errno(rule.errno), nr, len(rule.args), cmps)
            if rc < 0:
                raise RuntimeUnavailable(f"seccomp rule for {rule.syscall}: {os.strerror(-rc)}")
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            rc = lib.seccomp_export_bpf(ctx, fd)
        finally:
            os.close(fd)
        if rc < 0:
            tmp.unlink(missing_ok=True)
            raise RuntimeUnavailable(f"seccomp_export_bpf: {os.strerror(-rc)}")
        os.replace(tmp, out)
    finally:
        lib.seccomp_release(ctx)


def seccomp_bpf(run_dir: Path) -> Path:
    """The compiled filter, built once into ``run_dir`` and reused (keyed by policy, arch and
    libseccomp version). Called by the runtime's ``startup``; cheap afterwards."""
    lib = _libseccomp()
    out = run_dir / f"seccomp-{_policy_id(lib)}.bpf"
    if not out.exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        build_seccomp_bpf(out)
        for stale in run_dir.glob("seccomp-*.bpf"):  # from an older policy or libseccomp
            if stale != out:
                stale.unlink(missing_ok=True)
    return out
