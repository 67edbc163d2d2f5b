"""SandboxManager: the core's front door. Every face (HTTP, WebSocket, CLI, tests) calls it.

It owns the live sandboxes, the state store and the artifact store, enforces ownership (a
sandbox belongs to the API key that created it; anyone else gets ``SandboxNotFound``),
capacity, timeouts and expiry, and keeps the store in step with what is live.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from cellbox.interpreter import files
from cellbox.interpreter.artifacts import ArtifactStore
from cellbox.interpreter.commands import CommandLog
from cellbox.interpreter.config import Settings
from cellbox.interpreter.errors import (
    ArtifactNotFound,
    Conflict,
    ExecutionNotFound,
    InvalidRequest,
    SandboxLimitReached,
    SandboxNotFound,
    SandboxNotRunning,
    ServiceAtCapacity,
)
from cellbox.interpreter.execution import ExecutionLog
from cellbox.interpreter.models import (
    ArtifactInfo,
    CommandRequest,
    ContextInfo,
    ExecuteRequest,
    ExecutionInfo,
    ExecutionRecord,
    Limits,
    NetworkSpec,
    SandboxCreate,
    SandboxInfo,
    SandboxState,
)
from cellbox.interpreter.pool import WarmPool
from cellbox.interpreter.sandbox import Context, Sandbox, new_id, start_event
from cellbox.interpreter.store import Store
from cellbox.interpreter.templates import TemplateRegistry
from cellbox.runtimes.agent_client import AgentClient
from cellbox.runtimes.local import LocalRuntime as Runtime
from cellbox.runtimes.types import TemplateInfo

log = logging.getLogger("cellbox.manager")

# An ended execution stays in memory this long, so followers that are a little late still
# read it without a store round trip; after that it is served from the store.
_KEEP_ENDED_SECONDS = 30.0


class SandboxManager:
    """Creates, finds and removes sandboxes; runs executions. Start with :meth:`start`."""

    def __init__(self, settings: Settings, runtime: Runtime, store: Store, artifacts: ArtifactStore) -> None:
        self.settings = settings
        self.runtime = runtime
        self.store = store
        self.artifacts = artifacts
        self.templates = TemplateRegistry(settings.resolved_templates_dir())
        self.sandboxes: dict[str, Sandbox] = {}
        self._creating = 0
        self.pool = WarmPool(self, {name: settings.pool_size for name in settings.pool_templates})
        self._reaper: asyncio.Task[None] | None = None
        self._saves: dict[str, asyncio.Task[None]] = {}
        self._save_again: set[str] = set()

    @classmethod
    async def open(cls, settings: Settings, runtime: Runtime | None = None) -> SandboxManager:
        """Build the stores and the runtime from settings and start. Used by the API's lifespan."""
        if runtime is None:
            from cellbox.runtimes import load_runtime

            runtime = load_runtime(settings)
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        store = await Store.open(settings.data_dir / "state.sqlite3")
        manager = cls(settings, runtime, store, ArtifactStore(settings.data_dir / "artifacts"))
        try:
            await manager.start()
        except BaseException:
            await store.close()
            raise
        return manager

    async def start(self) -> None:
        await self.runtime.startup()
        lost, ended = await self.store.mark_lost("the service restarted; the kernel ended with it")
        if lost or ended:
            log.warning("service restart: %d sandboxes marked lost, %d executions closed", len(lost), len(ended))
        self._reaper = asyncio.create_task(self._reap_loop(), name="cellbox-reaper")
        self.pool.start()

    async def close(self) -> None:
        """Stop every sandbox's kernels (their records stay, marked lost on next start)."""
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(BaseException):
                await self._reaper
        await self.pool.close()
        await asyncio.gather(*(sb.close() for sb in self.sandboxes.values()), return_exceptions=True)
        for sb in self.sandboxes.values():
            if sb.handle is not None:
                with contextlib.suppress(Exception):
                    await self.runtime.destroy_sandbox(sb.handle)
        for task in list(self._saves.values()):
            with contextlib.suppress(BaseException):
                await task
        await self.runtime.shutdown()
        await self.store.close()

    # -- sandboxes -------------------------------------------------------------------------

    async def create(self, owner: str, req: SandboxCreate) -> Sandbox:
        """Create a sandbox and return once its default python context is ready: from the
        warm pool when one is ready for the template and the request asks for default limits,
        else cold.

        Raises TemplateNotFound, SandboxLimitReached (per key), ServiceAtCapacity (host),
        InvalidRequest (a timeout or limit beyond the configured maxima), KernelStartFailed.
        """
        s = self.settings
        mine = sum(1 for sb in self.sandboxes.values() if sb.owner == owner)
        if mine >= s.max_sandboxes_per_key:
            raise SandboxLimitReached(f"this API key has its maximum of {s.max_sandboxes_per_key} sandboxes")
        timeout = req.timeout if req.timeout is not None else s.sandbox_timeout
        if timeout > s.max_sandbox_timeout:
            raise InvalidRequest(f"timeout may be at most {s.max_sandbox_timeout:g} s", field="timeout")
        if req.network.internet:
            raise InvalidRequest(
                "outbound network is not available: sandboxes only have their own loopback", field="network"
            )
        self._check_limits(req.limits)
        template = self.templates.get(req.template)
        pooled = self.pool.take(template.name) if not req.limits.model_dump(exclude_none=True) else None
        if pooled is not None:
            sandbox = pooled
            await self._claim(sandbox, owner, req, timeout)
        else:
            if self.live_count() >= s.max_sandboxes:
                raise ServiceAtCapacity(f"this service runs its maximum of {s.max_sandboxes} sandboxes", retry_after=5)
            limits = Limits(
                **{**template.limits.model_dump(exclude_none=True), **req.limits.model_dump(exclude_none=True)}
            )
            sandbox = await self.build(template, limits, req.envs)
            sandbox.owner = owner
            info = sandbox.info_base
            info.metadata, info.end_at = dict(req.metadata), info.created_at + timeout
            info.state = SandboxState.RUNNING
        self.sandboxes[sandbox.id] = sandbox
        await self.store.put_sandbox(owner, sandbox.record())
        log.info("sandbox %s created (template %s%s)", sandbox.id, template.name, ", warm" if pooled else "")
        return sandbox

    def live_count(self) -> int:
        """Sandboxes that hold resources: live ones, pooled ones and ones being built."""
        return len(self.sandboxes) + self.pool.size() + self._creating

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

    async def build(self, template: TemplateInfo, limits: Limits, envs: dict[str, str]) -> Sandbox:
        """Start a sandbox (runtime resources + the default python context), owned by nobody and
        not registered yet. Used for cold creates and to fill the warm pool."""
        now = time.time()
        sid = new_id("sb_")
        info = SandboxInfo(
            id=sid,
            template=template.name,
            state=SandboxState.STARTING,
            created_at=now,
            envs=dict(envs),
            limits=limits,
            isolation=self.runtime.isolation,
            runtime=self.runtime.name,
        )
        sandbox = Sandbox(sid, "", self.settings, self.runtime, self.store, self.artifacts, info, self._save)
        self._creating += 1
        try:
            sandbox.handle = await self.runtime.create_sandbox(sid, template, limits, envs, NetworkSpec())
            try:
                ctx = await sandbox.add_context("python", None)
                if template.preload:
                    await ctx.preload(template.preload)
            except BaseException:
                await sandbox.close()
                await self.runtime.destroy_sandbox(sandbox.handle)
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
        info.state = SandboxState.RUNNING
        if req.envs:
            info.envs = dict(req.envs)
            assert sandbox.handle is not None
            sandbox.handle.envs = dict(req.envs)  # for commands and kernels started from now on
            await sandbox.context().apply_envs(req.envs)

    def _save(self, sandbox: Sandbox) -> None:
        """Persist a sandbox's record soon; coalesces bursts of changes into one write."""
        sid = sandbox.id
        task = self._saves.get(sid)
        if task is not None and not task.done():
            self._save_again.add(sid)
            return

        async def save() -> None:
            while True:
                self._save_again.discard(sid)
                try:
                    await self.store.put_sandbox(sandbox.owner, sandbox.record())
                except Exception:
                    log.exception("could not save sandbox %s", sid)
                if sid not in self._save_again:
                    return

        self._saves[sid] = asyncio.create_task(save())

    async def live(self, owner: str, sandbox_id: str) -> Sandbox:
        """The live sandbox; SandboxNotFound if unknown or someone else's, SandboxNotRunning if
        it exists but is not running (killed, expired, lost)."""
        sb = self.sandboxes.get(sandbox_id)
        if sb is None or sb.owner != owner:
            info = await self.info(owner, sandbox_id)  # raises SandboxNotFound
            raise SandboxNotRunning(f"sandbox {sandbox_id} is {info.state.value}", state=info.state.value)
        sb.require_running()
        return sb

    async def info(self, owner: str, sandbox_id: str) -> SandboxInfo:
        sb = self.sandboxes.get(sandbox_id)
        if sb is not None:
            if sb.owner != owner:
                raise SandboxNotFound(f"no sandbox {sandbox_id!r}")
            await sb.refresh_usage()
            return sb.info()
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
            if live is not None:
                await live.refresh_usage()
            info = live.info() if live is not None else SandboxInfo.model_validate(doc)
            if metadata and any(info.metadata.get(k) != v for k, v in metadata.items()):
                continue
            out.append(info)
        return out

    async def delete(self, owner: str, sandbox_id: str) -> None:
        """Kill a sandbox and free its resources; its history stays for ``history_retention``."""
        sb = self.sandboxes.get(sandbox_id)
        if sb is None or sb.owner != owner:
            await self.info(owner, sandbox_id)  # raises SandboxNotFound if it is not ours
            return  # already killed or lost: nothing live to free
        await self._kill(sb, "killed")

    async def _kill(self, sb: Sandbox, why: str) -> None:
        self.sandboxes.pop(sb.id, None)
        if sb.state == SandboxState.PAUSED and sb.handle is not None:
            with contextlib.suppress(Exception):
                await self.runtime.resume(sb.handle)  # frozen processes cannot be reaped
        self.pool.wake()
        sb.info_base.state = SandboxState.KILLED
        sb.info_base.ended_at = time.time()
        sb.info_base.end_reason = why
        await sb.close()
        if sb.handle is not None:
            await self.runtime.destroy_sandbox(sb.handle)
        await self.store.put_sandbox(sb.owner, sb.record())
        log.info("sandbox %s %s", sb.id, why)

    async def pause(self, owner: str, sandbox_id: str) -> SandboxInfo:
        """Freeze every process of the sandbox (memory kept). Conflict while an execution runs:
        its deadline would expire frozen. Work on a paused sandbox gets 409 until resumed."""
        sb = await self.live(owner, sandbox_id)
        if sb.busy():
            raise Conflict(f"sandbox {sandbox_id} is running an execution; interrupt it or wait before pausing")
        assert sb.handle is not None
        await self.runtime.pause(sb.handle)
        sb.info_base.state = SandboxState.PAUSED
        await self.store.put_sandbox(owner, sb.record())
        return sb.info()

    async def resume(self, owner: str, sandbox_id: str) -> SandboxInfo:
        sb = self.sandboxes.get(sandbox_id)
        if sb is None or sb.owner != owner or sb.state != SandboxState.PAUSED:
            return await self.info(owner, sandbox_id) if sb is None else (await self.live(owner, sandbox_id)).info()
        assert sb.handle is not None
        await self.runtime.resume(sb.handle)
        sb.info_base.state = SandboxState.RUNNING
        await self.store.put_sandbox(owner, sb.record())
        return sb.info()

    async def set_timeout(self, owner: str, sandbox_id: str, timeout: float) -> SandboxInfo:
        if timeout <= 0 or timeout > self.settings.max_sandbox_timeout:
            raise InvalidRequest(
                f"timeout must be in (0, {self.settings.max_sandbox_timeout:g}] seconds", field="timeout"
            )
        sb = self.sandboxes.get(sandbox_id)
        if sb is None or sb.owner != owner or sb.state != SandboxState.PAUSED:
            sb = await self.live(owner, sandbox_id)
        sb.info_base.end_at = time.time() + timeout
        await self.store.put_sandbox(owner, sb.record())
        return sb.info()

    async def _reap_loop(self) -> None:
        last_purge = 0.0
        while True:
            await asyncio.sleep(self.settings.reap_interval)
            now = time.time()
            for sb in list(self.sandboxes.values()):
                if sb.info_base.end_at is not None and sb.info_base.end_at <= now:
                    try:
                        await self._kill(sb, "expired")
                    except Exception:
                        log.exception("could not expire sandbox %s", sb.id)
            if now - last_purge > 600:
                last_purge = now
                try:
                    await self._purge(now - self.settings.history_retention)
                except Exception:
                    log.exception("history purge failed")

    async def _purge(self, older_than: float) -> None:
        purged = await self.store.purge_sandboxes(older_than)
        if purged:
            referenced = await self.store.referenced_artifacts()
            removed = await asyncio.to_thread(self.artifacts.remove_unreferenced, referenced)
            log.info("purged %d old sandboxes and %d artifact blobs", len(purged), removed)

    # -- contexts --------------------------------------------------------------------------

    async def create_context(self, owner: str, sandbox_id: str, language: str, cwd: str | None) -> ContextInfo:
        ctx = await (await self.live(owner, sandbox_id)).add_context(language, cwd)
        return ctx.info()

    async def contexts(self, owner: str, sandbox_id: str) -> list[ContextInfo]:
        return [c.info() for c in (await self.live(owner, sandbox_id)).contexts.values()]

    async def context(self, owner: str, sandbox_id: str, context_id: str) -> Context:
        return (await self.live(owner, sandbox_id)).context(context_id)

    async def remove_context(self, owner: str, sandbox_id: str, context_id: str) -> None:
        await (await self.live(owner, sandbox_id)).remove_context(context_id)

    # -- executions ------------------------------------------------------------------------

    async def execute(self, owner: str, sandbox_id: str, req: ExecuteRequest) -> ExecutionLog:
        """Queue an execution and return its log at once (already holding a ``start`` event).
        It runs to its end whether or not anyone follows the log."""
        sb = await self.live(owner, sandbox_id)
        ctx = sb.context(req.context, req.language)
        timeout = req.timeout or sb.info_base.limits.execution_timeout or self.settings.execution_timeout
        if timeout > self.settings.max_execution_timeout:
            raise InvalidRequest(f"timeout may be at most {self.settings.max_execution_timeout:g} s", field="timeout")
        xlog = ExecutionLog(new_id("ex_"), sb.id, ctx.id, req.code, self.store)
        await xlog.begin(start_event(xlog))
        sb.executions[xlog.id] = xlog
        if self.settings.log_code:
            log.debug("execution %s in %s/%s: %r", xlog.id, sb.id, ctx.id, req.code)
        log.info("execution %s queued in %s/%s (%d bytes)", xlog.id, sb.id, ctx.id, len(req.code))

        async def run() -> None:
            try:
                await ctx.run(xlog, req, timeout)
            finally:
                asyncio.get_running_loop().call_later(_KEEP_ENDED_SECONDS, sb.executions.pop, xlog.id, None)

        task = asyncio.create_task(run(), name=f"execution-{xlog.id}")
        sb.tasks.add(task)
        task.add_done_callback(sb.tasks.discard)
        return xlog

    async def _execution_owned(self, owner: str, sandbox_id: str, execution_id: str) -> ExecutionLog | dict[str, Any]:
        sb = self.sandboxes.get(sandbox_id)
        if sb is not None and sb.owner == owner and execution_id in sb.executions:
            return sb.executions[execution_id]
        await self.info(owner, sandbox_id)  # ownership check, raises SandboxNotFound
        doc = await self.store.get_execution(execution_id)
        if doc is None or doc["sandbox_id"] != sandbox_id:
            raise ExecutionNotFound(f"no execution {execution_id!r} in sandbox {sandbox_id}")
        return doc

    async def execution(self, owner: str, sandbox_id: str, execution_id: str, after: int = -1) -> ExecutionRecord:
        found = await self._execution_owned(owner, sandbox_id, execution_id)
        if isinstance(found, ExecutionLog):
            return ExecutionRecord.model_validate({**found.doc(), "events": found.events[after + 1 :]})
        events = await self.store.get_events(execution_id, after)
        return ExecutionRecord.model_validate({**found, "events": events})

    async def follow(
        self, owner: str, sandbox_id: str, execution_id: str, after: int = -1
    ) -> AsyncIterator[dict[str, Any]]:
        """Events with ``seq > after``: stored ones, then live ones until ``end``."""
        found = await self._execution_owned(owner, sandbox_id, execution_id)
        keepalive = self.settings.keepalive_interval
        if isinstance(found, ExecutionLog):
            return found.follow(after, keepalive)

        async def stored() -> AsyncIterator[dict[str, Any]]:
            for ev in await self.store.get_events(execution_id, after):
                yield ev

        return stored()

    async def executions(self, owner: str, sandbox_id: str) -> list[ExecutionInfo]:
        await self.info(owner, sandbox_id)
        return [ExecutionInfo.model_validate(d) for d in await self.store.list_executions(sandbox_id)]

    async def send_input(self, owner: str, sandbox_id: str, execution_id: str, value: str) -> None:
        sb = await self.live(owner, sandbox_id)
        xlog = sb.executions.get(execution_id)
        if xlog is None or xlog.done.is_set():
            raise ExecutionNotFound(f"no running execution {execution_id!r} in sandbox {sandbox_id}")
        sb.context(xlog.context_id).send_input(value)

    # -- commands --------------------------------------------------------------------------

    async def _agent(self, sb: Sandbox) -> AgentClient:
        assert sb.handle is not None
        return await self.runtime.agent(sb.handle)

    async def start_command(self, owner: str, sandbox_id: str, req: CommandRequest) -> CommandLog:
        """Start ``bash -lc cmd`` in the sandbox; returns its log at once."""
        sb = await self.live(owner, sandbox_id)
        assert sb.handle is not None
        env = self.runtime.process_env(sb.handle, req.envs)
        timeout = req.timeout if req.timeout is not None else self.settings.command_timeout
        log.info("command started in %s (%d bytes)", sb.id, len(req.cmd))
        return await sb.commands.start(await self._agent(sb), req.cmd, env, req.cwd or "/home/user", timeout or None)

    async def commands(self, owner: str, sandbox_id: str) -> list[CommandLog]:
        sb = await self.live(owner, sandbox_id)
        return list(sb.commands.logs.values())

    async def command(self, owner: str, sandbox_id: str, pid: int) -> CommandLog:
        return (await self.live(owner, sandbox_id)).commands.get(pid)

    async def command_stdin(self, owner: str, sandbox_id: str, pid: int, data: bytes | None) -> None:
        """Write to a running command's stdin; ``None`` closes it."""
        sb = await self.live(owner, sandbox_id)
        cmd = sb.commands.get(pid)
        if cmd.done.is_set():
            raise InvalidRequest(f"command {pid} has ended")
        agent = await self._agent(sb)
        if data is None:
            await agent.close_stdin(pid)
        else:
            await agent.write_stdin(pid, data)

    async def command_signal(self, owner: str, sandbox_id: str, pid: int, signum: int) -> CommandLog:
        sb = await self.live(owner, sandbox_id)
        cmd = sb.commands.get(pid)
        if not cmd.done.is_set():
            await (await self._agent(sb)).signal(pid, signum, group=True)
        return cmd

    # -- files -----------------------------------------------------------------------------

    async def files_agent(self, owner: str, sandbox_id: str) -> AgentClient:
        """The agent that carries out file operations for this sandbox."""
        return await self._agent(await self.live(owner, sandbox_id))

    async def keep_file(self, owner: str, sandbox_id: str, path: str, mime: str) -> ArtifactInfo:
        """Make a sandbox file an artifact (a copy, kept after the sandbox is gone)."""
        agent = await self.files_agent(owner, sandbox_id)
        first, eof, size = await files.read_first(agent, path)
        if size > self.settings.max_artifact_bytes:
            raise InvalidRequest(f"{path} is larger than {self.settings.max_artifact_bytes} bytes", field="path")
        data = b"".join([chunk async for chunk in files.read_rest(agent, path, first, eof)])
        aid = await self.artifacts.put(data)
        created = await self.store.put_artifact(aid, sandbox_id, None, mime, len(data))
        return ArtifactInfo(
            id=aid,
            sandbox_id=sandbox_id,
            execution_id=None,
            mime=mime,
            size=len(data),
            url=f"/v1/artifacts/{aid}",
            created_at=created,
        )

    # -- artifacts -------------------------------------------------------------------------

    async def artifact(self, owner: str, artifact_id: str) -> tuple[Path, ArtifactInfo]:
        row = await self.store.find_artifact(artifact_id, owner)
        if row is None or not self.artifacts.exists(artifact_id):
            raise ArtifactNotFound(f"no artifact {artifact_id!r}")
        return self.artifacts.path_for(artifact_id), ArtifactInfo(url=f"/v1/artifacts/{artifact_id}", **row)

    async def list_artifacts(self, owner: str, sandbox_id: str) -> list[ArtifactInfo]:
        await self.info(owner, sandbox_id)
        return [
            ArtifactInfo(url=f"/v1/artifacts/{row['id']}", **row) for row in await self.store.list_artifacts(sandbox_id)
        ]
