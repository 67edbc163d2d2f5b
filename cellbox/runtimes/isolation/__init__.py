"""Host-side helpers that turn a sandbox into an isolated one (``isolation="bwrap"``).

The local runtime's bwrap isolation (:mod:`cellbox.runtimes.isolation.strategy`) composes
these. Nothing here speaks the Jupyter protocol or knows about the core; each helper does one
host-side job, and its docstring says who calls it and when. One module per noun:

* :mod:`~.layout`: the sandbox as seen inside (uid 1000 ``user``, ``/home/user``,
  ``/run/cellbox``) and the unix socket path limit;
* :mod:`~.uids`: a host **uid** per sandbox from a service-owned range (:class:`UidPool`), or
  a **uid range** of 65536 per rootfs sandbox (:class:`UidRangePool`);
* :mod:`~.userns`: the **user namespace** the service makes for a rootfs sandbox, mapping its
  range (:class:`UserNamespace`), entered by every launch of it;
* :mod:`~.rootfs`: a rootfs sandbox's **root**: the template's rootfs idmapped and read-only
  under an overlay whose upper layer is on the sandbox's disk (:class:`RootfsMount`);
* :mod:`~.cgroups`: a **cgroup** per sandbox under the service's own subtree
  (:class:`CgroupTree`, :class:`Cgroup`), on cgroup v1/hybrid or v2, detected at runtime;
* :mod:`~.disk`: the **home** (:class:`DiskHome`), a sparse ext4 image on a loop device so
  disk use is capped on disk rather than in RAM; a plain directory when loop devices are
  missing;
* :mod:`~.bwrap`: **one unprivileged bwrap process per sandbox** (:func:`build_bwrap_argv`;
  :func:`build_rootfs_bwrap_argv` for rootfs sandboxes, bwrap as root of their namespace),
  whose first process is the sandbox's agent (``runtimes/agent.py``), its init: kernels,
  commands and file operations are the agent's children, inside the same namespaces, cgroup
  and seccomp filter;
* :mod:`~.child`: what the forked child does before it execs bwrap (:func:`make_preexec`:
  join the cgroup, rlimits, drop to the sandbox uid);
* :mod:`~.seccomp`: the syscall deny-list (:func:`seccomp_bpf`);
* :mod:`~.ipc`: the socket directories under the sandbox's run directory, bound at
  ``/run/cellbox`` as a whole: one for the agent, one per kernel start, each handed back to
  root once its sockets are bound (:func:`prepare_ipc_dir`, :func:`hand_back_ipc_dir`);
* :mod:`~.hostcheck`: :func:`check_host`, what this host offers.

The sequence, as ``BwrapIsolation`` and ``LocalRuntime`` run it (see each function)::

    # startup (once)
    report = await check_host(run_root); report.require()     # RuntimeUnavailable
    tree = CgroupTree.detect(prefix); tree.prepare()
    await tree.reap_leftovers(); await DiskHome.reap_leftovers(homes)
    bpf = seccomp_bpf(run_root)                                # compiled once, cached

    # create_sandbox
    uid = uids.acquire(sandbox_id)
    cgroup = tree.create(sandbox_id); cgroup.set_limits(memory_bytes=..., pids=..., cpu=...)
    home = await DiskHome.create(sandbox_dir / "home", size_bytes=..., uid=uid)
    write_etc_files(sandbox_dir / "etc")
    # ... then the agent, the sandbox's init:
    prepare_ipc_dir(run_root / sandbox_id / "agent", uid)
    cmd = build_bwrap_argv([python, "/opt/cellbox/agent.py", "--socket", ...],
                           home=home.path, run_dir=run_root / sandbox_id, etc_dir=..., env=...)
    with cmd.open() as (argv, fds):
        proc = await asyncio.create_subprocess_exec(*argv, pass_fds=fds, cwd="/",
                   preexec_fn=make_preexec(cgroup, uid, Rlimits(...)), ...)
    # (the agent's socket appears) hand_back_ipc_dir(agent dir, uid, sockets=[...]); connect

    # start_kernel (per context and per restart): the agent spawns it
    ipc_dir = prepare_ipc_dir(run_root / sandbox_id / name, uid)
    conn = write_ipc_connection(ipc_dir, sandbox_path=f"/run/cellbox/{name}")
    await agent.spawn([python, "-m", "ipykernel_launcher", "-f", conn.sandbox_file], ...)
    await wait_for_ipc_sockets(ipc_dir, alive=...); hand_back_ipc_dir(ipc_dir, uid)
    # ... only now connect a client with conn.connection_info

    # create_sandbox of a rootfs template, instead of the uid and the home above
    base = ranges.acquire(sandbox_id); userns = UserNamespace.create(base)
    disk = await DiskHome.create(sandbox_dir / "disk", size_bytes=..., uid=0)   # home/ + layers/
    root = RootfsMount.create(template.rootfs, userns, upper=..., work=..., merged=...)
    cmd = build_rootfs_bwrap_argv([...agent, "--as-user", "1000:1000"], root=root.merged, ...)
    preexec = make_preexec(cgroup, 0, Rlimits(...), userns_fd=userns.fd)   # bwrap as its root

    # destroy_sandbox
    (close the agent's connection: it kills its children and exits; reap bwrap)
    await cgroup.kill_all(); await cgroup.remove(); await home.destroy()
    uids.release(sandbox_id); shutil.rmtree(run_root / sandbox_id), ...

Every function that runs a process or waits is ``async``; the others only touch files in
``/sys/fs/cgroup``, ``/proc`` or the service's directories and return at once (callers on the
event loop run the heavier ones, such as :meth:`UidPool.acquire`, in a worker thread).
"""

from __future__ import annotations

from cellbox.runtimes.isolation.bwrap import (
    HOST_ETC,
    ROOT_CAPS,
    BwrapCommand,
    build_bwrap_argv,
    build_rootfs_bwrap_argv,
    resolve_in_root,
    write_etc_files,
)
from cellbox.runtimes.isolation.cgroups import (
    REQUIRED_V1,
    REQUIRED_V2,
    Cgroup,
    CgroupCounters,
    CgroupTree,
    CgroupUsage,
    death_reason,
)
from cellbox.runtimes.isolation.child import Rlimits, make_preexec
from cellbox.runtimes.isolation.disk import DiskHome, loop_available
from cellbox.runtimes.isolation.hostcheck import HostReport, check_host
from cellbox.runtimes.isolation.ipc import (
    CONNECTION_FILE,
    IPC_BASENAME,
    IPC_PORTS,
    KERNEL_SOCKETS,
    IpcConnection,
    check_socket_paths,
    hand_back_ipc_dir,
    prepare_ipc_dir,
    wait_for_ipc_sockets,
    write_ipc_connection,
)
from cellbox.runtimes.isolation.layout import MAX_SOCKET_PATH, SANDBOX_GID, SANDBOX_HOME, SANDBOX_RUN, SANDBOX_UID
from cellbox.runtimes.isolation.rootfs import RootfsMount, check_idmap_support
from cellbox.runtimes.isolation.seccomp import DENIED_SYSCALLS, build_seccomp_bpf, seccomp_bpf
from cellbox.runtimes.isolation.uids import RANGE_SIZE, UidPool, UidRangePool
from cellbox.runtimes.isolation.userns import UserNamespace

__all__ = [
    "CONNECTION_FILE",
    "DENIED_SYSCALLS",
    "HOST_ETC",
    "IPC_BASENAME",
    "IPC_PORTS",
    "KERNEL_SOCKETS",
    "MAX_SOCKET_PATH",
    "RANGE_SIZE",
    "REQUIRED_V1",
    "REQUIRED_V2",
    "ROOT_CAPS",
    "SANDBOX_GID",
    "SANDBOX_HOME",
    "SANDBOX_RUN",
    "SANDBOX_UID",
    "BwrapCommand",
    "Cgroup",
    "CgroupCounters",
    "CgroupTree",
    "CgroupUsage",
    "DiskHome",
    "HostReport",
    "IpcConnection",
    "Rlimits",
    "RootfsMount",
    "UidPool",
    "UidRangePool",
    "UserNamespace",
    "build_bwrap_argv",
    "build_rootfs_bwrap_argv",
    "build_seccomp_bpf",
    "check_host",
    "check_idmap_support",
    "check_socket_paths",
    "death_reason",
    "hand_back_ipc_dir",
    "loop_available",
    "make_preexec",
    "prepare_ipc_dir",
    "resolve_in_root",
    "seccomp_bpf",
    "wait_for_ipc_sockets",
    "write_etc_files",
    "write_ipc_connection",
]
