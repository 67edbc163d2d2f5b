"""The one exception tree of cellbox.

Everything the core raises derives from :class:`InterpreterError`. Each class carries a
stable machine ``code`` (the ``error.code`` of the JSON error body) and the API maps it to an
HTTP status in one table (``cellbox.api.errors``). The SDK turns error bodies back into the
same classes (:func:`from_payload`), so a caller catches the same exception whether it uses
the core in-process or talks to a server.

* InterpreterError                 code "internal"
  + InvalidRequest                 "invalid_request"       bad field values the schema allows
    - RequestTooLarge              "request_too_large"
  + Unauthorized                   "unauthorized"          no or unknown API key
  + NotFound                       "not_found"
    - SandboxNotFound              "sandbox_not_found"
    - ContextNotFound              "context_not_found"
    - ExecutionNotFound            "execution_not_found"
    - ArtifactNotFound             "artifact_not_found"
    - TemplateNotFound             "template_not_found"
    - FileNotFound                 "file_not_found"        no such path in the sandbox
  + PermissionDenied               "permission_denied"     a path outside the sandbox, or not allowed
  + Conflict                       "conflict"
    - SandboxNotRunning            "sandbox_not_running"
    - FileExists                   "file_exists"
  + NoSpace                        "no_space"              the sandbox's disk quota is full
  + CapacityError                  "capacity"
    - SandboxLimitReached          "sandbox_limit_reached" per-key quota (429)
    - ServiceAtCapacity            "service_at_capacity"   the host is full (503)
  + KernelError                    "kernel_error"
    - KernelDied                   "kernel_died"
    - KernelStartFailed            "kernel_start_failed"
  + RuntimeUnavailable             "runtime_unavailable"
  + TemplateBuildFailed            "template_build_failed"
  + BadGateway                     "bad_gateway"           a server in a sandbox answered badly (502)
    - PortNotListening             "port_not_listening"    nothing listens on that sandbox port
"""

from __future__ import annotations

from typing import Any, ClassVar


class InterpreterError(Exception):
    """Base of every error cellbox raises on purpose."""

    code: ClassVar[str] = "internal"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_payload(self) -> dict[str, Any]:
        """The JSON error body: ``{"error": {"code", "message", ...details}}``."""
        return {"error": {"code": self.code, "message": self.message, **self.details}}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class InvalidRequest(InterpreterError):
    """A request that parsed but cannot be carried out as asked."""

    code = "invalid_request"


class RequestTooLarge(InvalidRequest):
    """The request body is larger than the configured maximum."""

    code = "request_too_large"


class Unauthorized(InterpreterError):
    """No API key, or one the service does not know."""

    code = "unauthorized"


class NotFound(InterpreterError):
    """Something that does not exist, or that belongs to another API key."""

    code = "not_found"


class SandboxNotFound(NotFound):
    """No sandbox with that id for this API key."""

    code = "sandbox_not_found"


class ContextNotFound(NotFound):
    """No context with that id in the sandbox."""

    code = "context_not_found"


class ExecutionNotFound(NotFound):
    """No execution with that id in the sandbox."""

    code = "execution_not_found"


class ArtifactNotFound(NotFound):
    """No artifact with that id for this API key."""

    code = "artifact_not_found"


class TemplateNotFound(NotFound):
    """No template of that name; ``details["known"]`` lists the ones there are."""

    code = "template_not_found"


class FileNotFound(NotFound):
    """No such file or directory in the sandbox."""

    code = "file_not_found"


class PermissionDenied(InterpreterError):
    """The path is outside the sandbox (``..``, a symlink out) or the sandbox may not touch it."""

    code = "permission_denied"


class NoSpace(InterpreterError):
    """The sandbox's disk quota (or file size limit) is exhausted."""

    code = "no_space"


class Conflict(InterpreterError):
    """The request clashes with the current state of the resource."""

    code = "conflict"


class SandboxNotRunning(Conflict):
    """The sandbox exists but is killed, lost or otherwise not running."""

    code = "sandbox_not_running"


class FileExists(Conflict):
    """The path exists and the request would not replace it."""

    code = "file_exists"


class CapacityError(InterpreterError):
    """The service cannot take more work right now."""

    code = "capacity"


class SandboxLimitReached(CapacityError):
    """This API key already has as many sandboxes as it may."""

    code = "sandbox_limit_reached"


class ServiceAtCapacity(CapacityError):
    """The host runs as many sandboxes as it may."""

    code = "service_at_capacity"


class KernelError(InterpreterError):
    """A kernel misbehaved."""

    code = "kernel_error"


class KernelDied(KernelError):
    """The kernel process exited while it was needed."""

    code = "kernel_died"


class KernelStartFailed(KernelError):
    """A kernel did not start or did not become ready in time."""

    code = "kernel_start_failed"


class RuntimeUnavailable(InterpreterError):
    """The runtime cannot work on this host (missing tool, missing privilege)."""

    code = "runtime_unavailable"


class TemplateBuildFailed(InterpreterError):
    """Building a template failed; ``details["output"]`` has the end of the build log."""

    code = "template_build_failed"


class BadGateway(InterpreterError):
    """A server inside a sandbox (reached through its ports) gave no valid answer."""

    code = "bad_gateway"


class PortNotListening(BadGateway):
    """Nothing accepts connections on that port inside the sandbox."""

    code = "port_not_listening"


def _all_subclasses(cls: type[InterpreterError]) -> list[type[InterpreterError]]:
    out = [cls]
    for sub in cls.__subclasses__():
        out.extend(_all_subclasses(sub))
    return out


ERRORS_BY_CODE: dict[str, type[InterpreterError]] = {cls.code: cls for cls in _all_subclasses(InterpreterError)}


def from_payload(payload: Any, fallback_message: str = "") -> InterpreterError:
    """Rebuild the exception a JSON error body describes (used by the SDK).

    An unknown code gives :class:`InterpreterError` (the SDK then picks a class by HTTP status).
    """
    body = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(body, dict):
        return InterpreterError(fallback_message or "unexpected error response")
    details = {k: v for k, v in body.items() if k not in {"code", "message"}}
    code = str(body.get("code", "internal"))
    cls = ERRORS_BY_CODE.get(code, InterpreterError)
    err = cls(str(body.get("message", fallback_message)), **details)
    return err
