"""Per-sandbox access tokens, signed file URLs and request routing of the E2B face."""

from __future__ import annotations

import pytest

from cellbox.api.deps import ANONYMOUS, owner_of_key
from cellbox.api.faces.e2b import auth
from cellbox.api.faces.e2b.app import is_e2b_request
from cellbox.api.faces.e2b.services import sandbox_target
from cellbox.interpreter.errors import Unauthorized


def test_tokens_name_the_owner_and_differ_per_sandbox_and_key() -> None:
    keys = ["e2b_aaa", "e2b_bbb"]
    t1 = auth.access_token("e2b_aaa", "sb_1")
    assert t1 == auth.access_token("e2b_aaa", "sb_1")  # the same on every connect
    assert t1 != auth.access_token("e2b_aaa", "sb_2") != auth.access_token("e2b_bbb", "sb_1")
    assert auth.owner_for_token(keys, "sb_1", t1) == owner_of_key("e2b_aaa")
    assert auth.owner_for_token(keys, "sb_1", auth.access_token("e2b_bbb", "sb_1")) == owner_of_key("e2b_bbb")
    for bad in (None, "", t1[:-1] + "0", auth.access_token("e2b_aaa", "sb_2")):
        with pytest.raises(Unauthorized):
            auth.owner_for_token(keys, "sb_1", bad)


def test_without_keys_there_is_one_anonymous_owner() -> None:
    assert auth.owner_for_token([], "sb_1", None) == ANONYMOUS
    assert auth.owner_for_token([], "sb_1", auth.access_token(None, "sb_1")) == ANONYMOUS
    with pytest.raises(Unauthorized):
        auth.owner_for_token([], "sb_1", "wrong")


def test_signature_matches_the_sdks_algorithm() -> None:
    # e2b/sandbox/signature.py: "v1_" + base64 (no padding) of sha256("path:op:user:token")
    import base64
    import hashlib

    raw = hashlib.sha256(b"/home/user/a.txt:read::tok").digest()
    expected = "v1_" + base64.b64encode(raw).decode().rstrip("=")
    assert auth.signature("/home/user/a.txt", "read", None, "tok", None) == expected
    assert auth.signature_valid(expected, "/home/user/a.txt", "read", None, "tok", None)
    assert not auth.signature_valid(expected, "/home/user/a.txt", "write", None, "tok", None)
    timed = auth.signature("a", "read", "user", "tok", 100)
    assert auth.signature_valid(timed, "a", "read", "user", "tok", 100, now=99)
    assert not auth.signature_valid(timed, "a", "read", "user", "tok", 100, now=101)


def test_sandbox_target_from_headers_or_host() -> None:
    assert sandbox_target({"e2b-sandbox-id": "sb_1", "e2b-sandbox-port": "49983"}, None) == ("sb_1", 49983)
    sid = "sb_0123456789abcdef"
    assert sandbox_target({"host": f"49999-{sid}.cellbox.test"}, None) == (sid, 49999)
    assert sandbox_target({"host": f"49999-{sid}.cellbox.test:8080"}, "cellbox.test") == (sid, 49999)
    assert sandbox_target({"host": f"49999-{sid}.elsewhere.test"}, "cellbox.test") is None
    assert sandbox_target({"host": "8080-myapp.example.com"}, None) is None  # not a sandbox id
    assert sandbox_target({"e2b-sandbox-id": "sb_1", "e2b-sandbox-port": "x"}, None) is None


def _scope(path: str, headers: dict[str, str] | None = None, query: str = "") -> dict[str, object]:
    raw = [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    return {"type": "http", "path": path, "headers": raw, "query_string": query.encode()}


def test_which_requests_are_the_faces() -> None:
    assert is_e2b_request(_scope("/v2/sandboxes"))
    assert is_e2b_request(_scope("/sandboxes/sb_1/timeout"))
    assert is_e2b_request(_scope("/execute", {"e2b-sandbox-id": "sb_1", "e2b-sandbox-port": "49999"}))
    assert is_e2b_request(_scope("/files", query="path=a&signature=v1_x"))
    assert not is_e2b_request(_scope("/v1/sandboxes"))
    assert not is_e2b_request(_scope("/files"))
    assert is_e2b_request(_scope("/", {"host": "49983-sb_0123456789abcdef.cellbox.test"}))
    # A user's own server on another port is the native face's port relay, not this face's.
    assert not is_e2b_request(_scope("/", {"host": "3000-sb_0123456789abcdef.cellbox.test"}))
    assert not is_e2b_request(_scope("/", {"e2b-sandbox-id": "sb_1", "e2b-sandbox-port": "3000"}))
    assert not is_e2b_request(_scope("/sandboxesque"))
    assert not is_e2b_request({"type": "websocket", "path": "/v2/sandboxes", "headers": []})
