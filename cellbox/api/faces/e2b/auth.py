"""Who is calling, on each of E2B's surfaces.

* The control plane gets the API key in ``X-API-KEY`` (cellbox's own ``Authorization:
  Bearer`` works too): the caller's owner id is the key's, as on the native API.
* The sandbox surfaces (envd, port 49999) never see the API key. E2B hands out a per-sandbox
  *access token* at create/connect, and the SDKs send it back as ``X-Access-Token`` (envd) or
  ``E2B-Traffic-Access-Token`` (port 49999, where the SDKs send no envd token). Here that
  token is ``HMAC-SHA256(api key, sandbox id)``: nothing to store, the same token on every
  connect, and the key it was made with names the owner.
* Signed ``/files`` URLs (``download_url``/``upload_url``) carry neither header nor sandbox id:
  the signature, made with the sandbox's token, says which sandbox (:func:`signature`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

from cellbox.api.deps import ANONYMOUS, owner_of_key
from cellbox.interpreter.errors import Unauthorized

__all__ = ["access_token", "key_for_token", "owner_for_token", "signature", "signature_valid"]

_ANONYMOUS_SECRET = "cellbox-anonymous"  # with no keys configured there is one owner


def access_token(key: str | None, sandbox_id: str) -> str:
    """The sandbox's access token for the owner of ``key`` (None: the anonymous owner)."""
    secret = (key or _ANONYMOUS_SECRET).encode()
    return hmac.new(secret, b"e2b-access:" + sandbox_id.encode(), hashlib.sha256).hexdigest()[:40]


def key_for_token(api_keys: list[str], sandbox_id: str, token: str | None) -> str | None:
    """The configured key ``token`` was made with for this sandbox (None with no keys
    configured). Unauthorized when no key made it."""
    if not api_keys:
        if token is not None and not hmac.compare_digest(token, access_token(None, sandbox_id)):
            raise Unauthorized("invalid access token")
        return None
    if not token:
        raise Unauthorized("missing access token: send X-Access-Token")
    for key in api_keys:
        if hmac.compare_digest(token, access_token(key, sandbox_id)):
            return key
    raise Unauthorized("invalid access token")


def owner_for_token(api_keys: list[str], sandbox_id: str, token: str | None) -> str:
    """The owner id of the sandbox the token was made for; Unauthorized otherwise."""
    key = key_for_token(api_keys, sandbox_id, token)
    return ANONYMOUS if key is None else owner_of_key(key)


def signature(path: str, operation: str, user: str | None, token: str, expiration: int | None) -> str:
    """E2B's v1 file URL signature (``e2b/sandbox/signature.py``):
    ``"v1_" + base64_nopad(sha256("path:operation:user:token[:expiration]"))``."""
    raw = f"{path}:{operation}:{user or ''}:{token}"
    if expiration is not None:
        raw += f":{expiration}"
    digest = hashlib.sha256(raw.encode()).digest()
    return "v1_" + base64.b64encode(digest).rstrip(b"=").decode()


def signature_valid(
    given: str,
    path: str,
    operation: str,
    user: str | None,
    token: str,
    expiration: int | None,
    now: float | None = None,
) -> bool:
    """Whether ``given`` signs this request with ``token`` and has not expired."""
    if expiration is not None and (time.time() if now is None else now) > expiration:
        return False
    return hmac.compare_digest(given, signature(path, operation, user, token, expiration))
