"""The thin HTTP layer in front of llama-server, for what it does not do right by itself.

Each piece exists because a test against the pinned llama-server showed the gap:

* Only the documented endpoints are served, matched after path normalisation; API keys are compared in
  constant time, before anything else, on every path but ``/health``; CORS as llama-server does it
  (:mod:`.access`). llama-server itself listens on a private loopback port behind a random key of its own.
* A body over the size cap gets 413 before it is read whole; anything else the client got wrong gets 400
  (:mod:`.validation`; llama-server answers some with 500, accepts others silently). Errors use the OpenAI
  shape, or the Anthropic shape on ``/v1/messages``.
* Top-level fields an endpoint does not know: likely typos get 400 with the likely name, the rest pass
  through with a warning logged once (:mod:`.fields`).
* A client that hangs up before a whole (non-streamed) answer is ready closes the upstream request, which
  stops its generation; streamed answers stop the same way.
* Qwen3-Coder tool calls: binding ``tool_choice`` and cut-off calls returned as text (:mod:`.qwen3_coder`);
  Anthropic ``disable_parallel_tool_use`` (dropped by llama-server's conversion) keeps the first call only.
* ``/v1/responses`` streams get the event indices the openai SDK's helpers read (:mod:`.streams`).

Everything else (``/v1/models``, completions, streaming, usage, the Anthropic conversion, tool-call parsing
and typing) is llama-server's, passed through byte for byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time

import httpx2 as httpx
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from . import qwen3_coder
from .access import CORS, PUBLIC, SERVED, authorized, canonical
from .fields import refusal, to_refuse, unknown_fields
from .requestlog import summary
from .streams import AnthropicToolStream, OpenAIToolStream, ResponsesStream, split_events
from .validation import ANTHROPIC, CHAT, Invalid, check, parse

log = logging.getLogger("reamkit.serve")
HOP_HEADERS = {"host", "content-length", "authorization", "x-api-key", "connection", "transfer-encoding",
               "accept-encoding", "keep-alive", "upgrade", "origin"}
RESPONSES = {"/v1/responses", "/responses"}
CLIENT_FAULTS = re.compile(rb'"message": ?"(JSON schema error|Failed to parse messages)')


class Settings:
    def __init__(self, upstream: str, upstream_key: str, api_key: str | None, n_ctx: int,
                 qwen3_coder_tools: bool, max_body: int, verbose: bool = False, keepalive: int = 4,
                 field_policy: str = "typos", cors_origins: str = "*"):
        self.upstream, self.upstream_key, self.api_key = upstream, upstream_key, api_key
        self.n_ctx, self.qwen3_coder_tools, self.max_body, self.verbose = n_ctx, qwen3_coder_tools, max_body, verbose
        self.keepalive, self.field_policy, self.cors_origins = keepalive, field_policy, cors_origins


def error(path: str, status: int, message: str, kind: str = "invalid_request_error",
          param: str | None = None) -> JSONResponse:
    if path in ANTHROPIC:
        body = {"type": "error", "error": {"type": kind, "message": message}}
    else:
        body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status)


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
        path = canonical(request.scope["path"])      # decoded (%2f is a slash), without the query
        if settings.api_key and path not in PUBLIC and not authorized(request, settings.api_key):
            log.warning("%s %s -> 401 (missing or wrong API key)", request.method, path)
            return error(path, 401, "invalid or missing API key", "authentication_error")
        if path not in SERVED:
            return error(path, 404, f"{path} is not an endpoint of reamkit serve", "not_found_error")
        if request.method not in SERVED[path]:
            return error(path, 405, f"{path} takes {', '.join(sorted(SERVED[path]))}, not {request.method}",
                         "invalid_request_error")
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

        body, api, schemas, single = None, None, {}, False
        if request.method == "POST":
            try:
                body = parse(raw)
                check(path, body, settings.n_ctx)
            except Invalid as e:
                log.warning("%s %s -> 400 (%s)", request.method, path, e)
                return error(path, 400, str(e), param=e.param)
            unknown = unknown_fields(path, body)
            refused = to_refuse(path, unknown, settings.field_policy)
            if refused:
                log.warning("%s %s -> 400 (unknown fields: %s)", request.method, path, ", ".join(refused))
                return error(path, 400, refusal(path, refused, settings.field_policy), param=refused[0])
            for name in unknown:
                if (path, name) not in passed:
                    passed.add((path, name))
                    log.warning("%s: passing unknown field %r through to llama-server", path, name)
            api = "anthropic" if path == "/v1/messages" else "openai" if path in CHAT else None
            choice = body.get("tool_choice")
            single = api == "anthropic" and isinstance(choice, dict) and choice.get("disable_parallel_tool_use") is True
            if api and settings.qwen3_coder_tools:
                new, has_tools = qwen3_coder.rewrite_tool_choice(body, api)
                if has_tools:
                    schemas = qwen3_coder.tool_schemas(new)
                if new is not body:
                    body, raw = new, json.dumps(new).encode()

        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        headers["authorization"] = f"Bearer {settings.upstream_key}"
        label = f"{request.method} {path}" + (f" model={body.get('model')}" if isinstance(body, dict)
                                                and body.get("model") else "")
        sent = asyncio.ensure_future(_send(client, request, path, headers, raw, llama_alive))
        gone = asyncio.ensure_future(_disconnected(request))
        await asyncio.wait({sent, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not sent.done():
            sent.cancel()         # closes the connection to llama-server, which stops the generation
            log.info("%s -> client went away after %.2fs; its request was cancelled", label,
                     time.perf_counter() - started)
            return Response(status_code=499)
        gone.cancel()        # from here on Starlette watches the connection (and stops a stream's relay)
        resp, data = sent.result()
        if resp is None:
            log.error("%s %s -> 502 (llama-server did not answer: %s)", request.method, path, data)
            return error(path, 502, "the model server did not answer", "api_error")
        out_headers = {k: v for k, v in resp.headers.items()
                       if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding")}

        if data is not None:
            status = resp.status_code
            if (schemas or single) and status == 200:
                data = _repair_whole(data, api, schemas, single)
            elif status == 500 and CLIENT_FAULTS.search(data):
                # messages llama-server could not read (a text part that is not a string, ...) or a tool schema
                # that passes the meta-schema but that it cannot make a grammar of (an unresolvable $ref, an
                # empty enum): the client's fault
                return error(path, 400, json.loads(data)["error"]["message"])
            elif path in ANTHROPIC and status >= 400:
                data = _anthropic_error(data, status)
            _log(settings, label, status, started, body, data)
            return Response(data, status_code=status, headers=out_headers)

        if api == "anthropic" and (schemas or single):
            fixer = AnthropicToolStream(schemas, single)
        elif schemas:
            fixer = OpenAIToolStream(schemas)
        else:
            fixer = ResponsesStream() if path in RESPONSES else None
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

    routes = [Route("/{path:path}", proxy, methods=["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])]
    return CORS(Starlette(routes=routes, lifespan=lifespan), settings.cors_origins)


async def _send(client, request: Request, path: str, headers: dict, raw: bytes, llama_alive):
    """The upstream answer and, unless it is an event stream, its whole body; (None, the error) if
    llama-server did not answer."""
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
                return None, e
    if resp.headers.get("content-type", "").startswith("text/event-stream"):
        return resp, None
    try:
        return resp, await resp.aread()
    except httpx.HTTPError as e:          # llama-server went away mid-answer
        return None, e
    finally:
        await resp.aclose()


async def _disconnected(request: Request) -> None:
    """Returns once the client has hung up (the body is already read: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _close_then(resp, done) -> None:
    await resp.aclose()
    done()


def _repair_whole(data: bytes, api: str, schemas: dict, single: bool) -> bytes:
    try:
        doc = json.loads(data)
    except ValueError:
        return data
    fix = qwen3_coder.repair_anthropic_message if api == "anthropic" else qwen3_coder.repair_openai_message
    turned = fix(doc, schemas) if schemas else 0
    if turned:
        log.warning("a tool call cut off by max_tokens was returned as text")
    if single and qwen3_coder.first_call_only(doc) or turned:
        return json.dumps(doc, ensure_ascii=False).encode()
    return data


def _anthropic_error(data: bytes, status: int) -> bytes:
    """llama-server's own errors on the Messages endpoints come in the OpenAI shape: give them Anthropic's."""
    try:
        doc = json.loads(data)
        err = doc["error"]
        message = err["message"]
    except (ValueError, KeyError, TypeError):
        return data
    if doc.get("type") == "error":
        return data
    kind = {401: "authentication_error", 404: "not_found_error", 413: "request_too_large",
            429: "rate_limit_error", 503: "overloaded_error"}.get(status)
    kind = kind or ("invalid_request_error" if status < 500 else "api_error")
    return json.dumps({"type": "error", "error": {"type": kind, "message": message}}).encode()


def _log(settings: Settings, label: str, status: int, started: float, body, answer: bytes,
         stream: bool = False) -> None:
    line = f"{label}{' stream' if stream else ''} -> {status} in {time.perf_counter() - started:.2f}s"
    if settings.verbose and isinstance(body, dict):
        try:
            line += f" | {summary(body, answer)}"
        except Exception as e:  # noqa: BLE001   the log line must never cost the client its answer
            line += f" | (not summarised: {type(e).__name__}: {e})"
    log.info(line)
