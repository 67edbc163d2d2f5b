"""Service settings: one typed object, built at the edge (CLI, tests) and passed down.

Every field can be set from the environment with the ``CELLBOX_`` prefix
(``CELLBOX_PORT=9000``, ``CELLBOX_API_KEYS='["k1","k2"]'``). Every field has a description;
a test keeps it so.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _default_data_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/cellbox")
    return Path.home() / ".local" / "share" / "cellbox"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CELLBOX_", frozen=True, extra="forbid")

    host: str = Field("127.0.0.1", description="Address the HTTP server binds.")
    port: int = Field(8080, description="Port the HTTP server binds.")
    public_url: str | None = Field(
        None, description="Base URL clients reach the service at (for artifact URLs); default: from the request."
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Accepted API keys (CELLBOX_API_KEYS: comma-separated, or a JSON list). Empty: no auth, "
        "and the server may only bind a loopback address.",
    )
    data_dir: Path = Field(
        default_factory=_default_data_dir,
        description="Holds the SQLite state store (by default), artifacts, sandbox homes and the instance id.",
    )
    state_store: str = Field(
        "",
        description="URL of the state store (sandbox records, executions and their events, the artifact index). "
        "Known schemes: 'sqlite:///absolute/path.sqlite3'. Empty: sqlite:///DATA_DIR/state.sqlite3.",
    )
    instance_id: str = Field(
        "",
        pattern=r"^(?:[A-Za-z0-9][A-Za-z0-9._-]{0,63})?$",
        description="Names this service instance in the state store: at startup only its own sandboxes are "
        "marked lost and its own executions closed. Services sharing one store need distinct ids. Empty: a "
        "stable id kept in DATA_DIR/instance-id, created on first start, so a restart recovers its sandboxes.",
    )
    run_dir: Path | None = Field(
        None,
        description="Short path for kernel ipc sockets (unix socket paths are limited to 107 bytes); "
        "default: /run/cellbox as root, else a directory under /tmp.",
    )
    templates_dir: Path | None = Field(None, description="Where templates live; default: DATA_DIR/templates.")
    runtime: str = Field("local", description="Where sandboxes live: 'local' (this host).")
    isolation: Literal["bwrap", "none"] = Field(
        "bwrap",
        description="'bwrap' (default) runs each sandbox in bubblewrap with its own uid, cgroup, seccomp filter, "
        "disk-capped home and no network; it needs root and refuses to start without it. 'none' runs sandboxes "
        "as plain child processes of the service: trusted code only, logged loudly.",
    )
    sandbox_uid_first: int = Field(
        310_000, ge=1000, description="First host uid of the range sandboxes run as (isolation 'bwrap')."
    )
    sandbox_uid_count: int = Field(
        10_000, ge=1, description="How many host uids sandboxes may use (isolation 'bwrap')."
    )
    sandbox_range_first: int = Field(
        1 << 30,
        ge=65536,
        description="First host uid of the uid ranges of rootfs sandboxes (65536 each: root inside is the first); "
        "a second service on the host needs ranges of its own.",
    )
    sandbox_range_count: int = Field(1024, ge=1, description="How many uid ranges rootfs sandboxes may use.")
    cgroup_prefix: str = Field(
        "cellbox",
        description="Name of the cgroup under the service's own cgroup that holds the sandboxes' cgroups; "
        "everything below it is the service's to reap at startup (isolation 'bwrap').",
    )
    default_memory_mb: int = Field(1024, ge=16, description="Default memory limit of a sandbox, MiB (swap off).")
    default_cpu: float = Field(1.0, gt=0, description="Default CPU quota of a sandbox, in CPUs.")
    default_pids: int = Field(256, ge=16, description="Default limit of processes and threads in a sandbox.")
    default_disk_mb: int = Field(1024, ge=16, description="Default size of a sandbox's home, MiB.")
    default_nofile: int = Field(1024, ge=64, description="Default open-files limit (RLIMIT_NOFILE) of a sandbox.")
    default_fsize_mb: int = Field(
        1024, ge=1, description="Default largest file a sandbox may write (RLIMIT_FSIZE), MiB."
    )
    sandbox_tmp_mb: int = Field(
        256, ge=1, description="Size of a sandbox kernel's /tmp (tmpfs, counted as memory), MiB."
    )
    max_sandboxes: int = Field(200, description="Sandboxes the host runs at once (503 past it).")
    max_sandboxes_per_key: int = Field(100, description="Sandboxes one API key may have at once (429 past it).")
    pool_size: int = Field(
        0, description="Ready sandboxes the warm pool keeps per pooled template (0: no pool); they count as live."
    )
    pool_templates: list[str] = Field(default_factory=lambda: ["default"], description="Templates the pool keeps.")
    max_memory_mb: int = Field(16384, description="Largest limits.memory_mb a create may ask for.")
    max_cpu: float = Field(float(os.cpu_count() or 1), description="Largest limits.cpu a create may ask for.")
    max_pids: int = Field(4096, description="Largest limits.pids a create may ask for.")
    max_disk_mb: int = Field(65536, description="Largest limits.disk_mb (and fsize_mb) a create may ask for.")
    max_nofile: int = Field(65536, description="Largest limits.nofile a create may ask for.")
    max_contexts_per_sandbox: int = Field(8, description="Contexts (kernels) one sandbox may have.")
    sandbox_timeout: float = Field(300.0, description="Default seconds until a sandbox expires.")
    max_sandbox_timeout: float = Field(24 * 3600.0, description="Largest timeout a create may ask for.")
    execution_timeout: float = Field(300.0, description="Default wall-clock limit of one execution, seconds.")
    max_execution_timeout: float = Field(3600.0, description="Largest execution timeout a request may ask for.")
    keepalive_interval: float = Field(5.0, description="Seconds of silence before a live stream sends a keepalive.")
    interrupt_grace: float = Field(
        5.0, description="Seconds an interrupted kernel has to go idle before it is restarted."
    )
    kernel_start_timeout: float = Field(60.0, description="Seconds a kernel has to become ready.")
    template_builds: bool = Field(
        False,
        description="Allow POST /v1/templates. A Dockerfile's RUN steps run as root on this host "
        "(buildah, chroot isolation, the host's network): enable only where every API key may have that.",
    )
    max_output_bytes: int = Field(
        64 * 1024 * 1024,
        description="stdout+stderr kept per execution; past it output is cut with a marker.",
    )
    max_request_bytes: int = Field(16 * 1024 * 1024, description="Largest JSON request body (413 past it).")
    max_upload_bytes: int = Field(
        1024 * 1024 * 1024, description="Largest file upload (PUT/POST .../files), streamed (413 past it)."
    )
    max_artifact_bytes: int = Field(
        256 * 1024 * 1024, description="Largest file that can be kept as an artifact (files ?keep=true)."
    )
    command_timeout: float = Field(
        0.0, description="Default seconds before a shell command is killed; 0: never (the sandbox's timeout bounds it)."
    )
    history_retention: float = Field(
        24 * 3600.0, description="Seconds a killed sandbox's executions and artifacts are kept."
    )
    reap_interval: float = Field(5.0, description="Seconds between sweeps for expired sandboxes.")
    metrics_interval: float = Field(
        5.0, gt=0, description="Seconds between resource samples of each running sandbox (E2B's get_metrics)."
    )
    metrics_samples: int = Field(720, ge=1, description="Resource samples kept per sandbox, the newest.")
    egress_enabled: bool = Field(
        True,
        description="Whether sandboxes may ask for outbound network (network.internet / allow_out); false: every "
        "such create is a 422. Egress goes through the service's proxy (HTTP CONNECT, HTTP, SOCKS5) only.",
    )
    egress_allow: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Service-wide allow list (domains, *.wildcards, IPs, CIDRs): when set, sandboxes reach only "
        "these, and a sandbox asking for more gets a 422 naming the entry.",
    )
    egress_deny: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Service-wide deny list (same entries): no sandbox reaches these."
    )
    egress_permit: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Ranges below the floor (loopback, private, link-local, documentation, ...) that sandboxes "
        "may reach after all: CIDRs or 'loopback' / 'private' / 'link-local'. Keep it narrow (a private mirror, "
        "the address an inspecting proxy answers from).",
    )
    egress_ports: list[int] | None = Field(
        None, description="Destination ports sandboxes may connect to (empty/unset: any)."
    )
    egress_max_connections: int = Field(64, ge=1, description="Open egress connections one sandbox may have.")
    egress_idle_timeout: float = Field(
        300.0, gt=0, description="Seconds an egress connection may stay silent both ways before it is closed."
    )
    egress_log_size: int = Field(
        1000, ge=1, description="Egress decisions kept per sandbox (GET /v1/sandboxes/{id}/egress)."
    )
    package_cache: bool = Field(
        True,
        description="Serve pip, npm and apt (plain-http mirrors) through the service's pull-through package "
        "caches (shared by sandboxes).",
    )
    package_cache_dir: Path | None = Field(
        None, description="Where the package cache lives (npm's in npm/, apt's in apt/); default: DATA_DIR/pip-cache."
    )
    package_cache_max_mb: int = Field(10240, ge=1, description="Largest size of the package cache on disk, MiB.")
    package_cache_index_url: str | None = Field(
        None,
        description="The index the package cache fetches from; default: the host's pip index-url, else PyPI's.",
    )
    package_cache_npm_registry: str | None = Field(
        None,
        description="The npm registry the package cache fetches from (npm's cache lives in PACKAGE_CACHE_DIR/npm, "
        "bounded by the same size); default: the host's npm registry, else npmjs'.",
    )
    ports_domain: str | None = Field(
        None,
        description="Also serve sandbox ports by host name: {port}-{sandbox_id}.PORTS_DOMAIN (a wildcard DNS "
        "record pointing at this service), as E2B's get_host; always at /v1/sandboxes/{id}/ports/{port}/.",
    )
    log_level: str = Field("info", description="Log level of the service.")
    log_code: bool = Field(False, description="Log submitted code at DEBUG level (never at INFO).")

    @field_validator("api_keys", "egress_allow", "egress_deny", "egress_permit", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        """``a,b`` or ``["a", "b"]`` from the environment; a list as it is."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [k.strip() for k in text.split(",") if k.strip()]
        return value

    @model_validator(mode="after")
    def _check_egress_policy(self) -> Settings:
        """A bad egress entry is a startup error naming it, not a surprise at the first create."""
        from cellbox.egress.policy import OperatorPolicy

        OperatorPolicy.build(
            allow=self.egress_allow, deny=self.egress_deny, permit=self.egress_permit, ports=self.egress_ports or None
        )  # raises ValueError naming the entry
        return self

    def resolved_run_dir(self) -> Path:
        if self.run_dir is not None:
            return self.run_dir
        if os.geteuid() == 0:
            return Path("/run/cellbox")
        return Path(f"/tmp/cellbox-{os.geteuid()}")

    def resolved_package_cache_dir(self) -> Path:
        return self.package_cache_dir or self.data_dir / "pip-cache"

    def resolved_templates_dir(self) -> Path:
        return self.templates_dir or self.data_dir / "templates"

    def resolved_state_store(self) -> str:
        """The state store URL: ``state_store``, or SQLite in the data dir."""
        return self.state_store or "sqlite://" + os.path.abspath(self.data_dir / "state.sqlite3")
