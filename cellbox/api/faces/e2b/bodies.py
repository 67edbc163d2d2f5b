"""Reading request bodies on the E2B face: never more than the configured maximum
(``Settings.max_request_bytes``; file uploads stream and have their own limit)."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request

from cellbox.api.faces.e2b.services import services
from cellbox.interpreter.errors import InvalidRequest, RequestTooLarge

__all__ = ["read_body", "read_json_object"]


async def read_body(request: Request) -> bytes:
    """The whole body; RequestTooLarge past the limit, announced or streamed."""
    limit = services(request).settings.max_request_bytes
    announced = request.headers.get("content-length", "")
    if announced.isdigit() and int(announced) > limit:
        raise RequestTooLarge(f"request body larger than {limit} bytes", limit=limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestTooLarge(f"request body larger than {limit} bytes", limit=limit)
    return bytes(body)


async def read_json_object(request: Request) -> dict[str, Any]:
    """The body as a JSON object (an empty body is ``{}``)."""
    raw = await read_body(request)
    if not raw:
        return {}
    try:
        doc = json.loads(raw)
    except ValueError:
        raise InvalidRequest("the request body is not valid JSON") from None
    if not isinstance(doc, dict):
        raise InvalidRequest("the request body must be a JSON object")
    return doc
