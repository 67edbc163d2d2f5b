"""The one wire schema of cellbox, used by the server and the SDK alike.

An execution streams :data:`Event` objects. The same JSON object is an NDJSON line, a
WebSocket frame and, parsed with :func:`parse_event`, an SDK object. Every event carries the
``execution_id`` and, except ``keepalive``, a ``seq`` number (0, 1, 2, ...) so a client that
lost its connection can replay from the first event it did not see
(``GET /v1/sandboxes/{id}/executions/{eid}?after=SEQ``).

This module imports only pydantic: ``pip install cellbox`` (the SDK alone) can use it.
"""

from __future__ import annotations

import enum
import json
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

# ---------------------------------------------------------------------------------------------
# Events


class _Event(BaseModel):
    model_config = ConfigDict(extra="ignore")

    execution_id: str = ""
    seq: int | None = None


class StartEvent(_Event):
    """The execution was accepted; sent first, before the kernel runs it (it may queue)."""

    type: Literal["start"] = "start"
    sandbox_id: str = ""
    context_id: str = ""


class StdoutEvent(_Event):
    type: Literal["stdout"] = "stdout"
    text: str


class StderrEvent(_Event):
    type: Literal["stderr"] = "stderr"
    text: str


class ArtifactRef(BaseModel):
    """A rich output kept on the server; ``url`` downloads it.

    The core emits the id; each face fills in ``url`` with its own address for the artifact
    (the native API's is ``{base}/v1/artifacts/{id}``)."""

    id: str
    mime: str
    url: str = ""
    size: int


class ResultEvent(_Event):
    """A rich output: ``execute_result`` (``is_main_result``) or ``display_data``.

    ``data`` is the MIME bundle without the binary/large formats, which are stored as
    artifacts and listed in ``artifacts`` (with ``inline=true`` they stay in ``data`` too).
    """

    type: Literal["result"] = "result"
    data: dict[str, Any] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)
    artifacts: list[ArtifactRef] = Field(default_factory=list)
    is_main_result: bool = False
    execution_count: int | None = None
    display_id: str | None = None


class DisplayUpdateEvent(_Event):
    """``update_display_data``: replaces the earlier result with the same ``display_id``."""

    type: Literal["display_update"] = "display_update"
    display_id: str
    data: dict[str, Any] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)
    artifacts: list[ArtifactRef] = Field(default_factory=list)


class ClearOutputEvent(_Event):
    type: Literal["clear_output"] = "clear_output"
    wait: bool = False


class ErrorEvent(_Event):
    """An exception raised by the code (``traceback`` is plain text lines, no ANSI colours)."""

    type: Literal["error"] = "error"
    name: str
    value: str
    traceback: list[str] = Field(default_factory=list)


class InputRequestEvent(_Event):
    """The code called ``input()``; answer over the WebSocket (HTTP streams cannot)."""

    type: Literal["input_request"] = "input_request"
    prompt: str = ""
    password: bool = False


class KeepaliveEvent(_Event):
    """Sent on live streams while the execution is quiet; never stored."""

    type: Literal["keepalive"] = "keepalive"


class EndStatus(enum.StrEnum):
    OK = "ok"
    ERROR = "error"
    TIMEOUT = "timeout"
    INTERRUPTED = "interrupted"
    KERNEL_DIED = "kernel_died"


class EndEvent(_Event):
    """Always the last event of an execution, exactly once.

    ``state_lost`` is true when the kernel had to be restarted (after it died, or when it
    ignored an interrupt): the context runs on, but its variables are gone.
    """

    type: Literal["end"] = "end"
    status: EndStatus
    execution_count: int | None = None
    duration_ms: float = 0.0
    reason: str | None = None
    state_lost: bool = False


class RunningEvent(_Event):
    """Internal, never on the wire: a backend's execution left its context's queue and runs
    now (its timeout starts). The core records the state change and drops the event."""

    type: Literal["running"] = "running"


Event = Annotated[
    StartEvent
    | StdoutEvent
    | StderrEvent
    | ResultEvent
    | DisplayUpdateEvent
    | ClearOutputEvent
    | ErrorEvent
    | InputRequestEvent
    | KeepaliveEvent
    | EndEvent,
    Field(discriminator="type"),
]

_EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)
EVENT_TYPES = frozenset(get_args(cls.model_fields["type"].annotation)[0] for cls in get_args(get_args(Event)[0]))


def parse_event(obj: dict[str, Any] | str | bytes) -> Event | None:
    """Parse one NDJSON line or WS frame; ``None`` for an event type this version does not know.

    Unknown types are skipped rather than rejected, so an older SDK keeps working against a
    newer server.
    """
    if isinstance(obj, (str, bytes)):
        obj = json.loads(obj)
    if not isinstance(obj, dict):
        raise ValueError(f"an event is a JSON object, not {type(obj).__name__}")
    if obj.get("type") not in EVENT_TYPES:
        return None
    return _EVENT_ADAPTER.validate_python(obj)


def dump_event(event: _Event) -> dict[str, Any]:
    """The wire form of an event: ``None`` fields left out, ``type`` always present."""
    return event.model_dump(mode="json", exclude_none=True)


# ---------------------------------------------------------------------------------------------
# Sandboxes and contexts


class SandboxState(enum.StrEnum):
    STARTING = "starting"  # being created; not handed out yet
    RUNNING = "running"  # kernels up (or restartable); accepts work
    PAUSED = "paused"  # frozen in memory (pause/resume)
    KILLED = "killed"  # deleted or expired; history kept until retention ends
    LOST = "lost"  # the service restarted under it; history intact, kernels gone


class ContextState(enum.StrEnum):
    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    RESTARTING = "restarting"
    DEAD = "dead"


class KernelExit(BaseModel):
    """Why a kernel process ended: the exit code or signal, and a reason when known."""

    exit_code: int | None = None
    signal: int | None = None
    reason: str = "exited"  # exited | killed | oom | pids | service_restart | ...
    detail: str = ""
    at: float = 0.0


class Limits(BaseModel):
    """Resource limits of a sandbox. ``None`` means the service default."""

    model_config = ConfigDict(extra="forbid")

    # The minima are what a kernel needs to start at all: below them a create would wait for a
    # kernel that never comes (an idle ipykernel is ~50 MB and 14 threads, and takes ~0.4 s of
    # CPU to start).
    memory_mb: int | None = Field(default=None, ge=64)
    cpu: float | None = Field(default=None, ge=0.1)
    pids: int | None = Field(default=None, ge=32)
    disk_mb: int | None = Field(default=None, ge=16)
    nofile: int | None = Field(default=None, ge=64)
    fsize_mb: int | None = Field(default=None, ge=1)
    execution_timeout: float | None = Field(default=None, gt=0)


class NetworkSpec(BaseModel):
    """What a sandbox may reach outside itself (``cellbox.egress.policy`` has the semantics).

    Entries are domains (``pypi.org``), wildcards (``*.pythonhosted.org``), IP addresses or
    CIDRs (``0.0.0.0/0``: everything). An allow that matches wins over a deny that matches;
    otherwise a deny refuses; otherwise ``internet`` decides. The service's policy bounds it."""

    model_config = ConfigDict(extra="forbid")

    internet: bool = False
    allow_out: list[str] = Field(default_factory=list, description="Destinations allowed even without internet.")
    deny_out: list[str] = Field(default_factory=list, description="Destinations refused unless allowed.")


class SandboxCreate(BaseModel):
    """Body of ``POST /v1/sandboxes``."""

    model_config = ConfigDict(extra="forbid")

    template: str = "default"
    timeout: float | None = Field(default=None, gt=0, description="Seconds until the sandbox expires.")
    envs: dict[str, str] = Field(default_factory=dict)
    metadata: dict[str, str] = Field(default_factory=dict)
    limits: Limits = Field(default_factory=Limits)
    network: NetworkSpec = Field(default_factory=NetworkSpec)
    allow_public_traffic: bool = Field(
        default=False,
        description="Serve the sandbox's ports (/v1/sandboxes/{id}/ports/{port}/...) without credentials.",
    )


class ContextInfo(BaseModel):
    id: str
    language: str
    cwd: str
    state: ContextState
    execution_count: int = 0
    restarts: int = 0
    last_exit: KernelExit | None = None
    last_activity: float = Field(default=0.0, description="When the kernel last sent or was sent a message.")


class SandboxUsage(BaseModel):
    """Current resource use (isolated sandboxes; from the sandbox's cgroup and home)."""

    memory_bytes: int | None = None
    memory_peak_bytes: int | None = None
    pids: int | None = None
    cpu_seconds: float | None = None
    disk_used_bytes: int | None = None
    disk_total_bytes: int | None = None


class ContextList(BaseModel):
    contexts: list[ContextInfo]


class SandboxInfo(BaseModel):
    id: str
    template: str
    state: SandboxState
    created_at: float
    end_at: float | None = None
    ended_at: float | None = None
    end_reason: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    envs: dict[str, str] = Field(default_factory=dict)
    limits: Limits = Field(default_factory=Limits)
    contexts: list[ContextInfo] = Field(default_factory=list)
    isolation: str = "none"
    runtime: str = "local"
    usage: SandboxUsage | None = None
    last_kernel_exit: KernelExit | None = None
    network: NetworkSpec = Field(default_factory=NetworkSpec)
    allow_public_traffic: bool = False
    traffic_token: str | None = Field(
        default=None,
        description="Opens the sandbox's ports without the API key (header X-Cellbox-Traffic-Token or query "
        "cellbox_token).",
    )
    ports_domain: str | None = Field(
        default=None, description="Ports are also served at {port}-{id}.{ports_domain} (when the service has one)."
    )


class SandboxList(BaseModel):
    sandboxes: list[SandboxInfo]


class TimeoutBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    timeout: float = Field(gt=0, description="Seconds from now until the sandbox expires.")


class ContextCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    language: str = "python"
    cwd: str | None = None


class ExecuteRequest(BaseModel):
    """Body of ``POST /v1/sandboxes/{id}/execute``."""

    model_config = ConfigDict(extra="forbid")

    code: str
    context: str | None = Field(default=None, description="Context id; default: the sandbox's python context.")
    language: str | None = Field(default=None, description="Pick the sandbox's first context of this language.")
    envs: dict[str, str] = Field(default_factory=dict)
    timeout: float | None = Field(default=None, gt=0)
    inline: bool = Field(default=False, description="Also keep images base64 in the result data.")
    interrupt_on_disconnect: bool = Field(
        default=False, description="Interrupt the execution when the client that started it goes away."
    )
    allow_stdin: bool = Field(
        default=False,
        description="Let input() ask for a value (answer with POST .../executions/{eid}/input); "
        "else input() raises at once.",
    )


class ExecutionInfo(BaseModel):
    """An execution without its events (``GET .../executions``)."""

    id: str
    sandbox_id: str
    context_id: str
    status: Literal["queued", "running"] | EndStatus
    created_at: float
    ended_at: float | None = None
    execution_count: int | None = None
    code: str = ""


class ExecutionList(BaseModel):
    executions: list[ExecutionInfo]


class InputBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    value: str = Field(description="The line to answer input() with (no newline needed).")


class ExecutionRecord(ExecutionInfo):
    """An execution with its events (replay)."""

    events: list[Event] = Field(default_factory=list)


class ArtifactInfo(BaseModel):
    id: str
    sandbox_id: str
    execution_id: str | None
    mime: str
    size: int
    url: str
    created_at: float


class ArtifactList(BaseModel):
    artifacts: list[ArtifactInfo]


# ---------------------------------------------------------------------------------------------
# Commands and files


class PtySize(BaseModel):
    """A terminal's size."""

    model_config = ConfigDict(extra="forbid")

    rows: int = Field(ge=1, le=65535)
    cols: int = Field(ge=1, le=65535)


class CommandRequest(BaseModel):
    """Body of ``POST /v1/sandboxes/{id}/commands``: runs ``bash -lc CMD`` in the sandbox."""

    model_config = ConfigDict(extra="forbid")

    cmd: str = Field(default="", description="The shell command; with `pty` it defaults to an interactive login shell.")
    cwd: str | None = Field(
        default=None,
        description="Working directory; default: a rootfs template's WORKDIR, else /home/user.",
    )
    envs: dict[str, str] = Field(default_factory=dict)
    timeout: float | None = Field(
        default=None, ge=0, description="Seconds until the command's process group is killed; 0: never."
    )
    background: bool = Field(default=False, description="Answer at once with the pid instead of streaming.")
    user: str | None = Field(
        default=None, description="Run as this user: `user` (the default) or `root` (sandboxes that offer it)."
    )
    pty: PtySize | None = Field(
        default=None,
        description="Run in a new terminal of this size: output comes as `pty` events (raw bytes, base64), "
        "stdin goes to the terminal, and the terminal can be resized.",
    )
    tag: str | None = Field(
        default=None, max_length=256, description="A label that finds the running command instead of its pid."
    )


class CommandInfo(BaseModel):
    pid: int
    cmd: str
    cwd: str
    started_at: float
    running: bool
    pty: bool = False
    tag: str | None = None
    exit_code: int | None = None
    signal: int | None = None
    ended_at: float | None = None


class CommandList(BaseModel):
    commands: list[CommandInfo]


class _CommandEvent(BaseModel):
    model_config = ConfigDict(extra="ignore")

    pid: int
    seq: int | None = None


class CommandStartEvent(_CommandEvent):
    type: Literal["start"] = "start"
    cmd: str
    cwd: str


class CommandStdoutEvent(_CommandEvent):
    type: Literal["stdout"] = "stdout"
    text: str


class CommandStderrEvent(_CommandEvent):
    type: Literal["stderr"] = "stderr"
    text: str


class CommandPtyEvent(_CommandEvent):
    """Output of a command run in a terminal: raw terminal bytes, base64."""

    type: Literal["pty"] = "pty"
    data: str


class CommandExitEvent(_CommandEvent):
    """Always a command's last event: ``exit_code``, or the ``signal`` that killed it."""

    type: Literal["exit"] = "exit"
    exit_code: int | None = None
    signal: int | None = None
    duration_ms: float = 0.0
    reason: str | None = None
    timed_out: bool | None = None


class CommandKeepaliveEvent(_CommandEvent):
    type: Literal["keepalive"] = "keepalive"


CommandEvent = Annotated[
    CommandStartEvent
    | CommandStdoutEvent
    | CommandStderrEvent
    | CommandPtyEvent
    | CommandExitEvent
    | CommandKeepaliveEvent,
    Field(discriminator="type"),
]


class CommandRecord(CommandInfo):
    """A command with its events (``start``, ``stdout``, ``stderr``, ``exit``)."""

    events: list[CommandEvent] = Field(default_factory=list)


class StdinBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: str = Field(description="Text to write to the command's stdin (or terminal).")
    encoding: Literal["utf-8", "base64"] | None = Field(
        default=None, description="How `data` is encoded (default utf-8: text as it is)."
    )


class SignalBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    signal: str | int = Field(default="SIGTERM", description="A name (SIGTERM, SIGKILL, SIGINT, ...) or number.")


class EntryInfo(BaseModel):
    """A file system entry in a sandbox."""

    name: str
    path: str
    type: Literal["file", "dir", "symlink", "other"]
    size: int
    mode: int
    permissions: str
    modified_time: float
    symlink_target: str | None = None


class EntryList(BaseModel):
    entries: list[EntryInfo]
    truncated: bool = False


class FsEvent(BaseModel):
    """One change in a watched directory (``GET .../files/watch``)."""

    type: Literal["create", "write", "remove", "rename", "chmod"]
    path: str
    is_dir: bool = False


class WatchingEvent(BaseModel):
    """The first line of a watch stream: the watch is in place."""

    type: Literal["watching"] = "watching"
    path: str
    recursive: bool


class WatchKeepaliveEvent(BaseModel):
    type: Literal["keepalive"] = "keepalive"


class Exists(BaseModel):
    exists: bool


class Created(BaseModel):
    created: bool
    entry: EntryInfo


class MkdirBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str
    parents: bool = True


class MoveBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    src: str
    dst: str


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    version: str
    isolation: str
    runtime: str
    sandboxes: int
    pool: dict[str, int] = Field(default_factory=dict, description="Ready sandboxes in the warm pool, per template.")


# -- egress --------------------------------------------------------------------------------------


class EgressRecordInfo(BaseModel):
    """One connection a sandbox asked its egress proxy for, and what was decided."""

    seq: int
    time: float
    protocol: str = Field(description="connect, http, socks5, or unknown (a handshake that never finished).")
    host: str = Field(description="What the sandbox asked for: a name or an address.")
    port: int
    allowed: bool
    reason: str
    address: str | None = Field(default=None, description="The resolved address the decision was made on.")
    rule: str | None = Field(default=None, description="The allow/deny entry that decided, if any.")
    error: str | None = Field(default=None, description="Allowed, but the upstream could not be reached.")
    server_name: str | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    closed_at: float | None = None


class EgressSummary(BaseModel):
    sandbox_id: str
    allowed: int = 0
    denied: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    next: int = Field(default=0, description="The seq the next record will have (pass after=next-1 to poll).")


class EgressLogPage(BaseModel):
    """``GET /v1/sandboxes/{id}/egress``: the totals and the records with ``seq > after``."""

    summary: EgressSummary
    records: list[EgressRecordInfo] = Field(default_factory=list)
