"""The thin HTTP layer in front of llama-server, for what it does not do right by itself.

Each piece exists because a test against the pinned llama-server showed the gap:

* API keys are compared in constant time, before anything else, on every path but ``/health``
  (llama-server's own comparison is a plain ``==`` and runs after its body parsing); llama-server itself
  listens on a private loopback port behind a random key of its own.
* A body over the size cap gets 413 before it is read whole, malformed JSON gets 400 (llama-server: 500), and
  ``max_tokens`` larger than the context gets 400 (llama-server: accepted, then generates until the context is
  full). Errors use the OpenAI shape, or the Anthropic shape on ``/v1/messages``.
* Top-level fields an endpoint does not use get 400 naming the field (:mod:`.fields`; llama-server ignores
  them silently), unless ``--allow-unknown-fields``.
* Qwen3-Coder tool calls: binding ``tool_choice`` and cut-off calls returned as text (:mod:`.qwen3_coder`).

Everything else (``/v1/models``, completions, streaming, usage, the Anthropic conversion, tool-call parsing
and typing) is llama-server's, passed through byte for byte.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import time

import httpx2 as httpx
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from . import qwen3_coder
from .fields import refusal, unknown_fields
from .requestlog import summary
from .streams import AnthropicToolStream, OpenAIToolStream, split_events

log = logging.getLogger("reamkit.serve")
PUBLIC = {"/health", "/v1/health"}
ANTHROPIC = {"/v1/messages", "/v1/messages/count_tokens"}
CHAT = {"/v1/chat/completions", "/chat/completions"}
TOKEN_FIELDS = ("max_tokens", "max_completion_tokens", "n_predict")
HOP_HEADERS = {"host", "content-length", "authorization", "x-api-key", "connection", "transfer-encoding",
               "accept-encoding", "keep-alive", "upgrade"}


class Settings:
    def __init__(self, upstream: str, upstream_key: str, api_key: str | None, n_ctx: int,
                 qwen3_coder_tools: bool, max_body: int, verbose: bool = False, keepalive: int = 4,
                 allow_unknown_fields: bool = False):
        self.upstream, self.upstream_key, self.api_key = upstream, upstream_key, api_key
        self.n_ctx, self.qwen3_coder_tools, self.max_body, self.verbose = n_ctx, qwen3_coder_tools, max_body, verbose
        self.keepalive, self.allow_unknown_fields = keepalive, allow_unknown_fields


def error(path: str, status: int, message: str, kind: str = "invalid_request_error",
          param: str | None = None) -> JSONResponse:
    if path in ANTHROPIC:
        body = {"type": "error", "error": {"type": kind, "message": message}}
    else:
        body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status)


def authorized(request: Request, key: str) -> bool:
    given = request.headers.get("authorization", "")
    if given[:7].lower() == "bearer ":
        given = given[7:]
    elif not given:
        given = request.headers.get("x-api-key", "")
    return hmac.compare_digest(given.strip().encode(), key.encode())


OPENAI_ROLES = {"system", "developer", "user", "assistant", "tool", "function"}
ANTHROPIC_ROLES = {"user", "assistant", "system"}   # Claude Code sends system turns inside messages too
# Block types of the Messages API that a client may send back; llama-server silently drops any other.
ANTHROPIC_BLOCKS = {"text", "image", "document", "tool_use", "tool_result", "thinking", "redacted_thinking",
                    "search_result", "server_tool_use", "web_search_tool_result", "web_fetch_tool_result",
                    "code_execution_tool_result", "mcp_tool_use", "mcp_tool_result", "container_upload",
                    "tool_reference"}


def check_messages(body: dict, api: str) -> str | None:
    """Roles and (Anthropic) content-block types llama-server would accept silently and mis-render or drop
    (top-level fields: :mod:`.fields`)."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return "'messages' must be a list"
    roles = ANTHROPIC_ROLES if api == "anthropic" else OPENAI_ROLES
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            return f"messages[{i}] must be an object"
        if msg.get("role") not in roles:
            return f"messages[{i}].role {msg.get('role')!r} is not one of {', '.join(sorted(roles))}"
        content = msg.get("content")
        if api == "anthropic" and isinstance(content, list):
            for block in content:
                kind = block.get("type") if isinstance(block, dict) else None
                if kind not in ANTHROPIC_BLOCKS:
                    return f"messages[{i}] has a content block of unknown type {kind!r}"
    return None


def check_body(body: object, n_ctx: int, api: str | None = None) -> str | None:
    """A one-line reason to refuse the request, or None."""
    if not isinstance(body, dict):
        return "the request body must be a JSON object"
    if api:
        reason = check_messages(body, api)
        if reason:
            return reason
    for field in TOKEN_FIELDS:
        value = body.get(field)
        if isinstance(value, int) and not isinstance(value, bool) and value > n_ctx:
            return (f"{field} = {value} is larger than the context of {n_ctx} tokens; "
                    f"ask for at most {n_ctx} (prompt and answer share the context)")
    return None


def build_app(settings: Settings, llama_alive=lambda: True) -> Starlette:
    # llama-server serves each connection on one of its HTTP threads (slots + 4 or more) for as long as the
    # connection lives, so keep at most one idle connection per slot: reuse saves a connect per request, and
    # idle connections never hold every thread while requests wait.
    client = httpx.AsyncClient(base_url=settings.upstream, timeout=httpx.Timeout(None, connect=10.0),
                               limits=httpx.Limits(max_connections=None, max_keepalive_connections=settings.keepalive,
                                                   keepalive_expiry=2.0))   # llama-server drops idle ones after 5 s
    passed: set[tuple[str, str]] = set()     # unknown fields let through, each logged once

    async def proxy(request: Request) -> Response:
        started = time.perf_counter()
        path = request.url.path
        if settings.api_key and path not in PUBLIC and not authorized(request, settings.api_key):
            log.warning("%s %s -> 401 (missing or wrong API key)", request.method, path)
            return error(path, 401, "invalid or missing API key", "authentication_error")
        parts, size = [], 0
        try:
            async for part in request.stream():
                size += len(part)
                if size <= settings.max_body:
                    parts.append(part)
                elif size > 8 * settings.max_body:
                    break      # stop reading a huge upload; the answer below closes the connection
        except ClientDisconnect:
            return Response(status_code=499)
        if size > settings.max_body:
            # read (and dropped) to the end, so the client gets this answer instead of a reset connection
            return error(path, 413, f"request body of {size}+ bytes is over the {settings.max_body}-byte limit",
                         "request_too_large")
        raw = b"".join(parts)

        body, api, schemas = None, None, {}
        if request.method == "POST" and raw:
            try:
                body = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as e:
                return error(path, 400, f"malformed JSON body: {e}")
            api = "anthropic" if path == "/v1/messages" else "openai" if path in CHAT else None
            reason = check_body(body, settings.n_ctx, api)
            if reason:
                return error(path, 400, reason)
            unknown = unknown_fields(path, body) if isinstance(body, dict) else []
            if unknown and not settings.allow_unknown_fields:
                log.warning("%s %s -> 400 (unknown fields: %s)", request.method, path, ", ".join(unknown))
                return error(path, 400, refusal(path, unknown), param=unknown[0])
            for name in unknown:
                if (path, name) not in passed:
                    passed.add((path, name))
                    log.warning("%s: passing unknown field %r through to llama-server", path, name)
            if api and settings.qwen3_coder_tools:
                new, has_tools = qwen3_coder.rewrite_tool_choice(body, api)
                if has_tools:
                    schemas = qwen3_coder.tool_schemas(new)
                if new is not body:
                    body, raw = new, json.dumps(new).encode()

        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        headers["authorization"] = f"Bearer {settings.upstream_key}"
        for attempt in range(2):
            upstream = client.build_request(request.method, path, params=request.query_params, headers=headers,
                                            content=raw)
            try:
                resp = await client.send(upstream, stream=True)
                break
            except (httpx.RemoteProtocolError, httpx.ConnectError) as e:
                # an idle kept-alive connection that llama-server closed just as we reused it: it never saw
                # the request, so sending it once more on a fresh connection is safe
                if attempt or not llama_alive():
                    log.error("%s %s -> 502 (llama-server did not answer: %s)", request.method, path, e)
                    return error(path, 502, "the model server did not answer", "api_error")
        out_headers = {k: v for k, v in resp.headers.items()
                       if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding")}
        streamed = resp.headers.get("content-type", "").startswith("text/event-stream")
        label = f"{request.method} {path}" + (f" model={body.get('model')}" if isinstance(body, dict)
                                                and body.get("model") else "")

        if not streamed:
            data = await resp.aread()
            await resp.aclose()
            if schemas and resp.status_code == 200:
                data = _repair_whole(data, api, schemas)
            _log(settings, label, resp.status_code, started, body, data)
            return Response(data, status_code=resp.status_code, headers=out_headers)

        fixer = (AnthropicToolStream if api == "anthropic" else OpenAIToolStream)(schemas) if schemas else None
        seen: list[bytes] = []

        async def relay():
            pending = b""
            try:
                async for part in resp.aiter_raw():
                    if settings.verbose:
                        seen.append(part)
                    if fixer is None:
                        yield part
                        continue
                    events, pending = split_events(pending + part)
                    for event in events:
                        for out in fixer.feed(event):
                            yield out
                if pending:
                    yield pending
            finally:
                await resp.aclose()      # a client that hangs up closes llama-server's stream: it frees the slot

        def done():
            _log(settings, label, resp.status_code, started, body, b"".join(seen), stream=True)

        return StreamingResponse(relay(), status_code=resp.status_code, headers=out_headers,
                                 background=BackgroundTask(_close_then, resp, done))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await client.aclose()

    routes = [Route("/{path:path}", proxy, methods=["GET", "POST", "PUT", "DELETE", "OPTIONS", "HEAD"])]
    return Starlette(routes=routes, lifespan=lifespan)


async def _close_then(resp, done) -> None:
    await resp.aclose()
    done()


def _repair_whole(data: bytes, api: str, schemas: dict) -> bytes:
    try:
        doc = json.loads(data)
    except ValueError:
        return data
    fix = qwen3_coder.repair_anthropic_message if api == "anthropic" else qwen3_coder.repair_openai_message
    if fix(doc, schemas):
        log.warning("a tool call cut off by max_tokens was returned as text")
        return json.dumps(doc, ensure_ascii=False).encode()
    return data


def _log(settings: Settings, label: str, status: int, started: float, body, answer: bytes,
         stream: bool = False) -> None:
    line = f"{label}{' stream' if stream else ''} -> {status} in {time.perf_counter() - started:.2f}s"
    if settings.verbose and isinstance(body, dict):
        line += f" | {summary(body, answer)}"
    log.info(line)
