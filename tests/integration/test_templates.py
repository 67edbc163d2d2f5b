"""Template build (a real venv + pip) and use."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cellbox.interpreter.templates import build_template, default_template_python
from tests.integration.helpers import execute, isolation_settings, main_text, run_cmd, stdout
from tests.integration.server import run_server


@pytest.fixture(scope="module")
def tiny_templates(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A template built once for the module: ipykernel only, a startup file, env vars."""
    src = tmp_path_factory.mktemp("tiny-src")
    (src / "requirements.txt").write_text("ipykernel\n")
    (src / "startup").mkdir()
    (src / "startup" / "10_mark.py").write_text("TEMPLATE_MARK = 'tiny'\n")
    (src / "template.json").write_text(json.dumps({"env": {"TINY": "1"}, "kernels": ["python"]}))
    root = Path("/tmp") / f"cbxtpl-{Path(tmp_path_factory.getbasetemp()).name}"
    lines: list[str] = []
    build_template(src, root, "tiny", python=default_template_python(), on_line=lines.append)
    assert any("Successfully installed" in line for line in lines)
    root.chmod(0o711)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.asyncio
async def test_build_list_and_use(tiny_templates: Path, short_tmp: Path, isolation: str) -> None:
    settings = isolation_settings(short_tmp, isolation, templates_dir=tiny_templates)
    async with run_server(settings) as srv, httpx.AsyncClient(base_url=srv.url, timeout=120) as c:
        r = await c.post("/v1/sandboxes", json={"template": "tiny"})
        assert r.status_code == 201, r.text
        sid = r.json()["id"]
        events = await execute(c, sid, "import os, sys\n(TEMPLATE_MARK, os.environ['TINY'], 'venv' in sys.prefix)")
        assert main_text(events) == "('tiny', '1', True)"
        # The venv was built elsewhere and renamed into place: its scripts must still run.
        pip = await run_cmd(c, sid, "pip --version")
        assert pip[-1]["exit_code"] == 0 and "pip " in stdout(pip), pip
        if isolation == "bwrap":
            # The template is read-only inside: a plain `pip install` goes to the home, and the
            # running kernel imports it (six comes from this host's local package index).
            installed = await run_cmd(c, sid, "pip install -q six && python -c 'import six; print(six.__file__)'")
            assert installed[-1]["exit_code"] == 0, installed
            assert "/home/user/.local/" in stdout(installed), installed
            where = await execute(c, sid, "import six; six.__file__")
            assert "/home/user/.local/" in (main_text(where) or ""), where
        bash = await c.post(f"/v1/sandboxes/{sid}/contexts", json={"language": "bash"})
        assert bash.status_code == 422 and bash.json()["error"]["known"] == ["python"]
        unknown = await c.post("/v1/sandboxes", json={"template": "nope"})
        assert unknown.status_code == 404
        assert "tiny" in unknown.json()["error"]["known"]


def test_cli_template_list(tiny_templates: Path) -> None:
    import subprocess

    out = subprocess.run(
        [sys.executable, "-m", "cellbox.cli", "template", "list", "--data-dir", str(tiny_templates.parent)],
        capture_output=True,
        text=True,
        check=False,
        env={"CELLBOX_TEMPLATES_DIR": str(tiny_templates), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("tiny\t") or "\ntiny\t" in out.stdout


def test_a_failed_build_keeps_the_previous_template(tiny_templates: Path, tmp_path: Path) -> None:
    from cellbox.interpreter.errors import TemplateBuildFailed

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "requirements.txt").write_text("this-package-does-not-exist-cellbox==0.0.0\n")
    with pytest.raises(TemplateBuildFailed):
        build_template(bad, tiny_templates, "tiny", python=default_template_python())
    assert (tiny_templates / "tiny" / "template.json").exists()
