"""A newcomer's first start (issue 10 §5): ``pip install 'cellbox[server,kernel]'`` into a fresh
venv, then ``cellbox serve`` with no template built (isolation ``bwrap``, as root).

A real venv from this checkout's wheel (pip reaches the index for the dependencies; the test
skips with the reason when it cannot), the real ``cellbox`` console script, run from outside
the checkout so it imports the installed package. Where sandbox users can reach the venv, kernels
run on the service's own Python; where they cannot (a venv below a 0700 directory, like one in
/root), the service refuses to start with one line that names what to do, and that command, run
in the fresh venv (the template's source ships in the wheel), makes the next start work.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.helpers import bwrap_problem

REPO = Path(__file__).resolve().parents[2]
HOST_PYTHON = Path("/usr/bin/python3")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(
    argv: list[str], timeout: float, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, env=env, cwd=cwd
    )


@pytest.fixture(scope="module")
def fresh_venv() -> Iterator[tuple[Path, Path]]:
    """(venv, the 0700 directory above it), the venv made with the host's python3 and
    ``pip install 'cellbox[server,kernel]'`` from a wheel of this checkout."""
    if problem := bwrap_problem():
        pytest.skip(f"bwrap isolation unavailable: {problem}")
    if not HOST_PYTHON.exists():
        pytest.skip(f"no {HOST_PYTHON}")
    base = Path(tempfile.mkdtemp(prefix="cbxnew", dir="/tmp"))
    os.chmod(base, 0o711)  # sandbox users must reach what is below it (but "closed")
    try:
        src = base / "src"  # the package's files only: the wheel build writes next to them
        src.mkdir()
        for name in ("pyproject.toml", "README.md"):
            shutil.copy(REPO / name, src / name)
        shutil.copytree(REPO / "cellbox", src / "cellbox", ignore=shutil.ignore_patterns("__pycache__"))
        built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(base / "dist"), str(src)], 300)
        if built.returncode != 0:
            pytest.skip(f"cannot build cellbox's wheel here: {built.stderr[-500:]}")
        wheel = next((base / "dist").glob("cellbox-*.whl"))
        closed = base / "closed"
        closed.mkdir(mode=0o700)
        venv = closed / "sub" / "venv"
        made = _run([str(HOST_PYTHON), "-m", "venv", str(venv)], 120)
        assert made.returncode == 0, made.stderr
        pip = [str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check"]
        installed = _run([*pip, f"{wheel}[server,kernel]"], 600)
        if installed.returncode != 0:
            pytest.skip(f"cannot install cellbox[server,kernel] here (the index?): {installed.stderr[-500:]}")
        yield venv, closed
    finally:
        shutil.rmtree(base, ignore_errors=True)


def serve_argv(venv: Path, data_dir: Path, port: int) -> tuple[list[str], dict[str, str]]:
    slot = os.getpid() % 64
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(data_dir.parent),
        "CELLBOX_RUN_DIR": str(data_dir.parent / "run"),
        "CELLBOX_CGROUP_PREFIX": f"cbxnew{os.getpid()}",
        "CELLBOX_SANDBOX_UID_FIRST": str(319_700 + slot * 4),
        "CELLBOX_SANDBOX_UID_COUNT": "4",
    }
    argv = [str(venv / "bin" / "cellbox"), "serve", "--host", "127.0.0.1", "--port", str(port)]
    return [*argv, "--data-dir", str(data_dir)], env


def _refusal(venv: Path, data: Path, cwd: Path) -> str:
    """The one ERROR line of a start that must refuse (fails the test if it starts instead)."""
    argv, env = serve_argv(venv, data, _free_port())
    proc = subprocess.Popen(
        argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        _, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:  # it started instead of refusing: stop it as a service is stopped
        proc.terminate()
        _, stderr = proc.communicate(timeout=60)
        pytest.fail(f"the service started instead of refusing:\n{stderr}")
    assert proc.returncode != 0, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("ERROR:") and "startup failed" not in line]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    return errors[0]


def _serve_and_run(venv: Path, data: Path, cwd: Path) -> str:
    """Start the service on ``data``, create a sandbox with no template named, run ``1 + 1`` in
    it; the kernel's ``sys.executable`` and the result, as printed."""
    port = _free_port()
    argv, env = serve_argv(venv, data, port)
    log_path = cwd / f"serve-{data.name}.log"
    log = log_path.open("w")
    proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as c:
            deadline = time.monotonic() + 60
            while True:  # readiness: the service answers /healthz (or exits)
                assert proc.poll() is None, log_path.read_text()
                try:
                    if c.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.1)  # polling the service's readiness, bounded above
            r = c.post("/v1/sandboxes", json={})
            assert r.status_code == 201, r.text
            sid = r.json()["id"]
            code = "import sys; print(sys.executable, 1 + 1)"
            lines = c.post(f"/v1/sandboxes/{sid}/execute", json={"code": code}).text.splitlines()
            out = "".join(e.get("text", "") for e in map(json.loads, lines) if e["type"] == "stdout")
            assert c.delete(f"/v1/sandboxes/{sid}").status_code == 204
            return out
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_unreachable_venv_refuses_to_start_with_one_line(fresh_venv: tuple[Path, Path]) -> None:
    venv, closed = fresh_venv
    os.chmod(closed, 0o700)
    error = _refusal(venv, closed.parent / "data-refused", closed.parent)
    assert f"`chmod o+x {closed}`" in error and "`cellbox template build " in error, error
    assert "kernel_image" not in error, error  # a pip install has no checkout


def test_the_refusals_command_works_from_the_pip_install(fresh_venv: tuple[Path, Path]) -> None:
    """The command the refusal names, run as written with the fresh venv's ``cellbox`` (no
    checkout: its cwd is outside it), builds the default template; the next start (the venv
    still unreachable) serves sandboxes from it."""
    venv, closed = fresh_venv
    os.chmod(closed, 0o700)
    data = closed.parent / "data-built"
    error = _refusal(venv, data, closed.parent)
    commands = [c for c in re.findall(r"`([^`]+)`", error) if c.startswith("cellbox template build ")]
    assert len(commands) == 1, error
    env = {**os.environ, "PATH": f"{venv / 'bin'}:/usr/bin:/bin"}  # HOME kept: pip's cache
    env.pop("VIRTUAL_ENV", None)
    env.pop("PYTHONPATH", None)
    built = subprocess.run(
        commands[0], shell=True, env=env, cwd=closed.parent, capture_output=True, text=True, timeout=900,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    unreachable = ("NewConnectionError", "Temporary failure in name resolution", "Network is unreachable")
    if built.returncode != 0 and any(u in built.stderr + built.stdout for u in unreachable):
        pytest.skip(f"the package index is unreachable: {built.stderr[-500:]}")
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    assert (data / "templates" / "default" / "template.json").is_file(), built.stdout
    out = _serve_and_run(venv, data, closed.parent)
    assert out.split() == [str(data / "templates" / "default" / "venv" / "bin" / "python"), "2"], out


def test_reachable_venv_runs_kernels_on_the_services_python(fresh_venv: tuple[Path, Path]) -> None:
    venv, closed = fresh_venv
    os.chmod(closed, 0o711)
    out = _serve_and_run(venv, closed.parent / "data-ok", closed.parent)
    assert out.split() == [str(venv / "bin" / "python3"), "2"], out
