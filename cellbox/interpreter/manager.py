"""SandboxManager: the core's front door for lifecycle, ownership and capacity.

It owns the live sandboxes, the state store and the artifact store, enforces ownership (a
sandbox belongs to the API key that created it; anyone else gets ``SandboxNotFound``),
capacity (per key and for the host), timeouts and expiry, and keeps the store in step with
what is live. The work inside a sandbox goes through the objects a
:class:`~cellbox.interpreter.sandbox.Sandbox` carries (``sbx.executions``, ``sbx.commands``,
``sbx.files``, ``sbx.contexts``, ``sbx.artifacts``): faces get one with :meth:`get`.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import secrets
import shlex
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import cellbox
from cellbox.aio import TaskSet, cancel_and_wait
from cellbox.interpreter.artifacts import ArtifactStore, BlobStore
from cellbox.interpreter.config import Settings
from cellbox.interpreter.errors import (
    ArtifactNotFound,
    Conflict,
    InvalidRequest,
    RuntimeUnavailable,
    SandboxLimitReached,
    SandboxNotFound,
    ServiceAtCapacity,
    TemplateNotFound,
    Unauthorized,
)
from cellbox.interpreter.metrics import Sampler
from cellbox.interpreter.models import (
    ArtifactInfo,
    Health,
    Limits,
    NetworkSpec,
    SandboxCreate,
    SandboxInfo,
    SandboxState,
)
from cellbox.interpreter.pool import WarmPool
from cellbox.interpreter.reaper import Reaper
from cellbox.interpreter.sandbox import Sandbox
from cellbox.interpreter.store import StateStore, open_from_settings
from cellbox.interpreter.templates import TemplateRegistry
from cellbox.runtimes.base import Runtime
from cellbox.runtimes.specs import TemplateInfo

if TYPE_CHECKING:
    from cellbox.egress.log import EgressLog
    from cellbox.egress.service import Egress

log = logging.getLogger("cellbox.manager")

# What a client told to come back later (the host is full) should wait, in seconds.
RETRY_AFTER_FULL = 5


def new_sandbox_id() -> str:
    return f"sb_{secrets.token_hex(8)}"


def open_egress(settings: Settings) -> Egress:
    """The service's one :class:`~cellbox.egress.service.Egress` from settings: the operator's
    policy (the host's own addresses refused), the host's trust and package-index configuration,
    the proxy limits and the package cache. Called by :meth:`SandboxManager.open`."""
    import ipaddress

    from cellbox.egress.apt import AptCache, apt_caches
    from cellbox.egress.cache import PackageCache
    from cellbox.egress.hosttrust import read_host_config
    from cellbox.egress.npm import NpmCache
    from cellbox.egress.policy import OperatorPolicy
    from cellbox.egress.proxy import ProxyLimits
    from cellbox.egress.service import Egress, host_addresses

    own = host_addresses()
    try:
        own.append(str(ipaddress.ip_address(settings.host)))
    except ValueError:
        pass  # a host name: its addresses are the interfaces' already
    try:
        operator = OperatorPolicy.build(
            allow=settings.egress_allow,
            deny=settings.egress_deny,
            permit=settings.egress_permit,
            own_addresses=own,
            ports=settings.egress_ports or None,
            enabled=settings.egress_enabled,
        )
    except ValueError as exc:
        raise RuntimeUnavailable(f"invalid egress settings: {exc}") from exc
    host = read_host_config()
    cache = npm_cache = None
    apt: list[AptCache] = []
    if settings.egress_enabled and settings.package_cache:
        index = settings.package_cache_index_url or host.pip.index_url or "https://pypi.org/simple/"
        cache = PackageCache(
            settings.resolved_package_cache_dir(),
            index,
            max_bytes=settings.package_cache_max_mb << 20,
            ca_bundle=host.ca_bundle,
        )
        registry = settings.package_cache_npm_registry or host.npm.registry or "https://registry.npmjs.org/"
        npm_cache = NpmCache(
            settings.resolved_package_cache_dir() / "npm",
            registry,
            max_bytes=settings.package_cache_max_mb << 20,
            ca_bundle=host.ca_bundle,
        )
        apt = apt_caches(
            settings.resolved_package_cache_dir() / "apt", host, max_bytes=settings.package_cache_max_mb << 20
        )
    limits = ProxyLimits(max_connections=settings.egress_max_connections, idle_timeout=settings.egress_idle_timeout)
    return Egress(
        operator,
        host=host,
        limits=limits,
        cache=cache,
        npm_cache=npm_cache,
        apt_caches=apt,
        log_size=settings.egress_log_size,
    )


class SandboxManager:
    """Creates, finds and removes sandboxes. Start with :meth:`start` (or :meth:`open`)."""

    def __init__(
        self,
        settings: Settings,
        runtime: Runtime,
        store: StateStore,
        artifacts: BlobStore,
        egress: Egress | None = None,
    ) -> None:
        self.settings = settings
        self.runtime = runtime
        # The service's egress (network specs, proxies, decision logs); None: the runtime alone
        # decides what a network spec gets (a test's fake runtime).
        self.egress = egress
        self.store = store
        self.artifacts = artifacts
        self.templates = TemplateRegistry(settings.resolved_templates_dir())
        self.sandboxes: dict[str, Sandbox] = {}
        self._creating = 0  # cold builds under way (the host cap counts them)
        self._reserved: Counter[str] = Counter()  # per-key creates under way (the key cap counts them)
        self.pool = WarmPool(
            {name: settings.pool_size for name in settings.pool_templates},
            build=self._build_pooled,
            has_capacity=lambda: self.live_count() < self.settings.max_sandboxes,
            destroy=self._destroy,
        )
        self.reaper = Reaper(
            lambda: self.sandboxes.values(),
            lambda sb: self._kill(sb, "expired"),
            self._purge,
            interval=settings.reap_interval,
            retention=settings.history_retention,
        )
        self._reaping: asyncio.Task[None] | None = None
        self.metrics = Sampler(lambda: self.sandboxes.values(), settings.metrics_interval, settings.metrics_samples)
        self._sampling: asyncio.Task[None] | None = None
        self._saves: dict[str, asyncio.Task[None]] = {}
        self._save_again: set[str] = set()
        self.tasks = TaskSet("manager")

    @classmethod
    async def open(cls, settings: Settings, runtime: Runtime | None = None) -> SandboxManager:
        """Build the stores, the egress and the runtime from settings and start. Used by the
        API's lifespan. A ``runtime`` given is used as it is (with no egress of the manager's)."""
        egress = None
        if runtime is None:
            from cellbox.runtimes import load_runtime

            settings.data_dir.mkdir(parents=True, exist_ok=True)
            egress = open_egress(settings)
            try:
                runtime = load_runtime(settings, egress=egress)
            except BaseException:
                await egress.aclose()
                raise
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        store = await open_from_settings(settings)
        manager = cls(settings, runtime, store, ArtifactStore(settings.data_dir / "artifacts"), egress)
        try:
            await manager.start()
        except BaseException:
            await store.close()
            if egress is not None:
                await egress.aclose()
            raise
        return manager

    async def start(self) -> None:
        self._check_default_template()
        await self.runtime.startup()
        lost, ended = await self.store.mark_lost("the service restarted; the kernel ended with it")
        log.info("service instance %s", self.store.instance_id)
        if lost or ended:
            log.warning(
                "service restart: instance %s: %d sandboxes marked lost, %d executions closed",
                self.store.instance_id,
                len(lost),
                len(ended),
            )
        self._reaping = asyncio.create_task(self.reaper.run(), name="cellbox-reaper")
        self._sampling = asyncio.create_task(self.metrics.run(), name="cellbox-metrics")
        self.pool.start()

    def _check_default_template(self) -> None:
        """Refuse to start where every create would fail: isolated sandboxes, no built
        template at all, and this service's own Python (the fallback ``default``) living
        outside what a sandbox sees (a pyenv, or a venv of another interpreter). With other
        templates built, only warn: creates that name one of them work."""
        problem = self._default_template_problem()
        if problem is None:
            return
        if any(name != "default" for name in self.templates.names()):
            log.warning("%s; creates without a template will fail", problem)
            return
        raise RuntimeUnavailable(problem)

    def _default_template_problem(self) -> str | None:
        root = self.templates.root
        if self.runtime.isolation == "none" or (root / "default" / "template.json").exists():
            return None
        try:
            template: TemplateInfo | None = self.templates.get("default")
        except TemplateNotFound:
            template = None
        if template is not None:
            python = Path(os.path.realpath(template.python))
            visible = [Path("/usr")] + ([template.env_dir.parent] if template.env_dir else [])
            # the sandbox binds the venv's parent (made searchable then): the dirs above it must
            # be searchable by other users (a venv in /root is not)
            closed = _closed_to_others(template.env_dir.parent) if template.env_dir else None
            if closed is not None:
                return (
                    f"no 'default' template in {root}, and isolated sandboxes cannot reach this service's own Python "
                    f"in {template.env_dir} ({closed} is not searchable by other users): `chmod o+x {closed}`, "
                    f"install cellbox in a venv other users can reach, build the template with "
                    f"`{self._build_default}`, or serve with --isolation none"
                )
            if any(python.is_relative_to(v) for v in visible):
                return None
        return (
            f"no 'default' template in {root}, and isolated sandboxes cannot run this service's own Python: "
            f"build it with `{self._build_default}`, or serve with --isolation none"
        )

    @property
    def _build_default(self) -> str:
        """The command that builds the default template into this service's data dir: the
        source ships with cellbox, so it works from a pip install (no checkout needed)."""
        return f"cellbox template build --name default --data-dir {shlex.quote(str(self.settings.data_dir))}"

    async def close(self) -> None:
        """Stop every sandbox's kernels (their records stay, marked lost on next start)."""
        await cancel_and_wait(self._reaping)
        await cancel_and_wait(self._sampling)
        await self.pool.close()
        await asyncio.gather(*(self._destroy(sb) for sb in self.sandboxes.values()))
        await asyncio.gather(*self._saves.values(), return_exceptions=True)
        await self.tasks.wait()
        await self.runtime.shutdown()
        if self.egress is not None:
            await self.egress.aclose()
        await self.store.close()

    # -- creating -------------------------------------------------------------------------

    def live_count(self) -> int:
        """Sandboxes that hold resources: live ones, pooled ones and ones being built."""
        return len(self.sandboxes) + self.pool.size() + self._creating

    def _owned_count(self, owner: str) -> int:
        return sum(1 for sb in self.sandboxes.values() if sb.owner == owner) + self._reserved[owner]

    async def create(self, owner: str, req: SandboxCreate) -> SandboxInfo:
        """Create a sandbox and return once its default python context is ready: from the
        warm pool when one is ready for the template and the request asks for default limits,
        else cold.

        Raises TemplateNotFound, SandboxLimitReached (per key), ServiceAtCapacity (host),
        InvalidRequest (a timeout or limit beyond the configured maxima, a network the
        runtime cannot give), KernelStartFailed.
        """
        s = self.settings
        timeout = req.timeout if req.timeout is not None else s.sandbox_timeout
        if timeout > s.max_sandbox_timeout:
            raise InvalidRequest(f"timeout may be at most {s.max_sandbox_timeout:g} s", field="timeout")
        self._check_limits(req.limits)
        if self.egress is not None:
            self.egress.parse(req.network)  # InvalidRequest naming the entry, before anything starts
        template = self.templates.get(req.template)
        # Reserve the key's slot before the first await: concurrent creates must see it.
        if self._owned_count(owner) >= s.max_sandboxes_per_key:
            raise SandboxLimitReached(f"this API key has its maximum of {s.max_sandboxes_per_key} sandboxes")
        self._reserved[owner] += 1
        try:
            sandbox = await self._create_reserved(owner, req, template, timeout)
        finally:
            self._reserved[owner] -= 1
            if not self._reserved[owner]:
                del self._reserved[owner]
        return await sandbox.info()

    async def _create_reserved(self, owner: str, req: SandboxCreate, template: TemplateInfo, timeout: float) -> Sandbox:
        pooled = None
        # Pooled sandboxes were built with the template's limits and no network: only a request
        # for exactly that may take one.
        if not req.limits.model_dump(exclude_none=True) and req.network == NetworkSpec():
            pooled = self.pool.take(template.name)
        if pooled is not None:
            sandbox = pooled
            await self._claim(sandbox, owner, req, timeout)
        else:
            if self.live_count() >= self.settings.max_sandboxes:
                raise ServiceAtCapacity(
                    f"this service runs its maximum of {self.settings.max_sandboxes} sandboxes",
                    retry_after=RETRY_AFTER_FULL,
                )
            limits = Limits(
                **{**template.limits.model_dump(exclude_none=True), **req.limits.model_dump(exclude_none=True)}
            )
            sandbox = await self.build(template, limits, req)
            sandbox.owner = owner
            info = sandbox.info_base
            info.metadata, info.end_at = dict(req.metadata), info.created_at + timeout
            sandbox.transition(SandboxState.RUNNING)
        self.sandboxes[sandbox.id] = sandbox
        await self.store.put_sandbox(owner, await sandbox.record())
        log.info("sandbox %s created (template %s%s)", sandbox.id, template.name, ", warm" if pooled else "")
        return sandbox

    def _check_limits(self, limits: Limits) -> None:
        s = self.settings
        maxima = {
            "memory_mb": s.max_memory_mb,
            "cpu": s.max_cpu,
            "pids": s.max_pids,
            "disk_mb": s.max_disk_mb,
            "nofile": s.max_nofile,
            "fsize_mb": s.max_disk_mb,
            "execution_timeout": s.max_execution_timeout,
        }
        for name, value in limits.model_dump(exclude_none=True).items():
            if value > maxima[name]:
                raise InvalidRequest(f"limits.{name} may be at most {maxima[name]:g}", field=f"limits.{name}")

    async def _build_pooled(self, template_name: str) -> Sandbox:
        template = self.templates.get(template_name)
        return await self.build(template, Limits(**template.limits.model_dump()), SandboxCreate())

    async def build(self, template: TemplateInfo, limits: Limits, req: SandboxCreate) -> Sandbox:
        """Start a sandbox (runtime resources + the default python context), owned by nobody and
        not registered yet. Used for cold creates and to fill the warm pool."""
        info = SandboxInfo(
            id=new_sandbox_id(),
            template=template.name,
            state=SandboxState.STARTING,
            created_at=time.time(),
            envs=dict(req.envs),
            limits=limits,
            isolation=self.runtime.isolation,
            runtime=self.runtime.name,
            network=req.network,
            allow_public_traffic=req.allow_public_traffic,
            traffic_token=secrets.token_urlsafe(24),
            ports_domain=self.settings.ports_domain,
        )
        sandbox = Sandbox(info, "", self.settings, self.runtime, self.store, self.artifacts, self._save)
        self._creating += 1
        try:
            backend = await self.runtime.create_sandbox(info.id, template, limits, dict(req.envs), req.network)
            sandbox.attach(backend)
            try:
                ctx = await sandbox.contexts.create("python", None)
                if template.preload:
                    await backend.prepare_context(ctx.id, preload=template.preload, envs={})
            except BaseException:
                await self._destroy(sandbox)
                raise
        except BaseException:
            if self.egress is not None:
                self.egress.forget(info.id)  # a sandbox that never was: no record, no log
            raise
        finally:
            self._creating -= 1
        return sandbox

    async def _claim(self, sandbox: Sandbox, owner: str, req: SandboxCreate, timeout: float) -> None:
        """Hand a pooled sandbox to its one and only owner."""
        now = time.time()
        sandbox.owner = owner
        info = sandbox.info_base
        info.created_at, info.end_at, info.metadata = now, now + timeout, dict(req.metadata)
        info.allow_public_traffic = req.allow_public_traffic
        sandbox.transition(SandboxState.RUNNING)
        if req.envs:
            info.envs = dict(req.envs)
            assert sandbox.backend is not None
            await sandbox.backend.prepare_context(sandbox.contexts.default_id, preload=[], envs=req.envs)

    def _save(self, sandbox: Sandbox) -> None:
        """Persist a sandbox's record soon; coalesces bursts of changes into one write."""
        sid = sandbox.id
        task = self._saves.get(sid)
        if task is not None and not task.done():
            self._save_again.add(sid)
            return
        if not sandbox.owner:
            return  # not handed out yet (building, or in the pool): nothing to keep

        async def save() -> None:
            try:
                while True:
                    self._save_again.discard(sid)
                    try:
                        await self.store.put_sandbox(sandbox.owner, await sandbox.record())
                    except Exception:
                        log.exception("could not save sandbox %s", sid)
                    if sid not in self._save_again:
                        return
            finally:
                if self._saves.get(sid) is asyncio.current_task():
                    del self._saves[sid]

        self._saves[sid] = self.tasks.spawn(save(), name=f"save-{sid}")

    # -- finding --------------------------------------------------------------------------

    async def get(self, owner: str, sandbox_id: str) -> Sandbox:
        """The owner's sandbox; SandboxNotFound if unknown or someone else's.

        A live one (running or paused) is the sandbox itself; an ended one (killed, expired,
        lost) is a read-only view of its record: its history (executions, artifacts) reads
        from the store, and work (code, commands, files, contexts) gets SandboxNotRunning,
        as work on a paused one does until it is resumed."""
        sb = self.sandboxes.get(sandbox_id)
        if sb is not None:
            if sb.owner != owner:
                raise SandboxNotFound(f"no sandbox {sandbox_id!r}")
            return sb
        info = await self.info(owner, sandbox_id)  # raises SandboxNotFound
        return Sandbox(info, owner, self.settings, self.runtime, self.store, self.artifacts, lambda _: None)

    async def live(self, owner: str, sandbox_id: str) -> Sandbox:
        """:meth:`get`, and the sandbox must be running (not paused, not ended)."""
        sb = await self.get(owner, sandbox_id)
        sb.require_running()
        return sb

    async def traffic(self, sandbox_id: str, owner: str | None, token: str | None) -> Sandbox:
        """The running sandbox whose ports a caller may open: its owner (``owner``: the caller's
        authenticated owner id, None without a key), anyone with its traffic token, or anyone at
        all when it was created with ``allow_public_traffic``. SandboxNotFound for an unknown
        sandbox or another owner's key; Unauthorized without a valid credential;
        SandboxNotRunning when paused or ended."""
        sb = self.sandboxes.get(sandbox_id)
        if sb is None or not sb.owner:
            if owner is not None:
                (await self.get(owner, sandbox_id)).require_running()  # 404, or "not running"
            raise SandboxNotFound(f"no sandbox {sandbox_id!r}")
        expected = sb.info_base.traffic_token
        if owner is not None and sb.owner == owner:
            pass
        elif token and expected and hmac.compare_digest(token.encode(), expected.encode()):
            pass
        elif sb.info_base.allow_public_traffic:
            pass
        elif owner is not None and not token:
            raise SandboxNotFound(f"no sandbox {sandbox_id!r}")
        else:
            raise Unauthorized(
                "this sandbox's ports need its owner's API key or its traffic token "
                "(header X-Cellbox-Traffic-Token or query cellbox_token)"
            )
        sb.require_running()
        return sb

    async def info(self, owner: str, sandbox_id: str) -> SandboxInfo:
        sb = self.sandboxes.get(sandbox_id)
        if sb is not None:
            if sb.owner != owner:
                raise SandboxNotFound(f"no sandbox {sandbox_id!r}")
            return await sb.info()
        row = await self.store.get_sandbox(sandbox_id)
        if row is None or row[0] != owner:
            raise SandboxNotFound(f"no sandbox {sandbox_id!r}")
        return SandboxInfo.model_validate(row[1])

    async def list_sandboxes(
        self, owner: str, states: list[str] | None = None, metadata: dict[str, str] | None = None
    ) -> list[SandboxInfo]:
        wanted = states or [SandboxState.RUNNING.value, SandboxState.PAUSED.value, SandboxState.STARTING.value]
        out = []
        for doc in await self.store.list_sandboxes(owner, wanted):
            live = self.sandboxes.get(doc["id"])
            info = await live.info() if live is not None else SandboxInfo.model_validate(doc)
            if metadata and any(info.metadata.get(k) != v for k, v in metadata.items()):
                continue
            out.append(info)
        return out

    # -- ending ---------------------------------------------------------------------------

    async def delete(self, owner: str, sandbox_id: str) -> None:
        """Kill a sandbox and free its resources; its history stays for ``history_retention``."""
        sb = self.sandboxes.get(sandbox_id)
        if sb is None or sb.owner != owner:
            await self.info(owner, sandbox_id)  # raises SandboxNotFound if it is not ours
            return  # already killed or lost: nothing live to free
        await self._kill(sb, "killed")

    async def _kill(self, sb: Sandbox, why: str) -> None:
        self.sandboxes.pop(sb.id, None)
        self.pool.wake()
        sb.transition(SandboxState.KILLED)
        sb.info_base.ended_at = time.time()
        sb.info_base.end_reason = why
        await self._destroy(sb)
        await self.store.put_sandbox(sb.owner, await sb.record())
        log.info("sandbox %s %s", sb.id, why)

    async def _destroy(self, sb: Sandbox) -> None:
        """Stop a sandbox's kernels and free its runtime resources. Never raises."""
        backend = sb.backend
        if backend is not None:
            try:
                await self.runtime.resume(backend)  # frozen processes cannot be reaped
            except Exception:
                log.debug("sandbox %s: resume before destroy failed", sb.id, exc_info=True)
        await sb.close()
        if backend is not None:
            try:
                await self.runtime.destroy_sandbox(backend)
            except Exception:
                log.exception("sandbox %s: could not free its resources", sb.id)

    async def pause(self, owner: str, sandbox_id: str) -> SandboxInfo:
        """Freeze every process of the sandbox (memory kept). Conflict while an execution runs:
        its deadline would expire frozen. Work on a paused sandbox gets 409 until resumed."""
        sb = await self.live(owner, sandbox_id)
        if sb.busy():
            raise Conflict(f"sandbox {sandbox_id} is running an execution; interrupt it or wait before pausing")
        assert sb.backend is not None
        await self.runtime.pause(sb.backend)
        sb.transition(SandboxState.PAUSED)
        await self.store.put_sandbox(owner, await sb.record())
        return await sb.info()

    async def resume(self, owner: str, sandbox_id: str) -> SandboxInfo:
        sb = await self.get(owner, sandbox_id)
        if sb.state != SandboxState.PAUSED:
            return await sb.info()
        assert sb.backend is not None
        await self.runtime.resume(sb.backend)
        sb.transition(SandboxState.RUNNING)
        await self.store.put_sandbox(owner, await sb.record())
        return await sb.info()

    async def set_timeout(self, owner: str, sandbox_id: str, timeout: float) -> SandboxInfo:
        if timeout <= 0 or timeout > self.settings.max_sandbox_timeout:
            raise InvalidRequest(
                f"timeout must be in (0, {self.settings.max_sandbox_timeout:g}] seconds", field="timeout"
            )
        sb = await self.get(owner, sandbox_id)
        if sb.state != SandboxState.PAUSED:
            sb.require_running()
        sb.info_base.end_at = time.time() + timeout
        await self.store.put_sandbox(owner, await sb.record())
        return await sb.info()

    async def _purge(self, older_than: float) -> None:
        purged = await self.store.purge_sandboxes(older_than)
        if self.egress is not None:
            for sid in purged:
                self.egress.forget(sid)
        if purged:
            referenced = await self.store.referenced_artifacts()
            removed = await self.artifacts.delete_unreferenced(referenced)
            log.info("purged %d old sandboxes and %d artifact blobs", len(purged), removed)

    # -- artifacts ------------------------------------------------------------------------

    async def artifact(self, owner: str, artifact_id: str) -> tuple[ArtifactInfo, AsyncIterator[bytes]]:
        """An artifact's record and its bytes; ArtifactNotFound unless the owner made it."""
        row = await self.store.find_artifact(artifact_id, owner)
        if row is None:
            raise ArtifactNotFound(f"no artifact {artifact_id!r}")
        await self.artifacts.size(artifact_id)  # ArtifactNotFound before the response starts
        return ArtifactInfo(url="", **row), self.artifacts.open(artifact_id)

    # -- egress -----------------------------------------------------------------------------

    async def egress_log(self, owner: str, sandbox_id: str) -> EgressLog | None:
        """The sandbox's egress decisions (also after it ended, until it is purged); None when
        it never had egress. SandboxNotFound for others' sandboxes."""
        await self.info(owner, sandbox_id)  # ownership
        return self.egress.log(sandbox_id) if self.egress is not None else None

    # -- the service ------------------------------------------------------------------------

    def health(self) -> Health:
        return Health(
            version=cellbox.__version__,
            isolation=self.runtime.isolation,
            runtime=self.runtime.name,
            sandboxes=len(self.sandboxes),
            pool=self.pool.counts(),
        )


def _closed_to_others(path: Path) -> Path | None:
    """The first directory above ``path`` that other users cannot search (None: all can)."""
    for parent in reversed(path.parents):
        try:
            if not os.stat(parent).st_mode & 0o001:
                return parent
        except OSError:
            return parent
    return None
