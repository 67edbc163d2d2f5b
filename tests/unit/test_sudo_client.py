"""sudo's client (cellbox/runtimes/sudo.py): a file of its own, run with ``python -I -S`` in
rootfs sandboxes, so it must stand alone (the standard library only) and agree with the agent
on the socket and root's PATH. Its command line: tests/integration/test_rootfs_parts.py; sudo
in a real rootfs sandbox: tests/integration/test_rootfs.py."""

from __future__ import annotations

import ast
import sys

from cellbox.runtimes import agent, sudo
from cellbox.runtimes.local import SUDO_SOURCE


def test_the_client_agrees_with_the_agent() -> None:
    assert sudo.SUDO_SOCKET == agent.SUDO_SOCKET
    assert sudo.ROOT_PATH == agent.ROOT_PATH


def test_the_client_imports_the_standard_library_only() -> None:
    tree = ast.parse(SUDO_SOURCE.read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    outside = {m for m in imported if m.split(".")[0] not in sys.stdlib_module_names and m != "__future__"}
    assert not outside, outside
