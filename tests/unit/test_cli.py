"""The ``cellbox`` command line, without a server: click's ``CliRunner`` and ``httpx.MockTransport``.

Client commands get the fake service through click's ``obj`` (``{"transport": ...}``), the
seam the CLI offers to embedding programs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner, Result

from cellbox import cli
from tests.fakes import INFO, PNG, START, FakeService, end, error_body, event


def invoke(service: FakeService | None, *args: str, env: dict[str, str] | None = None, **kwargs: Any) -> Result:
    obj = {"transport": httpx.MockTransport(service)} if service is not None else None
    return CliRunner().invoke(cli.main, list(args), obj=obj, env=env, catch_exceptions=False, **kwargs)


# -- serve -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.0.0.5", True), ("::1", True), ("[::1]", True), ("localhost", True),
     ("0.0.0.0", False), ("::", False), ("192.168.1.10", False), ("myhost.example", False)],
)  # fmt: skip
def test_is_loopback(host: str, loopback: bool) -> None:
    assert cli.is_loopback(host) is loopback


@pytest.mark.parametrize(
    ("args", "env"),
    [(["--host", "0.0.0.0"], {}), ([], {"CELLBOX_HOST": "10.0.0.1"})],
)
def test_serve_refuses_a_public_host_without_a_key(args: list[str], env: dict[str, str]) -> None:
    result = invoke(None, "serve", *args, env=env)
    assert result.exit_code == 2
    assert "refusing to bind" in result.stderr
    assert "--api-key" in result.stderr


def test_a_key_allows_a_public_host_and_silences_the_warning() -> None:
    assert cli.exposure_warning(cli.build_settings(host="0.0.0.0", api_keys=["k"])) is None


def test_no_key_on_loopback_warns() -> None:
    warning = cli.exposure_warning(cli.build_settings(host=None, api_keys=None))
    assert warning == "no API key: bound to 127.0.0.1 only, anyone on this host can use it"


def test_settings_take_only_the_options_given(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CELLBOX_PORT", "9001")
    monkeypatch.setenv("CELLBOX_ISOLATION", "none")
    settings = cli.build_settings(host="::1", port=None, data_dir=tmp_path, api_keys=None, isolation=None)
    assert (settings.host, settings.port, settings.data_dir, settings.api_keys) == ("::1", 9001, tmp_path, [])
    assert cli.build_settings(port=7000, api_keys=["a", "b"]).port == 7000


def test_serve_rejects_bad_values_as_usage_errors() -> None:
    result = invoke(None, "serve", "--port", "notaport")
    assert result.exit_code == 2
    result = invoke(None, "serve", env={"CELLBOX_PORT": "notaport"})
    assert result.exit_code == 2
    assert "invalid settings" in result.stderr


def test_help_lists_the_commands() -> None:
    result = invoke(None, "--help")
    assert result.exit_code == 0
    for command in ["serve", "run", "sandbox"]:
        assert command in result.stdout


# -- run -------------------------------------------------------------------------------------------


@pytest.fixture
def service() -> FakeService:
    service = FakeService()
    service.route("GET", "/v1/artifacts/a1", body=b"\x89PNG")
    return service


def test_run_streams_output_saves_artifacts_and_kills(service: FakeService, tmp_path: Path) -> None:
    service.execute(
        [
            START,
            event("stdout", 1, text="hello\n"),
            event("stderr", 2, text="warn\n"),
            event("result", 3, data={"text/plain": "<Figure>"}, artifacts=[PNG, {**PNG, "mime": "image/svg+xml"}]),
            event("result", 4, data={"text/plain": "42"}, is_main_result=True),
            end(5),
        ]
    )
    out = tmp_path / "out"
    result = invoke(service, "run", "print('hello')", "--url", "http://cellbox.test", "--artifacts-dir", str(out))
    assert result.exit_code == 0, result.output
    assert result.stdout == "hello\n<Figure>\n42\n"
    assert "warn\n" in result.stderr
    assert (out / "3-1.png").read_bytes() == b"\x89PNG"
    assert (out / "3-2.svg").read_bytes() == b"\x89PNG"
    assert f"saved {out / '3-1.png'}" in result.stderr
    assert body_of(service, "POST", "/v1/sandboxes/sbx1/execute")["code"] == "print('hello')"
    assert len(service.sent("DELETE", "/v1/sandboxes/sbx1")) == 1


def test_run_reads_a_file_and_sends_key_timeout_language(service: FakeService, tmp_path: Path) -> None:
    service.execute([START, end(1)])
    script = tmp_path / "job.py"
    script.write_text("x = 1\n")
    result = invoke(
        service, "run", str(script), "--timeout", "9", "--language", "python", "--artifacts-dir", str(tmp_path),
        env={"CELLBOX_URL": "http://cellbox.test", "CELLBOX_API_KEY": "k"},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    request = service.sent("POST", "/v1/sandboxes/sbx1/execute")[0]
    sent = json.loads(request.content)
    assert (sent["code"], sent["timeout"], sent["language"]) == ("x = 1\n", 9, "python")
    assert request.headers["Authorization"] == "Bearer k"
    assert str(request.url).startswith("http://cellbox.test/")


@pytest.mark.parametrize("status", ["error", "timeout", "kernel_died", "interrupted"])
def test_run_exits_1_when_the_code_did_not_finish_ok(service: FakeService, status: str, tmp_path: Path) -> None:
    events = [START]
    if status == "error":
        traceback = ["Traceback (most recent call last):", "ZeroDivisionError: division by zero"]
        events.append(event("error", 1, name="ZeroDivisionError", value="division by zero", traceback=traceback))
    service.execute([*events, end(2, status=status)])
    result = invoke(service, "run", "1/0", "--artifacts-dir", str(tmp_path))
    assert result.exit_code == 1
    if status == "error":
        assert "ZeroDivisionError: division by zero" in result.stderr
    else:
        assert f"execution ex1 ended: {status}" in result.stderr
    assert len(service.sent("DELETE", "/v1/sandboxes/sbx1")) == 1


def test_run_keep_leaves_the_sandbox_and_names_it(service: FakeService, tmp_path: Path) -> None:
    service.execute([START, end(1)])
    result = invoke(service, "run", "1", "--keep", "--artifacts-dir", str(tmp_path))
    assert result.exit_code == 0
    assert "sandbox sbx1 kept" in result.stderr
    assert service.sent("DELETE", "/v1/sandboxes/sbx1") == []


def test_run_in_an_existing_sandbox_leaves_it_running(service: FakeService, tmp_path: Path) -> None:
    service.execute([START, end(1)])
    result = invoke(service, "run", "1", "--sandbox", "sbx1", "--artifacts-dir", str(tmp_path))
    assert result.exit_code == 0
    assert service.sent("POST", "/v1/sandboxes") == []
    assert service.sent("DELETE", "/v1/sandboxes/sbx1") == []


def test_run_reports_a_service_error(service: FakeService, tmp_path: Path) -> None:
    service.route("POST", "/v1/sandboxes", 429, error_body("sandbox_limit_reached", "key has 100 sandboxes"))
    result = invoke(service, "run", "1", "--artifacts-dir", str(tmp_path))
    assert result.exit_code == 1
    assert "sandbox_limit_reached: key has 100 sandboxes" in result.stderr


# -- sandbox ---------------------------------------------------------------------------------------


def test_sandbox_list_info_kill(service: FakeService) -> None:
    service.route("GET", "/v1/sandboxes", body={"sandboxes": [{**INFO, "metadata": {"team": "a"}}]})
    listed = invoke(service, "sandbox", "list", "--state", "running")
    assert listed.exit_code == 0
    assert listed.stdout == "sbx1\trunning\tdefault\tteam=a\n"
    assert service.requests[-1].url.params.get_list("state") == ["running"]

    info = invoke(service, "sandbox", "info", "sbx1")
    assert info.exit_code == 0
    assert json.loads(info.stdout)["id"] == "sbx1"
    assert service.sent("DELETE", "/v1/sandboxes/sbx1") == []  # info leaves it running

    killed = invoke(service, "sandbox", "kill", "sbx1")
    assert (killed.exit_code, killed.stdout) == (0, "killed sbx1\n")
    assert len(service.sent("DELETE", "/v1/sandboxes/sbx1")) == 1

    missing = invoke(service, "sandbox", "kill", "nope")
    assert missing.exit_code == 1
    assert "not_found" in missing.stderr


def body_of(service: FakeService, method: str, path: str) -> Any:
    return json.loads(service.sent(method, path)[0].content)
