"""What a sandbox looks like from inside, and the one kernel limit on socket paths.

Bottom of the isolation package: the local runtime (both isolation modes) and every helper
module use these names instead of literals.
"""

from __future__ import annotations

from cellbox.runtimes.specs import SANDBOX_HOME  # the user's home inside (one constant for all layers)

__all__ = ["MAX_SOCKET_PATH", "SANDBOX_GID", "SANDBOX_HOME", "SANDBOX_RUN", "SANDBOX_UID"]

#: The sandbox user as seen inside (``user``, uid/gid 1000); host uids come from ``UidPool``.
SANDBOX_UID = 1000
SANDBOX_GID = 1000
#: Where the sandbox's run directory (the agent's and every kernel's socket directory) is
#: bound inside the sandbox.
SANDBOX_RUN = "/run/cellbox"
#: The longest path a unix socket may have: ``sockaddr_un.sun_path`` holds 108 bytes including
#: the terminating NUL.
MAX_SOCKET_PATH = 107
