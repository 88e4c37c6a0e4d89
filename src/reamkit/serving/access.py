"""Who may ask what of ``reamkit serve``: the paths it serves, the API key, and CORS.

* Paths are matched after normalisation (``//``, ``.`` and ``..`` segments, percent-encoded slashes, which
  the HTTP server decodes before we see them), and only the canonical path of a served endpoint is forwarded:
  nothing reaches llama-server's other endpoints (``/props``, ``/slots``, ``/metrics``, ...) and no spelling of
  a path skips the checks its canonical form gets.
* API keys are compared in constant time.
* CORS as llama-server does it (``tools/server/server-http.cpp``): ``--cors-origins`` ``*`` (the default)
  reflects any ``Origin``, ``localhost`` only localhost origins, otherwise a comma-separated list; a preflight
  ``OPTIONS`` is answered on any path without a key (browsers send none), with credentials allowed. One
  difference: the allowed headers echo the preflight's ``Access-Control-Request-Headers``, because a ``*``
  does not cover ``Authorization`` in browsers.
"""

from __future__ import annotations

import hmac
import posixpath
import re
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import Response

PUBLIC = {"/health", "/v1/health"}
_GENERATION = ("/v1/chat/completions", "/chat/completions", "/v1/chat/completions/input_tokens",
               "/chat/completions/input_tokens", "/v1/completions", "/completions", "/completion",
               "/v1/responses", "/responses", "/v1/responses/input_tokens", "/responses/input_tokens",
               "/v1/embeddings", "/embeddings", "/embedding", "/v1/messages", "/v1/messages/count_tokens",
               "/infill", "/tokenize", "/detokenize", "/apply-template")
SERVED: dict[str, set[str]] = {**{p: {"POST"} for p in _GENERATION},
                               **{p: {"GET"} for p in ("/health", "/v1/health", "/v1/models", "/models")}}
CORS_METHODS = "GET, POST, DELETE, OPTIONS"


def canonical(path: str) -> str:
    """``path`` with repeated slashes, ``.`` and ``..`` segments resolved (never above the root)."""
    return posixpath.normpath(re.sub(r"/+", "/", "/" + path))


def authorized(request: Request, key: str) -> bool:
    given = request.headers.get("authorization", "")
    if given[:7].lower() == "bearer ":
        given = given[7:]
    elif not given:
        given = request.headers.get("x-api-key", "")
    return hmac.compare_digest(given.strip().encode(), key.encode())


def _is_localhost(origin: str) -> bool:
    try:
        return urlsplit(origin if "//" in origin else "//" + origin).hostname in ("localhost", "127.0.0.1", "::1")
    except ValueError:
        return False


def allowed_origin(origin: str, setting: str) -> str | None:
    """The ``Access-Control-Allow-Origin`` value for ``origin`` under ``--cors-origins setting``, or None."""
    if not origin:
        return None
    if setting == "*":
        return origin                  # llama-server's default (credentials allowed): echo any origin
    if setting == "localhost":
        return origin if _is_localhost(origin) else None
    return origin if origin in {o.strip() for o in setting.split(",")} else None


class CORS:
    """ASGI middleware: answers preflights, adds ``Access-Control-Allow-Origin`` to every other answer."""

    def __init__(self, app, origins: str):
        self.app, self.origins = app, origins

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        allow = allowed_origin(headers.get("origin", ""), self.origins)
        if scope["method"] == "OPTIONS":
            out = {"Access-Control-Allow-Credentials": "true", "Access-Control-Allow-Methods": CORS_METHODS,
                   "Access-Control-Allow-Headers": headers.get("access-control-request-headers") or "*",
                   "Access-Control-Max-Age": "600"}
            if allow:
                out.update({"Access-Control-Allow-Origin": allow, "Vary": "Origin"})
            return await Response(status_code=200, headers=out)(scope, receive, send)
        if not allow:
            return await self.app(scope, receive, send)

        async def send_with_cors(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []),
                                      (b"access-control-allow-origin", allow.encode("latin-1")),
                                      (b"access-control-allow-credentials", b"true"), (b"vary", b"Origin")]
            await send(message)

        return await self.app(scope, receive, send_with_cors)
