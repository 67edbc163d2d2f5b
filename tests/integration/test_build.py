"""Dockerfile templates with the real builder: buildah, mmdebstrap, pip and npm through the
host's configuration. Slow the first time (a few minutes: the Debian base, the guide's apt and
pip steps, cellbox's layer, the export), so the guide's template is built once per content
(Dockerfile + build code + kernel_image's startup) and kept under /var/tmp between sessions;
buildah's layer cache makes everything else quick.

Running sandboxes from these templates is the rootfs runtime's part (tests/integration/
test_rootfs*.py); here the exported tree is checked with chroot.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from cellbox.build import BuildEvent, build_rootfs_template
from cellbox.build.base import BaseImageMissing
from cellbox.build.builder import build_lock
from cellbox.interpreter.errors import TemplateBuildFailed
from tests.integration.helpers import make_settings
from tests.integration.server import run_server

REPO = Path(__file__).resolve().parents[2]
GUIDE = Path(__file__).with_name("build_guide")
CACHE = Path(os.environ.get("CELLBOX_TEST_BUILD_CACHE", "/var/tmp/cellbox-test-build"))


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "template builds need root (buildah's store, chroot isolation)"
    for tool in ("buildah", "mmdebstrap"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/install.sh installs it)"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=str(_missing()))


def _content_hash() -> str:
    digest = hashlib.sha256()
    files = [GUIDE / "Dockerfile", *sorted((REPO / "cellbox/build").glob("*.py"))]
    files += sorted((REPO / "kernel_image/startup").glob("*")) + [REPO / "kernel_image/template.json"]
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


@dataclass
class Built:
    root: Path
    events: list[BuildEvent]  # empty when the template came from an earlier session
    seconds: float | None


@pytest.fixture(scope="session")
def guide() -> Iterator[Built]:
    """The guide's template under a root kept per content hash (other hashes' trees deleted)."""
    key = _content_hash()
    CACHE.mkdir(parents=True, exist_ok=True)
    for old in CACHE.iterdir():
        if old.name != key:
            shutil.rmtree(old, ignore_errors=True)
    root = CACHE / key / "templates"
    if (root / "guide" / "template.json").is_file():
        yield Built(root, [], None)
        return
    events: list[BuildEvent] = []
    started = time.monotonic()
    build_rootfs_template(GUIDE, root, "guide", on_event=events.append)
    seconds = time.monotonic() - started
    print(f"\nfirst build of the guide's template: {seconds:.1f} s", file=sys.stderr)
    yield Built(root, events, seconds)


def _chroot(rootfs: Path, *argv: str) -> str:
    proc = subprocess.run(["chroot", str(rootfs), *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_guide_dockerfile_builds(guide: Built) -> None:
    doc = json.loads((guide.root / "guide/template.json").read_text())
    assert doc["kind"] == "rootfs" and doc["rootfs"] == "rootfs"
    assert doc["python"] == "/opt/cellbox/venv/bin/python"
    assert doc["kernels"] == ["python", "bash", "javascript"]  # node in the image: Deno's kernel
    # the image's ENV, WORKDIR, USER and CMD
    assert doc["env"]["GUIDE_GREETING"] == "hello"
    assert doc["env"]["PATH"].startswith("/opt/cellbox/venv/bin:")
    assert doc["env"]["MPLBACKEND"] == "module://matplotlib_inline.backend_inline"
    assert "PIP_BREAK_SYSTEM_PACKAGES" not in doc["env"]  # the build's pip settings stay out
    assert doc["workdir"] == "/srv/app" and doc["user"] == "user"
    assert doc["cmd"] == ["python3", "-c", "print('hi')"]
    assert doc["startup"] == ["/opt/cellbox/startup/00_images.py", "/opt/cellbox/startup/10_e2b_data.py"]
    # an image's setuid files and devices are out of host users' reach: the tree is root's only
    assert (guide.root / "guide").stat().st_mode & 0o777 == 0o700
    rootfs = guide.root / "guide/rootfs"
    # what the guide installed system-wide is importable from the kernel's venv, next to the kernel
    out = _chroot(
        rootfs,
        "/opt/cellbox/venv/bin/python",
        "-c",
        "import sklearn, pandas, numpy, matplotlib, ipykernel, bash_kernel, e2b_charts; print(sklearn.__name__)",
    )
    assert out.strip() == "sklearn"
    assert _chroot(rootfs, "node", "-e", "console.log(6 * 7)").strip() == "42"
    assert _chroot(rootfs, "git", "--version").startswith("git version")
    # the export keeps hardlinks, setuid bits, numeric owners
    assert (rootfs / "usr/bin/perl").stat().st_ino == (rootfs / "usr/bin/perl5.36.0").stat().st_ino
    assert oct((rootfs / "usr/bin/passwd").stat().st_mode & 0o7777) == "0o4755"
    shadow_gid = next(
        int(line.split(":")[2])
        for line in (rootfs / "etc/group").read_text().splitlines()
        if line.startswith("shadow:")
    )
    assert (rootfs / "etc/shadow").stat().st_gid == shadow_gid
    assert (rootfs / "home/user").stat().st_uid == 1000
    assert not (rootfs / "etc/pip.conf").exists()  # the build-time mount point is gone
    assert (rootfs / "etc/ssl/certs/ca-certificates.crt").stat().st_size > 0
    if guide.events:
        steps = [e for e in guide.events if e.type == "step"]
        assert steps[-1].phase == "export" and guide.events[-1].type == "done"
        assert [e.step for e in steps] == sorted(e.step for e in steps)


def test_unchanged_rebuild_uses_the_cache(guide: Built) -> None:
    events: list[BuildEvent] = []
    started = time.monotonic()
    result = build_rootfs_template(GUIDE, guide.root, "guide", on_event=events.append)
    seconds = time.monotonic() - started
    steps = [e for e in events if e.type == "step" and e.phase in ("dockerfile", "cellbox")]
    cached = [e for e in events if e.type == "cached"]
    # every step after each FROM came from buildah's layer cache ("--> Using cache")
    froms = [e for e in steps if (e.instruction or "").startswith("FROM")]
    assert len(cached) == len(steps) - len(froms), [e.instruction for e in steps]
    assert result.exported is False  # same image: the tree in place is kept
    ratio = f" ({seconds / guide.seconds:.1%} of the first build, {guide.seconds:.0f} s)" if guide.seconds else ""
    print(f"\nunchanged rebuild: {seconds:.2f} s{ratio}", file=sys.stderr)


def test_failing_run_names_its_line_and_shows_its_output(tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_text(
        "FROM debian:bookworm\nENV A=1\n# the next step fails\nRUN echo preparing && \\\n    ls /no-such-dir\n"
    )
    events: list[BuildEvent] = []
    with pytest.raises(TemplateBuildFailed) as caught:
        build_rootfs_template(tmp_path, tmp_path / "templates", "failing", on_event=events.append)
    err = caught.value
    assert err.details["line"] == 4
    assert err.message.startswith("Dockerfile line 4: RUN echo preparing") and "exit status 2" in err.message
    assert "preparing" in err.details["output"] and "/no-such-dir" in err.details["output"]
    assert not (tmp_path / "templates/failing").exists()


def test_base_that_cannot_be_had_fails_fast(tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_text("FROM ubuntu:22.04\nRUN apt-get update\n")
    started = time.monotonic()
    with pytest.raises(BaseImageMissing) as caught:
        build_rootfs_template(tmp_path, tmp_path / "templates", "ubuntu")
    elapsed = time.monotonic() - started
    message = caught.value.message
    assert "ubuntu:22.04" in message and "registries.conf" in message and "FROM debian:bookworm" in message
    print(f"\nFROM ubuntu:22.04 refused in {elapsed:.2f} s", file=sys.stderr)


def test_javascript_kernel_runs_in_the_rootfs(guide: Built, tmp_path: Path) -> None:
    """Deno's kernel behind the IPC bridge, in the exported tree (chroot; a private mount
    namespace binds a scratch /tmp so the template is not written)."""
    jupyter_client = pytest.importorskip("jupyter_client")
    rootfs = guide.root / "guide/rootfs"
    run = tmp_path / "run"
    run.mkdir()
    info = jupyter_client.connect.write_connection_file(
        fname=str(run / "kernel.json"), transport="ipc", ip="/tmp/kernel"
    )[1]
    script = (
        f"mount --bind {run} {rootfs}/tmp && exec chroot {rootfs} env HOME=/tmp DENO_DIR=/tmp/deno NO_COLOR=1 "
        "/opt/cellbox/venv/bin/python /opt/cellbox/jsbridge.py /tmp/kernel.json -- "
        "/opt/cellbox/js/node_modules/deno/deno jupyter --kernel --conn {tcp_connection_file}"
    )
    proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script])
    try:
        outside = dict(info, ip=str(run / "kernel"))
        client = jupyter_client.BlockingKernelClient()
        client.load_connection_info(outside)
        client.start_channels()
        try:
            client.wait_for_ready(timeout=60)
            outputs: list[dict[str, Any]] = []
            for code in ["const n: number = 6; console.log('typed', n * 7)", "n + 1"]:  # TypeScript; state kept
                reply = client.execute_interactive(code, output_hook=lambda m: outputs.append(m["content"]), timeout=60)
                assert reply["content"]["status"] == "ok", reply["content"]
        finally:
            client.stop_channels()
        assert any(o.get("text") == "typed 42\n" for o in outputs), outputs
        assert any(o.get("data", {}).get("text/plain") == "7" for o in outputs), outputs
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _tar_of(directory: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path in directory.iterdir():
            tar.add(path, arcname=path.name)
    return buffer.getvalue()


async def _events(client: httpx.AsyncClient, **request: object) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    async with client.stream("POST", "/v1/templates", **request) as r:  # type: ignore[arg-type]
        assert r.status_code == 200, await r.aread()
        assert r.headers["content-type"].startswith("application/x-ndjson")
        async for line in r.aiter_lines():
            out.append(json.loads(line))
    return out


@pytest.mark.asyncio
async def test_post_templates_streams_ndjson(guide: Built, short_tmp: Path) -> None:
    off = make_settings(short_tmp, templates_dir=guide.root, api_keys=["k1"])
    async with run_server(off) as srv, httpx.AsyncClient(base_url=srv.url, headers={"Authorization": "Bearer k1"}) as c:
        r = await c.post("/v1/templates", json={"name": "x", "dockerfile": "FROM debian:bookworm\n"})
        assert r.status_code == 403 and "CELLBOX_TEMPLATE_BUILDS" in r.json()["error"]["message"], r.text
    settings = off.model_copy(update={"template_builds": True})
    async with run_server(settings) as srv:
        headers = {"Authorization": "Bearer k1"}
        async with httpx.AsyncClient(base_url=srv.url, timeout=600, headers=headers) as c:
            # the guide's context as a tar: every step cached, the template kept, ends with done
            events = await _events(
                c, params={"name": "guide"}, content=_tar_of(GUIDE), headers={"Content-Type": "application/x-tar"}
            )
            assert events[-1]["type"] == "done" and events[-1]["template"] == "guide", events[-3:]
            steps = [e for e in events if e["type"] == "step"]
            assert steps[0]["line"] == 3 and steps[0]["instruction"] == "FROM debian:bookworm"
            assert {e["type"] for e in events} >= {"step", "cached", "log", "done"}
            # a Dockerfile as JSON whose RUN fails: an error event naming its line, last
            events = await _events(
                c, json={"name": "failing", "dockerfile": "FROM debian:bookworm\nRUN echo nope >&2; exit 3\n"}
            )
            assert events[-1]["type"] == "error" and events[-1]["line"] == 2, events[-1]
            assert "nope" in str(events[-1]["output"])
            # refused before any stream
            r = await c.post("/v1/templates", json={"name": "x"})
            assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"
            r = await c.post(
                "/v1/templates?name=x", content=b"not a tar", headers={"Content-Type": "application/x-tar"}
            )
            assert r.status_code == 422
            r = await c.post("/v1/templates", content=b"x", headers={"Content-Type": "text/plain"})
            assert r.status_code == 422
            with build_lock(guide.root, "busy"):
                r = await c.post("/v1/templates", json={"name": "busy", "dockerfile": "FROM debian:bookworm\n"})
                assert r.status_code == 409 and r.json()["error"]["code"] == "conflict"
            r = await c.post(
                "/v1/templates", json={"name": "x", "dockerfile": "FROM x\n"}, headers={"Authorization": ""}
            )
            assert r.status_code == 401
    await asyncio.sleep(0)


def test_cli_builds_with_a_progress_bar(guide: Built) -> None:
    """`cellbox template build DIR` picks the rootfs kind for a Dockerfile directory; the bar
    counts buildah's steps; here every step is cached and the tree in place is kept."""
    proc = subprocess.run(
        [sys.executable, "-m", "cellbox.cli", "template", "build", str(GUIDE), "--name", "guide"]
        + ["--data-dir", str(guide.root.parent)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "unchanged (same image)" in proc.stdout and "steps from the layer cache" in proc.stdout
    assert "building template 'guide'" in proc.stderr


def test_rebuild_replaces_the_tree_and_keeps_the_old_one(tmp_path: Path) -> None:
    """A changed rebuild renames the new tree into place; the old one moves aside whole (a
    sandbox that has it mounted keeps every file) and is deleted only after ``retain_old``."""
    (tmp_path / "Dockerfile").write_text("FROM debian:bookworm\nARG V\nRUN echo $V >/version\n")
    root = tmp_path / "templates"
    try:
        build_rootfs_template(tmp_path, root, "versions", build_args={"V": "1"})
        old = root / "versions/rootfs/version"
        fd = os.open(old, os.O_RDONLY)  # as a running sandbox holds files of its tree
        try:
            result = build_rootfs_template(tmp_path, root, "versions", build_args={"V": "2"})
            assert result.exported
            assert (root / "versions/rootfs/version").read_text() == "2\n"
            assert os.pread(fd, 10, 0) == b"1\n"
        finally:
            os.close(fd)
        retired = list((root / ".retired").iterdir())
        assert len(retired) == 1 and (retired[0] / "rootfs/version").read_text() == "1\n"
        # retain_old < 0: every tree retired before this build is old enough (times are whole seconds)
        build_rootfs_template(tmp_path, root, "versions", build_args={"V": "3"}, retain_old=-1)
        retired = list((root / ".retired").iterdir())  # the v1 tree is gone, the v2 one just retired
        assert [(p / "rootfs/version").read_text() for p in retired] == ["2\n"]
    finally:
        shutil.rmtree(root, ignore_errors=True)  # three trees of ~400 MB: not for pytest's kept tmp dirs


def _rootfs_runtime_problem(root: Path, scratch: Path) -> str | None:
    """Why sandboxes cannot run from a rootfs template here (the rootfs runtime's checks), or None."""
    from cellbox.interpreter.errors import InvalidRequest
    from cellbox.interpreter.templates import TemplateRegistry
    from tests.integration.helpers import bwrap_problem

    try:
        TemplateRegistry(root).get("guide")
    except InvalidRequest as exc:
        return exc.message
    if problem := bwrap_problem():
        return f"bwrap isolation unavailable: {problem}"
    try:
        from cellbox.runtimes.isolation.rootfs import check_idmap_support  # type: ignore[import-not-found]
    except ImportError:
        return None
    found: str | None = check_idmap_support(scratch)
    return found


@pytest.fixture
def rootfs_runtime(guide: Built, short_tmp: Path) -> None:
    """Skips unless sandboxes can run from rootfs templates here (synchronous: the bwrap check
    runs its own event loop)."""
    if problem := _rootfs_runtime_problem(guide.root, short_tmp):
        pytest.skip(f"rootfs sandboxes cannot run here: {problem}")


@pytest.mark.asyncio
@pytest.mark.usefixtures("rootfs_runtime")
async def test_a_sandbox_from_the_guide_template(guide: Built, short_tmp: Path) -> None:
    """The guide's promise, through the API: sklearn in the kernel, node and git as commands,
    the image's ENV and WORKDIR, a TypeScript context on Deno's kernel."""
    from cellbox.interpreter.config import Settings
    from tests.integration.helpers import execute, isolation_settings, main_text, run_cmd, stdout

    extra: dict[str, Any] = {}
    if "sandbox_range_first" in Settings.model_fields:  # uid ranges of its own
        extra = {"sandbox_range_first": (1 << 30) + (8 + os.getpid() % 32) * 16 * 65536, "sandbox_range_count": 16}
    settings = isolation_settings(short_tmp, "bwrap", templates_dir=guide.root, **extra)
    async with run_server(settings) as srv, httpx.AsyncClient(base_url=srv.url, timeout=300) as c:
        r = await c.post("/v1/sandboxes", json={"template": "guide"})
        assert r.status_code == 201, r.text
        sid = r.json()["id"]
        try:
            code = "import sklearn, pandas; from sklearn.linear_model import LinearRegression; sklearn.__name__"
            assert main_text(await execute(c, sid, code)) == "'sklearn'"
            # the image's WORKDIR: where kernels and commands start when no cwd is given
            assert main_text(await execute(c, sid, "import os; os.getcwd()")) == "'/srv/app'"
            assert stdout(await run_cmd(c, sid, "pwd")) == "/srv/app\n"
            assert stdout(await run_cmd(c, sid, "pwd", cwd="/tmp")) == "/tmp\n"  # a cwd given wins
            events = await run_cmd(c, sid, "node -e 'console.log(6 * 7)'; git --version; echo $GUIDE_GREETING")
            lines = stdout(events).splitlines()
            assert lines[0] == "42" and lines[1].startswith("git version") and lines[2] == "hello", events
            r = await c.post(f"/v1/sandboxes/{sid}/contexts", json={"language": "javascript"})
            assert r.status_code in (200, 201), r.text
            ctx = r.json()["id"]
            events = await execute(c, sid, "const n: number = 6; console.log('typed', n * 7)", context=ctx)
            assert stdout(events) == "typed 42\n", events
            assert main_text(await execute(c, sid, "n + 1", context=ctx)) == "7"
            # an endless cell stops on interrupt; the context keeps its state
            body = {"code": "console.log('looping'); while (true) {}", "context": ctx}
            async with c.stream("POST", f"/v1/sandboxes/{sid}/execute", json=body) as r:
                seen = []
                async for line in r.aiter_lines():
                    event = json.loads(line)
                    seen.append(event)
                    if event["type"] == "stdout":
                        interrupted = await c.post(f"/v1/sandboxes/{sid}/contexts/{ctx}/interrupt")
                        assert interrupted.status_code in (200, 202, 204), interrupted.text
            assert seen[-1]["type"] == "end" and seen[-1]["status"] in ("interrupted", "error"), seen[-3:]
            assert main_text(await execute(c, sid, "n * 10", context=ctx)) == "60"
            events = await run_cmd(c, sid, "python -c 'import site, sys; print(site.ENABLE_USER_SITE, sys.executable)'")
            assert stdout(events).split() == ["True", "/opt/cellbox/venv/bin/python"]  # pip falls back to ~/.local
        finally:
            await c.delete(f"/v1/sandboxes/{sid}")
