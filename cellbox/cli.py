"""The ``cellbox`` command: ``serve`` the service, ``run`` code in a sandbox, manage ``sandbox``es
(and run shell commands in them with ``sandbox exec``), move ``files`` in and out of them.

``run``, ``sandbox`` and ``files`` use only the SDK (:mod:`cellbox.client`); ``serve`` imports the server
(FastAPI, uvicorn, pydantic-settings) when it runs, so the SDK-only install keeps a working CLI
client and ``serve`` says which extra to install.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shlex
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

import click
import httpx

from cellbox.client import (
    CellEnd,
    CellStart,
    CommandExitError,
    Execution,
    InterpreterError,
    NotebookRun,
    Result,
    Sandbox,
)
from cellbox.interpreter.media import extension_for

if TYPE_CHECKING:
    from cellbox.interpreter.config import Settings

F = TypeVar("F", bound=Callable[..., Any])

NO_KEY_WARNING = "no API key: bound to {host} only, anyone on this host can use it"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """cellbox: a self-hosted code interpreter (Jupyter kernels in sandboxes)."""


# -- serve ---------------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (``127.0.0.0/8``, ``::1``) or ``localhost``."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # another host name: assume it is reachable from elsewhere
        return False


def _server_missing(exc: ImportError) -> click.ClickException:
    return click.ClickException(f"the server is not installed ({exc}); install it with:  pip install 'cellbox[server]'")


def build_settings(**given: Any) -> Settings:
    """``Settings`` from the options the user gave (``None`` = not given: env or default decides).

    Raises :class:`click.UsageError` for a value Settings rejects.
    """
    try:
        from cellbox.interpreter.config import Settings
    except ImportError as exc:  # pydantic-settings comes with the server extra
        raise _server_missing(exc) from exc
    try:
        return Settings(**{k: v for k, v in given.items() if v is not None})
    except ValueError as exc:  # pydantic's ValidationError
        raise click.UsageError(f"invalid settings: {exc}") from exc


def exposure_warning(settings: Settings) -> str | None:
    """The warning to print for these settings, if any.

    Raises :class:`click.UsageError` (exit 2) for a non-loopback host without an API key:
    anyone who can reach the port could run code on this host.
    """
    if settings.api_keys:
        return None
    if not is_loopback(settings.host):
        raise click.UsageError(
            f"refusing to bind {settings.host} without an API key: anyone who can reach it could run code "
            "on this host. Pass --api-key KEY (or set CELLBOX_API_KEYS), or bind 127.0.0.1."
        )
    return NO_KEY_WARNING.format(host=settings.host)


@main.command()
@click.option("--host", help="Address to bind [default: 127.0.0.1; env CELLBOX_HOST].")
@click.option("--port", type=int, help="Port to bind [default: 8080; env CELLBOX_PORT].")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), help="State, artifacts, homes.")
@click.option("--api-key", "api_keys", multiple=True, help="Accepted API key (repeatable) [env CELLBOX_API_KEYS].")
@click.option(
    "--isolation",
    type=click.Choice(["bwrap", "none"]),
    help="'bwrap' (default; needs root and bubblewrap) isolates every sandbox; 'none' runs sandboxes as plain "
    "processes of the service: trusted code only [env CELLBOX_ISOLATION].",
)
@click.option(
    "--pool-size", type=int, help="Ready sandboxes kept per pooled template [default: 0; env CELLBOX_POOL_SIZE]."
)
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug", "trace"]))
@click.option(
    "--egress/--no-egress",
    "egress_enabled",
    default=None,
    help="Whether sandboxes may ask for outbound network [default: on; env CELLBOX_EGRESS_ENABLED].",
)
@click.option(
    "--egress-allow",
    multiple=True,
    metavar="ENTRY",
    help="Service-wide allow list entry (domain, *.wildcard, IP, CIDR; repeatable): sandboxes reach only these.",
)
@click.option("--egress-deny", multiple=True, metavar="ENTRY", help="Service-wide deny entry (repeatable).")
@click.option(
    "--egress-permit",
    multiple=True,
    metavar="CIDR",
    help="Let sandboxes reach a range below the floor after all: a CIDR, or loopback/private/link-local "
    "(repeatable; e.g. the address an inspecting proxy answers from).",
)
@click.option("--egress-port", "egress_ports", multiple=True, type=int, help="Allowed destination port (repeatable).")
@click.option("--egress-max-connections", type=int, help="Open egress connections per sandbox [default: 64].")
@click.option("--egress-idle-timeout", type=float, help="Seconds a silent egress connection lives [default: 300].")
@click.option("--egress-log-size", type=int, help="Egress decisions kept per sandbox [default: 1000].")
@click.option(
    "--package-cache/--no-package-cache", default=None, help="Serve pip through the shared cache [default: on]."
)
@click.option(
    "--package-cache-dir", type=click.Path(file_okay=False, path_type=Path), help="[default: DATA_DIR/pip-cache]"
)
@click.option("--package-cache-max-mb", type=int, help="Largest size of the package cache, MiB [default: 10240].")
@click.option("--package-cache-index-url", help="Index the cache fetches from [default: the host's pip index, PyPI].")
@click.option(
    "--ports-domain", help="Also serve sandbox ports at {port}-{sandbox_id}.DOMAIN (a wildcard DNS name for this host)."
)
def serve(
    host: str | None,
    port: int | None,
    data_dir: Path | None,
    api_keys: tuple[str, ...],
    isolation: str | None,
    pool_size: int | None,
    log_level: str | None,
    egress_enabled: bool | None,
    egress_allow: tuple[str, ...],
    egress_deny: tuple[str, ...],
    egress_permit: tuple[str, ...],
    egress_ports: tuple[int, ...],
    egress_max_connections: int | None,
    egress_idle_timeout: float | None,
    egress_log_size: int | None,
    package_cache: bool | None,
    package_cache_dir: Path | None,
    package_cache_max_mb: int | None,
    package_cache_index_url: str | None,
    ports_domain: str | None,
) -> None:
    """Run the cellbox service. Options not given come from CELLBOX_* env vars, then defaults."""
    keys = list(api_keys) if api_keys else None
    settings = build_settings(
        host=host,
        port=port,
        data_dir=data_dir,
        api_keys=keys,
        isolation=isolation,
        pool_size=pool_size,
        log_level=log_level,
        egress_enabled=egress_enabled,
        egress_allow=list(egress_allow) or None,
        egress_deny=list(egress_deny) or None,
        egress_permit=list(egress_permit) or None,
        egress_ports=list(egress_ports) or None,
        egress_max_connections=egress_max_connections,
        egress_idle_timeout=egress_idle_timeout,
        egress_log_size=egress_log_size,
        package_cache=package_cache,
        package_cache_dir=package_cache_dir,
        package_cache_max_mb=package_cache_max_mb,
        package_cache_index_url=package_cache_index_url,
        ports_domain=ports_domain,
    )
    warning = exposure_warning(settings)
    try:
        import uvicorn

        from cellbox.api.app import create_app
    except ImportError as exc:
        raise _server_missing(exc) from exc
    if warning:
        click.secho(f"WARNING: {warning}", fg="yellow", bold=True, err=True)
    if settings.isolation == "bwrap":
        _require_isolation(settings)
    else:
        click.secho(
            "WARNING: --isolation none: sandboxes run as plain processes of this service, with its user, network "
            "and files. Run trusted code only.",
            fg="red",
            bold=True,
            err=True,
        )
    logging.basicConfig(
        level=settings.log_level.upper() if settings.log_level != "trace" else "DEBUG",
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level, lifespan="on")
    uvicorn.Server(config).run()


def _require_isolation(settings: Settings) -> None:
    """Refuse to start (exit 1, one clear message) on a host that cannot isolate sandboxes."""
    import asyncio
    import tempfile

    from cellbox.runtimes.isolation import check_host

    if os.geteuid() != 0:
        raise click.ClickException(
            "isolation 'bwrap' needs root (it creates cgroups, uids and loop-mounted homes). "
            "Run as root, or start with --isolation none to run trusted code without isolation."
        )
    with tempfile.TemporaryDirectory(prefix="cellbox-check") as tmp:
        report = asyncio.run(check_host(Path(tmp)))
    if not report.ok:
        raise click.ClickException(
            "this host cannot isolate sandboxes: "
            + "; ".join(report.problems)
            + ". Install bubblewrap (apt-get install bubblewrap), or start with --isolation none (trusted code only)."
        )


# -- client commands -----------------------------------------------------------------------------


def _client_options(command: F) -> F:
    command = click.option("--api-key", envvar="CELLBOX_API_KEY", help="API key [env CELLBOX_API_KEY].")(command)
    command = click.option(
        "--url", envvar="CELLBOX_URL", default="http://127.0.0.1:8080", show_default=True, help="Service URL."
    )(command)
    return command


def _connection(url: str, api_key: str | None) -> dict[str, Any]:
    # ``click.get_current_context().obj["transport"]`` lets an embedding program (or a test)
    # hand the SDK an httpx transport instead of the network.
    obj = click.get_current_context().find_root().obj
    transport = obj.get("transport") if isinstance(obj, dict) else None
    return {"base_url": url, "api_key": api_key, "transport": transport}


@contextmanager
def _reported_errors() -> Iterator[None]:
    """Turn SDK and connection errors into one line on stderr and exit status 1."""
    try:
        yield
    except InterpreterError as exc:
        raise click.ClickException(f"{exc.code}: {exc.message}") from exc
    except httpx.TransportError as exc:
        raise click.ClickException(f"cannot reach the cellbox service: {exc}") from exc


@contextmanager
def _attached(sandbox_id: str, connection: dict[str, Any]) -> Iterator[Sandbox]:
    """An existing sandbox, left running on exit (unlike ``with Sandbox.connect(...)``)."""
    sbx = Sandbox.connect(sandbox_id, **connection)
    try:
        yield sbx
    finally:
        sbx.close()


def _read_code(code_or_file: str) -> str:
    if code_or_file == "-":
        return sys.stdin.read()
    try:
        path = Path(code_or_file)
        if path.is_file():
            return path.read_text()
    except (OSError, ValueError):  # code too long or odd for a path name: it is code
        pass
    return code_or_file


def _print_result(result: Result) -> None:
    if result.text is not None:
        click.echo(result.text)


def _save_artifacts(sandbox: Sandbox, execution: Execution, directory: Path) -> list[Path]:
    """Download every artifact of the execution's results as ``<execution-count or n>-<k>.<ext>``."""
    prefix = str(execution.execution_count) if execution.execution_count is not None else "n"
    refs = [ref for result in execution.results for ref in result.artifacts]
    saved = []
    for k, ref in enumerate(refs, start=1):
        ext = "." + extension_for(ref.mime)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{prefix}-{k}{ext}"
        path.write_bytes(sandbox.download_artifact(ref))
        saved.append(path)
    return saved


@main.command()
@click.argument("code_or_file")
@_client_options
@click.option("--sandbox", "sandbox_id", help="Run in this existing sandbox (left running) instead of a new one.")
@click.option("--keep", is_flag=True, help="Leave the new sandbox running and print its id.")
@click.option(
    "--artifacts-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("cellbox-artifacts"),
    show_default=True,
    help="Where rich outputs (plots, ...) are saved.",
)
@click.option("--timeout", type=float, help="Execution time limit, seconds.")
@click.option("--language", help="Context language (python, bash, ...) [default: python].")
def run(
    code_or_file: str,
    url: str,
    api_key: str | None,
    sandbox_id: str | None,
    keep: bool,
    artifacts_dir: Path,
    timeout: float | None,
    language: str | None,
) -> None:
    """Run CODE_OR_FILE (code, a file path, or - for stdin) in a sandbox and stream its output.

    Exit status: 0 when the code ran to the end, 1 on an error, a timeout, an interrupt or a
    dead kernel (or when the service reports an error).
    """
    code = _read_code(code_or_file)
    connection = _connection(url, api_key)
    with _reported_errors():
        sandbox = Sandbox.connect(sandbox_id, **connection) if sandbox_id else Sandbox.create(**connection)
        try:
            execution = sandbox.run_code(
                code,
                language=language,
                timeout=timeout,
                on_stdout=lambda text: click.echo(text, nl=False),
                on_stderr=lambda text: click.echo(text, nl=False, err=True),
                on_result=_print_result,
                on_error=lambda error: click.echo(error.traceback, err=True),
            )
            for saved in _save_artifacts(sandbox, execution, artifacts_dir):
                click.echo(f"saved {saved}", err=True)
        finally:
            if sandbox_id is None and not keep:
                sandbox.kill()
            sandbox.close()
    if keep and sandbox_id is None:
        click.echo(f"sandbox {sandbox.sandbox_id} kept", err=True)
    if execution.status != "ok":
        if execution.status != "error":
            reason = f" ({execution.reason})" if execution.reason else ""
            click.echo(f"execution {execution.id} ended: {execution.status}{reason}", err=True)
        sys.exit(1)


@main.group()
def sandbox() -> None:
    """List, inspect and kill sandboxes."""


@sandbox.command("list")
@_client_options
@click.option("--state", multiple=True, help="Only sandboxes in this state (repeatable).")
def sandbox_list(url: str, api_key: str | None, state: tuple[str, ...]) -> None:
    """List this API key's sandboxes."""
    with _reported_errors():
        infos = Sandbox.list(state=state or None, **_connection(url, api_key))
    for info in infos:
        meta = ",".join(f"{k}={v}" for k, v in info.metadata.items())
        click.echo(f"{info.id}\t{info.state.value}\t{info.template}\t{meta}")


@sandbox.command("info")
@_client_options
@click.argument("sandbox_id")
def sandbox_info(url: str, api_key: str | None, sandbox_id: str) -> None:
    """Print a sandbox's info as JSON."""
    with _reported_errors(), _attached(sandbox_id, _connection(url, api_key)) as sbx:
        info = sbx.get_info()
    click.echo(info.model_dump_json(indent=2))


@sandbox.command("kill")
@_client_options
@click.argument("sandbox_id")
def sandbox_kill(url: str, api_key: str | None, sandbox_id: str) -> None:
    """Kill a sandbox."""
    with _reported_errors(), _attached(sandbox_id, _connection(url, api_key)) as sbx:
        sbx.kill()
    click.echo(f"killed {sandbox_id}")


def _lifecycle_command(action: str, doc: str) -> None:
    """Register ``cellbox sandbox pause|resume ID``: call the SDK method, print the new state."""

    @sandbox.command(action, help=doc)
    @_client_options
    @click.argument("sandbox_id")
    def command(url: str, api_key: str | None, sandbox_id: str) -> None:
        with _reported_errors(), _attached(sandbox_id, _connection(url, api_key)) as sbx:
            info = getattr(sbx, action)()
        click.echo(f"{sandbox_id}\t{info.state.value}")


_lifecycle_command("pause", "Freeze a sandbox (memory kept) until `cellbox sandbox resume`.")
_lifecycle_command("resume", "Thaw a paused sandbox.")


@sandbox.command("timeout")
@_client_options
@click.argument("sandbox_id")
@click.argument("seconds", type=click.FloatRange(min=0, min_open=True))
def sandbox_timeout(url: str, api_key: str | None, sandbox_id: str, seconds: float) -> None:
    """Make a sandbox expire SECONDS from now."""
    with _reported_errors(), _attached(sandbox_id, _connection(url, api_key)) as sbx:
        info = sbx.set_timeout(seconds)
    click.echo(f"{sandbox_id}\tend_at={info.end_at}")


def _parse_envs(pairs: tuple[str, ...]) -> dict[str, str]:
    envs = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--env")
        envs[key] = value
    return envs


def command_exit_status(error: CommandExitError) -> int:
    """The exit status ``sandbox exec`` ends with: the command's own code, else 124 after a
    timeout (as coreutils ``timeout``), 128+N after signal N (as a shell), else 1."""
    if error.exit_code is not None and not error.timed_out:
        return error.exit_code
    if error.timed_out:
        return 124
    return 128 + error.signal if error.signal is not None else 1


@sandbox.command("exec")
@_client_options
@click.option("--cwd", help="Working directory in the sandbox [default: /home/user].")
@click.option("--env", "envs", multiple=True, metavar="KEY=VALUE", help="Environment variable (repeatable).")
@click.option("--timeout", type=float, help="Kill the command after this many seconds [default: no limit].")
@click.argument("sandbox_id")
@click.argument("command", nargs=-1, required=True)
def sandbox_exec(
    url: str,
    api_key: str | None,
    cwd: str | None,
    envs: tuple[str, ...],
    timeout: float | None,
    sandbox_id: str,
    command: tuple[str, ...],
) -> None:
    """Run a shell command in a sandbox, streaming its output: ``sandbox exec ID -- CMD [ARG...]``.

    A single CMD is a shell line (``-- 'ls | wc -l'``); several words are quoted and run as
    they are. Exits with the command's exit code (124 after --timeout, 128+N after signal N).
    """
    line = command[0] if len(command) == 1 else shlex.join(command)
    env = _parse_envs(envs)
    status = 0
    with _reported_errors(), _attached(sandbox_id, _connection(url, api_key)) as sbx:
        try:
            sbx.commands.run(
                line,
                envs=env,
                cwd=cwd,
                timeout=timeout,
                on_stdout=lambda text: click.echo(text, nl=False),
                on_stderr=lambda text: click.echo(text, nl=False, err=True),
            )
        except CommandExitError as exc:
            status = command_exit_status(exc)
            if exc.exit_code is None or exc.timed_out:
                click.echo(f"cellbox: {exc}", err=True)
    sys.exit(status)


# -- files ---------------------------------------------------------------------------------------


@main.group("files")
def files_group() -> None:
    """Copy files into and out of a sandbox, and list them."""


@files_group.command("get")
@_client_options
@click.argument("sandbox_id")
@click.argument("path")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Write here, not to stdout.")
def files_get(url: str, api_key: str | None, sandbox_id: str, path: str, output: Path | None) -> None:
    """Download PATH from the sandbox (streamed) to stdout or --output."""
    with _reported_errors(), _attached(sandbox_id, _connection(url, api_key)) as sbx:
        chunks = sbx.files.read(path, format="stream")  # raises before anything is written
        with click.open_file(str(output) if output else "-", "wb") as target:  # "-": stdout, left open
            for chunk in chunks:
                target.write(chunk)


@files_group.command("put")
@_client_options
@click.argument("sandbox_id")
@click.argument("local", type=click.File("rb"))
@click.argument("path")
def files_put(url: str, api_key: str | None, sandbox_id: str, local: IO[bytes], path: str) -> None:
    """Upload the file LOCAL (- for stdin, streamed) to PATH in the sandbox; prints the path and size."""
    with _reported_errors(), _attached(sandbox_id, _connection(url, api_key)) as sbx:
        entry = sbx.files.write(path, local)
    click.echo(f"{entry.path}\t{entry.size}")


@files_group.command("ls")
@_client_options
@click.argument("sandbox_id")
@click.argument("path", default="/home/user")
@click.option("--depth", type=click.IntRange(1, 32), default=1, show_default=True, help="Levels to descend.")
def files_ls(url: str, api_key: str | None, sandbox_id: str, path: str, depth: int) -> None:
    """List the directory PATH [default: /home/user]: type, size, permissions, path."""
    with _reported_errors(), _attached(sandbox_id, _connection(url, api_key)) as sbx:
        entries = sbx.files.list(path, depth=depth)
    for entry in entries:
        click.echo(f"{entry.type}\t{entry.size}\t{entry.permissions}\t{entry.path}")


@files_group.command("watch")
@_client_options
@click.argument("sandbox_id")
@click.argument("path", default="/home/user")
@click.option("--recursive", is_flag=True, help="Also watch subdirectories.")
def files_watch(url: str, api_key: str | None, sandbox_id: str, path: str, recursive: bool) -> None:
    """Print each change under PATH (type, path) as it happens, until interrupted."""
    with _reported_errors(), _attached(sandbox_id, _connection(url, api_key)) as sbx:
        for event in sbx.files.watch_dir(path, recursive=recursive):
            click.echo(f"{event.type}\t{event.path}")


# -- templates -----------------------------------------------------------------------------------


@main.group()
def template() -> None:
    """Build and list sandbox templates (kernel environments)."""


def _templates_root(data_dir: Path | None) -> Path:
    return build_settings(data_dir=data_dir).resolved_templates_dir()


@template.command("build")
@click.argument("source", required=False, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--name", required=True, help="Template name, e.g. 'default'.")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), help="The service's data dir.")
@click.option(
    "--kind",
    type=click.Choice(["auto", "venv", "rootfs"]),
    default="auto",
    show_default=True,
    help="venv: a venv from requirements.txt on the host's /usr; rootfs: a root file system built from "
    "the Dockerfile with buildah; auto: venv when SOURCE has a requirements.txt (kernel_image/), else rootfs.",
)
@click.option(
    "--python",
    "python",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="venv: interpreter the venv is made from [default: /usr/bin/python3].",
)
@click.option("--build-arg", "build_args", multiple=True, metavar="KEY=VALUE", help="rootfs: a Dockerfile ARG.")
@click.option("-v", "--verbose", is_flag=True, help="rootfs: print buildah's output as it comes.")
def template_build(
    source: Path | None,
    name: str,
    data_dir: Path | None,
    kind: str,
    python: Path | None,
    build_args: tuple[str, ...],
    verbose: bool,
) -> None:
    """Build template NAME from SOURCE: a directory with requirements.txt, startup/, template.json
    (a venv template), or with a Dockerfile (a root file system template). Without SOURCE: the
    default template's source shipped with cellbox (the checkout's kernel_image/), e.g.
    `cellbox template build --name default` after `pip install 'cellbox[server,kernel]'`."""
    from cellbox.interpreter.templates import KERNEL_IMAGE, build_template, template_kind

    source = source or KERNEL_IMAGE
    root = _templates_root(data_dir)
    with _reported_errors():
        kind = template_kind(source, kind)
    if kind == "rootfs":
        args = dict(arg.partition("=")[::2] for arg in build_args)
        _template_build_rootfs(source, root, name, args, verbose)
        return
    steps = {
        "Collecting": "resolving",
        "Downloading": "downloading",
        "Installing": "installing",
        "Successfully": "done",
    }
    with click.progressbar(length=4, label=f"building template {name!r}", file=sys.stderr) as bar:
        seen: set[str] = set()

        def on_line(line: str) -> None:
            for prefix, step in steps.items():
                if line.startswith(prefix) and step not in seen:
                    seen.add(step)
                    bar.update(1)

        with _reported_errors():
            target = build_template(source, root, name, python=python, on_line=on_line)
        bar.update(4 - len(seen))
    click.echo(f"template {name!r} built at {target}")


def _template_build_rootfs(source: Path, root: Path, name: str, build_args: dict[str, str], verbose: bool) -> None:
    """A Dockerfile build: a bar over buildah's steps (N/M), each step's instruction as its label;
    a failure prints the step's Dockerfile line and the end of its output."""
    from cellbox.build import BuildEvent, build_rootfs_template
    from cellbox.interpreter.errors import TemplateBuildFailed

    with click.progressbar(length=1, label=f"building template {name!r}", file=sys.stderr, show_pos=True) as bar:
        shown = 0

        def on_event(event: BuildEvent) -> None:
            nonlocal shown
            if event.type == "log" and verbose and event.text is not None:
                click.echo(event.text, err=True)
            if event.type == "step" and event.step is not None and event.total is not None:
                bar.length = event.total
                bar.label = (event.instruction or "")[:60]
                bar.update(max(0, event.step - 1 - shown))
                shown = max(shown, event.step - 1)
            if event.type == "done" and event.total is not None:
                bar.update(event.total - shown)

        try:
            result = build_rootfs_template(source, root, name, on_event=on_event, build_args=build_args)
        except TemplateBuildFailed as exc:
            output = str(exc.details.get("output") or "")
            if output:
                click.echo("\n" + output, err=True)
            raise click.ClickException(f"{exc.code}: {exc.message}") from exc
        except InterpreterError as exc:
            raise click.ClickException(f"{exc.code}: {exc.message}") from exc
    how = "exported" if result.exported else "unchanged (same image)"
    click.echo(
        f"template {name!r} built at {result.path} in {result.duration_s:.1f} s: {how}, "
        f"{result.cached_steps} of {result.steps} steps from the layer cache"
    )


@template.command("base")
@click.argument("image")
def template_base(image: str) -> None:
    """Make IMAGE (debian:<suite>, e.g. debian:bookworm) in the local image store with mmdebstrap,
    from the host's apt sources: for hosts without a registry. Dockerfile builds do this on their
    own when their FROM is a missing debian:<suite>."""
    from cellbox.build import Buildah, bootstrap_debian

    with _reported_errors():
        image_id = bootstrap_debian(image, Buildah(), lambda line: click.echo(line, err=True))
    click.echo(f"{image} is {image_id}")


@template.command("list")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), help="The service's data dir.")
def template_list(data_dir: Path | None) -> None:
    """List the templates this host has."""
    from cellbox.interpreter.templates import TemplateRegistry

    registry = TemplateRegistry(_templates_root(data_dir))
    for name in registry.names():
        try:
            info = registry.get(name)
        except InterpreterError as exc:
            click.echo(f"{name}\t?\t{exc.message}")
            continue
        kind = "rootfs" if getattr(info, "rootfs", None) is not None else "venv"
        click.echo(f"{name}\t{kind}\t{info.python}\t{','.join(sorted(info.kernels))}")


@main.group()
def keys() -> None:
    """API keys (``e2b_`` + hex: the E2B SDKs and cellbox's own take the same key)."""


@keys.command("new")
def keys_new() -> None:
    """Print a fresh random key. Give it to the service with --api-key or CELLBOX_API_KEYS."""
    from cellbox.keys import new_key

    click.echo(new_key())


# -- notebooks -----------------------------------------------------------------------------------


@main.group()
def notebook() -> None:
    """Run a Jupyter notebook in a sandbox; export a sandbox's session as a notebook."""


class _CellProgress:
    """``notebook run``'s progress on stderr, from the ``cell_start`` lines' position/cells_total:
    a bar on a terminal, one line per finished cell otherwise (logs, CI)."""

    def __init__(self) -> None:
        self._bar: Any = None
        self._lines = not sys.stderr.isatty()  # click draws no bar then
        self._done = 0
        self._current: CellStart | None = None

    def start(self, cell: CellStart) -> None:
        if self._bar is None:
            self._bar = click.progressbar(
                length=cell.cells_total,
                label="running cells",
                file=sys.stderr,
                item_show_func=lambda _: self._label(),
            )
            self._bar.__enter__()
        self._current = cell
        steps, self._done = cell.position - 1 - self._done, cell.position - 1
        self._bar.update(steps, current_item=cell)
        if steps == 0:  # update() draws only when it advances: show the new cell's label now
            self._bar.render_progress()

    def end(self, cell: CellEnd) -> None:
        if self._bar is None:
            return
        self._done += 1
        self._bar.update(1, current_item=cell)
        if self._lines:
            total = self._current.cells_total if self._current else "?"
            click.echo(f"cell {self._done}/{total} (index {cell.index}): {cell.status}", err=True)

    def _label(self) -> str:
        cell = self._current
        return f"cell {cell.position}/{cell.cells_total} (index {cell.index})" if cell else ""

    def close(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)


def _write_notebook(nb: dict[str, Any], output: Path | None) -> None:
    import json

    text = json.dumps(nb, indent=1, ensure_ascii=False) + "\n"  # nbformat's own layout
    if output is None:
        click.echo(text, nl=False)
    else:
        output.write_text(text, encoding="utf-8")


def _failure_line(run: NotebookRun) -> str:
    cell = run.failed_cell
    error = next((o for o in cell.outputs if o.get("output_type") == "error"), None) if cell else None
    what = f"{error.get('ename')}: {error.get('evalue')}" if error else (cell.status if cell else "failed")
    return f"cell {run.failed_index} failed: {what}"


@notebook.command("run")
@_client_options
@click.argument("source", type=click.File("rb"))
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Write the executed notebook here "
    "[default: stdout]."
)  # fmt: skip
@click.option("--sandbox", "sandbox_id", help="Run in this existing sandbox (left running) instead of a new one.")
@click.option("--keep", is_flag=True, help="Leave the new sandbox running and print its id.")
@click.option("--continue-on-error", is_flag=True, help="Run every cell even after one fails (exit status 0).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), help="Each cell's time limit, seconds.")
def notebook_run(
    source: IO[bytes],
    url: str,
    api_key: str | None,
    output: Path | None,
    sandbox_id: str | None,
    keep: bool,
    continue_on_error: bool,
    timeout: float | None,
) -> None:
    """Execute the notebook SOURCE (.ipynb, or - for stdin) cell by cell in a sandbox and write
    the executed notebook (outputs, images, execution counts) to --output.

    Progress goes to stderr. The executed notebook is written also when a cell failed. Exit
    status: 1 when a cell failed and the run stopped there (unless --continue-on-error), or
    when the service reports an error; 0 otherwise.
    """
    body = source.read()
    connection = _connection(url, api_key)
    progress = _CellProgress()
    with _reported_errors():
        sbx = Sandbox.connect(sandbox_id, **connection) if sandbox_id else Sandbox.create(**connection)
        try:
            result = sbx.run_notebook(
                body,
                stop_on_error=not continue_on_error,
                timeout=timeout,
                on_cell_start=progress.start,
                on_cell_end=progress.end,
            )
        finally:
            progress.close()
            if sandbox_id is None and not keep:
                sbx.kill()
            sbx.close()
    _write_notebook(result.notebook, output)
    if keep and sandbox_id is None:
        click.echo(f"sandbox {sbx.sandbox_id} kept", err=True)
    if result.status != "ok":
        click.echo(_failure_line(result), err=True)
        if not continue_on_error:
            sys.exit(1)


@notebook.command("export")
@_client_options
@click.argument("sandbox_id")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Write here [default: stdout].")
@click.option("--context", help="The context whose executions to export [default: the sandbox's default one].")
def notebook_export(url: str, api_key: str | None, sandbox_id: str, output: Path | None, context: str | None) -> None:
    """Write the session of SANDBOX_ID as a Jupyter notebook (.ipynb): its executions in order,
    with their outputs and images. Works after the sandbox ended, while its history is kept."""
    with _reported_errors(), _attached(sandbox_id, _connection(url, api_key)) as sbx:
        nb = sbx.export_notebook(context)
    _write_notebook(nb, output)


if __name__ == "__main__":  # last: ``python -m cellbox.cli`` must see every command
    main()
