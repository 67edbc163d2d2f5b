"""Template builds over HTTP: ``POST /v1/templates`` streams a Dockerfile build as NDJSON.

Body, one of:

* ``application/x-tar`` (or ``application/gzip``: a .tar.gz): the build context, with a
  ``Dockerfile`` at its top; the template's name in ``?name=``;
* ``application/json``: ``{"name": "...", "dockerfile": "FROM ...", "build_args": {...}}``: a
  Dockerfile with no context files (its COPY/ADD can only fetch URLs).

Off unless the service is started with ``template_builds`` (``CELLBOX_TEMPLATE_BUILDS=true``):
a build's RUN steps run as root on the host (chroot isolation is no sandbox), so only deployments
where every API key may have that turn it on; 403 otherwise.

Answers 200 with one JSON line per build event (:mod:`cellbox.build.events`: ``step``,
``cached``, ``log``, ``error``, ``done``); the last line is ``done`` or ``error``. Before the
stream starts: 422 for a bad body or name, 409 while another build of that name runs. The build
goes on when the client leaves (the template ends up built); it runs in a worker thread, as
buildah is a subprocess.
"""

from __future__ import annotations

import asyncio
import io
import json
import tarfile
import tempfile
from collections.abc import AsyncIterator
from contextlib import ExitStack
from pathlib import Path, PurePosixPath
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from starlette.responses import Response

from cellbox.api.deps import Owner, get_settings
from cellbox.api.streaming import NDJSON, NDJSONStream
from cellbox.build import BuildEvent, build_rootfs_template
from cellbox.build.builder import build_lock
from cellbox.interpreter.config import Settings
from cellbox.interpreter.errors import InterpreterError, InvalidRequest, PermissionDenied

router = APIRouter(prefix="/v1/templates", tags=["templates"])

_RUNNING: set[asyncio.Future[None]] = set()  # builds outlive the request that started them
_TAR_TYPES = {"application/x-tar", "application/tar", "application/gzip", "application/x-gzip", "application/x-gtar"}


def _checked_members(tar: tarfile.TarFile) -> list[tarfile.TarInfo]:
    """The archive's regular files, directories and links, each inside the archive's root (what
    tarfile's "data" filter allows; Debian 12's Python 3.11.2 predates it). Owners are dropped."""
    members = []
    for member in tar.getmembers():
        path = PurePosixPath(member.name)
        if path.is_absolute() or ".." in path.parts:
            raise InvalidRequest(f"the tar archive has a path outside it: {member.name!r}", field="body")
        if member.islnk() or member.issym():
            target = PurePosixPath(member.linkname)
            base = PurePosixPath() if member.islnk() else path.parent
            if target.is_absolute() or ".." in (base / target).parts:
                raise InvalidRequest(f"the tar archive has a link out of it: {member.name!r}", field="body")
        elif not (member.isfile() or member.isdir()):
            raise InvalidRequest(f"the tar archive has a special file: {member.name!r}", field="body")
        member.uid = member.gid = 0
        member.uname = member.gname = "root"
        member.mode &= 0o755
        members.append(member)
    return members


def _unpack(body: bytes | Path, into: Path) -> None:
    """Unpack a tar (bytes, or a file holding it) into ``into``; InvalidRequest when it is not
    one or reaches outside."""
    try:
        with (
            tarfile.open(fileobj=io.BytesIO(body), mode="r:*")
            if isinstance(body, bytes)
            else tarfile.open(body, mode="r:*") as tar
        ):
            members = _checked_members(tar)
            # with the "data" filter too where tarfile has it (Python 3.11.4+; 3.12+ warns without)
            options: dict[str, Any] = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(into, members=members, **options)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise InvalidRequest(f"the body is not a readable tar archive: {exc}", field="body") from None


def _json_body(body: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except ValueError:
        raise InvalidRequest("the body is not valid JSON", field="body") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("dockerfile"), str) or not doc["dockerfile"].strip():
        raise InvalidRequest('a JSON body is {"name": ..., "dockerfile": "FROM ..."}', field="dockerfile")
    args = doc.get("build_args", {})
    if not isinstance(args, dict) or not all(isinstance(v, str) for v in args.values()):
        raise InvalidRequest("build_args maps names to strings", field="build_args")
    return doc


@router.post("", response_class=Response, responses={200: {"content": {NDJSON: {}}}})
async def build_template(
    request: Request,
    owner: Owner,
    settings: Annotated[Settings, Depends(get_settings)],
    name: Annotated[str | None, Query(description="The template's name (tar bodies).")] = None,
) -> Response:
    """Build a template from a Dockerfile, streaming the build's progress as NDJSON (only when
    the service allows it: ``template_builds``)."""
    if not settings.template_builds:
        raise PermissionDenied(
            "template builds over the API are off: a Dockerfile's RUN steps run as root on the host. "
            "Build with `cellbox template build` there, or serve with CELLBOX_TEMPLATE_BUILDS=true",
            field="template_builds",
        )
    kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    build_args: dict[str, str] = {}
    root = settings.resolved_templates_dir()
    root.mkdir(parents=True, exist_ok=True)
    stack = ExitStack()
    try:
        upload = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=".upload-", dir=root)))
        context = upload / "context"
        context.mkdir()
        if kind == "application/json":
            doc = _json_body(await request.body())
            name = doc.get("name") if isinstance(doc.get("name"), str) else name
            (context / "Dockerfile").write_text(doc["dockerfile"])
            build_args = {str(k): v for k, v in doc.get("build_args", {}).items()}
        elif kind in _TAR_TYPES:
            archive = upload / "context.tar"  # on disk, not in memory: contexts can be large
            with archive.open("wb") as f:
                async for chunk in request.stream():
                    f.write(chunk)
            await asyncio.to_thread(_unpack, archive, context)
            archive.unlink()
            if not (context / "Dockerfile").is_file() and not (context / "Containerfile").is_file():
                raise InvalidRequest("the tar archive has no Dockerfile at its top", field="body")
        else:
            raise InvalidRequest(
                "send the build context as application/x-tar, or application/json with a dockerfile",
                field="content-type",
            )
        if not name or not name.replace("-", "").replace("_", "").isalnum():
            raise InvalidRequest("a template name is letters, digits, - and _", field="name")
        stack.enter_context(build_lock(root, name))  # Conflict (409) while another build runs
    except BaseException:
        stack.close()
        raise
    return NDJSONStream(_run(stack, context, root, name, build_args), BuildEvent.to_wire)


async def _run(
    stack: ExitStack, context: Path, root: Path, name: str, build_args: dict[str, str]
) -> AsyncIterator[BuildEvent]:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[BuildEvent | None] = asyncio.Queue()

    def emit(event: BuildEvent) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, event)

    def build() -> None:
        try:
            build_rootfs_template(context, root, name, on_event=emit, build_args=build_args, locked=True)
        except InterpreterError as exc:
            details = exc.details
            emit(
                BuildEvent(
                    "error",
                    code=exc.code,
                    message=exc.message,
                    line=details.get("line"),
                    output=details.get("output"),
                    instruction=details.get("instruction"),
                )
            )
        except Exception as exc:  # a bug or a host problem: the stream still ends with an error
            emit(BuildEvent("error", code="internal", message=f"{type(exc).__name__}: {exc}"))
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, None)

    task = asyncio.ensure_future(asyncio.to_thread(build))
    _RUNNING.add(task)
    task.add_done_callback(_RUNNING.discard)
    task.add_done_callback(lambda _: stack.close())  # the lock and the context go with the build
    while (event := await queue.get()) is not None:
        yield event
