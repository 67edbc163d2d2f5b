"""State stores: where the core keeps sandboxes, executions, events and the artifact index.

Picked by the scheme of the ``state_store`` URL and imported only when selected, as runtimes
are (:data:`STATE_STORES`). The protocol and its guarantees are in :mod:`.base`.

A store is opened for one service *instance* (``instance_id``); recovery at start touches
only that instance's sandboxes. By default the id is a stable one kept in
``<data_dir>/instance-id`` (:func:`load_instance_id`), so a restarted service finds its own.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import re
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from cellbox.interpreter.errors import RuntimeUnavailable
from cellbox.interpreter.store.base import Doc, StateStore
from cellbox.interpreter.store.sqlite import SQLiteStore

if TYPE_CHECKING:
    from cellbox.interpreter.config import Settings

__all__ = [
    "INSTANCE_ID_PATTERN",
    "STATE_STORES",
    "Doc",
    "SQLiteStore",
    "StateStore",
    "Store",
    "load_instance_id",
    "open_from_settings",
    "open_state_store",
]

STATE_STORES: dict[str, str] = {
    "sqlite": "cellbox.interpreter.store.sqlite:SQLiteStore",
}
"""URL scheme -> ``"module:Class"``; the class has ``async from_url(url, instance_id)``."""

Store = SQLiteStore
"""The name the core used before the protocol existed (``Store.open(path)``)."""

INSTANCE_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
_INSTANCE_ID = re.compile(INSTANCE_ID_PATTERN)
_INSTANCE_FILE = "instance-id"


async def open_state_store(url: str, instance_id: str) -> StateStore:
    """Open the store ``url`` names for service instance ``instance_id``. Called once at
    startup (``SandboxManager.open``). Raises RuntimeUnavailable for an unknown scheme (naming
    the known ones), a missing optional dependency, a malformed URL or instance id."""
    scheme = url.partition(":")[0].lower() if ":" in url else ""
    target = STATE_STORES.get(scheme)
    if target is None:
        # Only the scheme is quoted: a database URL may carry a password.
        raise RuntimeUnavailable(
            f"unknown state store {scheme or url!r}; known: {', '.join(sorted(STATE_STORES))} "
            "(for example sqlite:///var/lib/cellbox/state.sqlite3)"
        )
    if not _INSTANCE_ID.fullmatch(instance_id):
        raise RuntimeUnavailable(f"instance id {instance_id!r} must match {INSTANCE_ID_PATTERN}")
    module_name, _, cls_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RuntimeUnavailable(f"state store {scheme!r} needs {exc.name}: pip install 'cellbox[{scheme}]'") from exc
    from_url: Callable[[str, str], Awaitable[StateStore]] = getattr(module, cls_name).from_url
    return await from_url(url, instance_id)


async def open_from_settings(settings: Settings) -> StateStore:
    """Open the store ``settings.state_store`` names (default: SQLite in the data dir) for
    ``settings.instance_id`` (default: :func:`load_instance_id` of the data dir)."""
    instance_id = settings.instance_id or await asyncio.to_thread(load_instance_id, settings.data_dir)
    return await open_state_store(settings.resolved_state_store(), instance_id)


def load_instance_id(data_dir: Path) -> str:
    """This service's stable instance id, kept in ``data_dir/instance-id``; the first call
    creates it (``inst_`` + 16 random hex digits). Blocking file I/O: call it in a thread.
    Two processes starting at once on a fresh directory agree on one id (the file is created
    with a hard link, which fails if it exists). Raises RuntimeUnavailable if the file holds
    something that is not an instance id (rather than silently becoming another instance,
    which would orphan this one's sandboxes)."""
    path = data_dir / _INSTANCE_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        data_dir.mkdir(parents=True, exist_ok=True)
        fresh = "inst_" + secrets.token_hex(8)
        tmp = data_dir / f".{_INSTANCE_FILE}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            with open(tmp, "w") as f:
                f.write(fresh + "\n")
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass  # another process won the race; use its id
        finally:
            tmp.unlink(missing_ok=True)
        text = path.read_text()
    instance_id = text.strip()
    if not _INSTANCE_ID.fullmatch(instance_id):
        raise RuntimeUnavailable(f"{path} does not hold an instance id (expected {INSTANCE_ID_PATTERN})")
    return instance_id
