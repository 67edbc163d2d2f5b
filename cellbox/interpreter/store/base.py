"""The state-store seam: what the core keeps durably, and what it may ask of a store.

A store holds four kinds of rows, each a JSON document plus the few columns the core queries:

* **sandboxes**: the record of every sandbox (``SandboxInfo`` as a dict, without live usage),
  its owner, and the *service instance* that runs it;
* **executions**: one document per execution (``ExecutionInfo`` as a dict);
* **events**: the ordered events of each execution, keyed by ``(execution_id, seq)``;
* **artifacts**: the index of which sandbox (and execution) made which blob; the blobs
  themselves live in a :class:`~cellbox.interpreter.artifacts.BlobStore`.

Durability: every write method returns only once its write is committed. A caller that
awaited :meth:`StateStore.append_events` may show those events to a client; a caller that saw
it raise must assume nothing was written (each call is one transaction).

Instance scope: a store is opened for one service instance (``instance_id``). Several
instances may share one store; each records itself on the sandboxes it runs, and
:meth:`StateStore.mark_lost` at its start touches only its own. Reads are not scoped: an
owner sees its sandboxes whichever instance runs them.

Implementations are picked by URL scheme (:data:`cellbox.interpreter.store.STATE_STORES`)
and imported lazily. Each registered class provides
``async classmethod from_url(url: str, instance_id: str) -> StateStore``. Nothing outside an
implementation's module knows its SQL.
"""

from __future__ import annotations

from typing import Any, Protocol

__all__ = ["Doc", "StateStore"]

Doc = dict[str, Any]
"""A JSON document as the store keeps it (``json.dumps``-able, returned as parsed)."""


class StateStore(Protocol):
    """Durable state of one or more service instances. Every method is a coroutine that runs
    its I/O off the event loop; writes return once committed."""

    instance_id: str
    """The service instance this store was opened for (see module docstring)."""

    async def close(self) -> None:
        """Release connections and threads. Called once, last, by ``SandboxManager.close``
        (or by ``open`` when startup fails). No method may be called after it."""
        ...

    # -- sandboxes -------------------------------------------------------------------------

    async def put_sandbox(self, owner: str, doc: Doc) -> None:
        """Insert or update the record of sandbox ``doc["id"]`` (needs ``id``, ``state``,
        ``created_at``), run by this instance. Called by the manager at every lifecycle change
        (create, pause, resume, timeout change, kill) and, coalesced, after context changes.
        The owner and creation time are set by the first write and never change."""
        ...

    async def get_sandbox(self, sandbox_id: str) -> tuple[str, Doc] | None:
        """``(owner, record)`` of a sandbox, any instance's, or None. Called by the manager
        for sandboxes that are not live in this process (ended, or on another instance)."""
        ...

    async def list_sandboxes(self, owner: str | None = None, states: list[str] | None = None) -> list[Doc]:
        """Records of ``owner``'s sandboxes (None: everyone's) in ``states`` (None or empty:
        any), oldest first, whichever instance runs them. Called by ``manager.list_sandboxes``."""
        ...

    async def mark_lost(self, reason: str) -> tuple[list[str], list[str]]:
        """Recovery at service start, called once by ``SandboxManager.start`` before anything
        runs: every sandbox *of this instance* still recorded as starting, running or paused
        becomes ``lost`` (its contexts ``dead``, ``ended_at`` and ``end_reason`` set), and
        every queued or running execution of this instance's sandboxes gets a closing ``end``
        event (``status`` ``kernel_died``, ``state_lost`` true, with ``reason``). Rows written
        before instances existed count as this instance's. Other instances' rows are not
        touched. One transaction. Returns ``(lost sandbox ids, closed execution ids)``."""
        ...

    async def purge_sandboxes(self, older_than: float) -> list[str]:
        """Delete killed and lost sandboxes that ended before ``older_than`` (a Unix time),
        with their executions, events and artifact rows, whichever instance ran them (ended
        sandboxes belong to no one). Called by the manager's history sweep. Returns the ids."""
        ...

    # -- executions and events -------------------------------------------------------------

    async def put_execution(self, doc: Doc, events: list[Doc] | None = None) -> None:
        """Insert or update execution ``doc["id"]`` (needs ``id``, ``sandbox_id``,
        ``created_at``, ``status``) and append ``events`` in the same transaction. Called by
        ``ExecutionLog.begin`` (with the first event), ``set_running`` and ``finish`` (with the
        unsaved tail and ``end``)."""
        ...

    async def append_events(self, execution_id: str, events: list[Doc]) -> None:
        """Store a batch of events (each with its ``seq``) in one transaction; an event
        already stored with the same seq is replaced, so a retried batch is harmless. Called
        by ``ExecutionLog`` for each group-commit batch, on the hot path of every output:
        implementations keep it to one round trip. An empty batch is a no-op."""
        ...

    async def get_execution(self, execution_id: str) -> Doc | None:
        """The execution document, or None. Called for records and follows of ended
        executions."""
        ...

    async def get_events(self, execution_id: str, after: int = -1) -> list[Doc]:
        """Stored events with ``seq > after``, in seq order. Called for replays."""
        ...

    async def list_executions(self, sandbox_id: str, limit: int = 100) -> list[Doc]:
        """The sandbox's latest ``limit`` executions, newest first."""
        ...

    # -- artifacts -------------------------------------------------------------------------

    async def put_artifact(
        self, artifact_id: str, sandbox_id: str, execution_id: str | None, mime: str, size: int
    ) -> float:
        """Index a blob (already durable in the blob store) as made by ``sandbox_id``
        (and ``execution_id``, None for kept files). Indexing the same blob for the same
        sandbox again keeps the first row. Returns the row's creation time."""
        ...

    async def find_artifact(self, artifact_id: str, owner: str | None) -> Doc | None:
        """The index row (``id``, ``sandbox_id``, ``execution_id``, ``mime``, ``size``,
        ``created_at``) of an artifact made in a sandbox of ``owner`` (None: anyone's), or
        None. A malformed id is simply not found. Called when a face serves an artifact."""
        ...

    async def list_artifacts(self, sandbox_id: str) -> list[Doc]:
        """Index rows of the sandbox's artifacts, oldest first."""
        ...

    async def referenced_artifacts(self) -> set[str]:
        """Ids of every blob some index row names; the sweep deletes the other blobs."""
        ...
