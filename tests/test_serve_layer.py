"""The pieces of ``reamkit serve``'s layer that need no model: request validation, path normalisation, CORS,
the Responses event indices and the ``-v`` log, in front of a stub that records what reaches it."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from starlette.testclient import TestClient

from reamkit.serving.access import allowed_origin, canonical
from reamkit.serving.proxy import Settings, build_app
from reamkit.serving.requestlog import summary
from reamkit.serving.streams import ResponsesStream, split_events
from reamkit.serving.validation import MAX_DEPTH, Invalid, check, parse


class _Stub(BaseHTTPRequestHandler):
    seen: list[tuple[str, str]] = []

    def _answer(self):
        n = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(n)
        self.seen.append((self.command, self.path))
        answer = b'{"ok": true}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    do_GET = do_POST = _answer

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def stub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _client(stub: str, cors: str = "*", key: str | None = None) -> TestClient:
    return TestClient(build_app(Settings(stub, "inner", key, 4096, False, 2**20, cors_origins=cors)))


OK = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def test_paths_reach_the_stub_only_in_canonical_form(stub):
    assert canonical("//v1//chat/completions/") == "/v1/chat/completions"
    assert canonical("/v1/models/../../props") == "/props" and canonical("/../../x") == "/x"
    with _client(stub) as c:
        _Stub.seen.clear()
        for path in ("/v1/chat/completions", "/v1//chat/completions", "/v1/./chat/completions",
                     "/v1/x/../chat/completions", "/v1/chat/completions/"):
            assert c.post(path, json=OK).status_code == 200, path
        assert c.get("/v1/models/..%2f..%2fprops").status_code == 404
        for path in ("/props", "/slots", "/metrics", "/lora-adapters", "/v1/x", "/"):
            assert c.get(path).status_code == 404, path
        assert c.post("/slots/0?action=erase", json={}).status_code == 404
        assert c.get("/v1/chat/completions").status_code == 405
        assert c.get("/v1/models").status_code == 200
    assert _Stub.seen == [("POST", "/v1/chat/completions")] * 5 + [("GET", "/v1/models")]


@pytest.mark.parametrize("body, path, words", [
    (b"", "/v1/chat/completions", "empty"),
    (b'{"a": "\\ud800"}', "/v1/chat/completions", "surrogate"),
    (b'{"a": "\\uDFFF"}', "/v1/chat/completions", "surrogate"),
    (b"[" * 5000 + b"]" * 5000, "/v1/chat/completions", "nested"),
    (json.dumps({"a": json.loads("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1))}).encode(), "/v1/embeddings", "nested"),
])
def test_bodies_llama_server_answers_with_500_are_refused(body, path, words):
    with pytest.raises(Invalid, match=words):
        check(path, parse(body), 4096)


def test_paired_surrogates_and_escaped_backslashes_are_fine():
    assert parse(b'{"a": "\\ud83d\\ude00"}') == {"a": "\U0001F600"}
    assert parse(b'{"a": "\\\\ud800"}') == {"a": "\\ud800"}
    check("/v1/chat/completions", {**OK, "n_predict": 0, "max_tokens": -1}, 4096)    # llama-server's "unlimited"
    check("/v1/messages", {**OK, "tools": [{"type": "web_search_20250305", "name": "web_search"}]}, 4096)


@pytest.mark.parametrize("setting, origin, allowed", [
    ("*", "http://web.example", True), ("*", "", False),
    ("localhost", "http://localhost:3000", True), ("localhost", "http://127.0.0.1", True),
    ("localhost", "http://[::1]:8080", True), ("localhost", "http://localhost.evil.com", False),
    ("localhost", "http://evil.com", False), ("https://a.example,https://b.example", "https://b.example", True),
    ("https://a.example", "https://c.example", False),
])
def test_cors_origins_like_llama_server(stub, setting, origin, allowed):
    assert (allowed_origin(origin, setting) == origin) is allowed
    with _client(stub, setting, key="k") as c:
        pre = c.options("/v1/chat/completions", headers={"Origin": origin, "Access-Control-Request-Method": "POST"})
        assert pre.status_code == 200 and pre.content == b""                   # no key needed, like llama-server
        assert pre.headers.get("access-control-allow-origin") == (origin if allowed else None)
        r = c.get("/v1/models", headers={"Origin": origin, "Authorization": "Bearer k"})
        assert r.status_code == 200 and r.headers.get("access-control-allow-origin") == (origin if allowed else None)


def test_header_names_go_on_the_wire_capitalised_as_llama_server_writes_them(stub):
    """uvicorn writes header names in lower case; the layer's protocol writes ``Access-Control-Allow-Origin``,
    ``Content-Type``, as llama-server does (clients reading headers into a plain dict look that spelling up).
    Only each response's head changes: two pipelined answers, a body that looks like a head, and a streamed
    answer pass byte for byte."""
    import socket
    import time

    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import Response, StreamingResponse
    from starlette.routing import Route

    from reamkit.serving.access import CORS
    from reamkit.serving.wire import CapitalisedHeaders, capitalised

    assert capitalised(b"HTTP/1.1 200 OK\r\nx-request-id: a-b\r\nvary: Origin\r\n\r\n") == \
        b"HTTP/1.1 200 OK\r\nX-Request-Id: a-b\r\nVary: Origin\r\n\r\n"
    head_like = b"HTTP/1.1 200 OK\r\nfoo-bar: 1\r\n\r\n"

    async def plain(request):
        return Response(head_like, headers={"x-custom-name": "v"}, media_type="text/plain")

    async def streamed(request):
        async def chunks():
            yield head_like
        return StreamingResponse(chunks())

    app = CORS(Starlette(routes=[Route("/p", plain, methods=["GET", "POST"]), Route("/s", streamed)]), "*")
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, http=CapitalisedHeaders,
                                           log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.05)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /p HTTP/1.1\r\nHost: x\r\nOrigin: http://web.example\r\n\r\n"
                         b"GET /s HTTP/1.1\r\nHost: x\r\n\r\n"
                         b"OPTIONS /p HTTP/1.1\r\nHost: x\r\nOrigin: http://web.example\r\n"
                         b"Access-Control-Request-Method: POST\r\nConnection: close\r\n\r\n")
            wire = b""
            while chunk := sock.recv(65536):
                wire += chunk
    finally:
        server.should_exit = True
        thread.join(10)
    first, rest = wire.split(b"\r\n\r\n", 1)
    assert b"\r\nAccess-Control-Allow-Origin: http://web.example\r\n" in first + b"\r\n"
    assert b"\r\nContent-Type: " in first and b"\r\nX-Custom-Name: v" in first + b"\r\n"
    assert b"\r\nContent-Length: " in first and b"access-control" not in first
    assert rest.startswith(head_like + b"HTTP/1.1 200 OK\r\n")              # the body as the app wrote it
    second, rest = rest[len(head_like):].split(b"\r\n\r\n", 1)
    assert b"\r\nTransfer-Encoding: chunked" in second
    assert rest.startswith(b"%x\r\n" % len(head_like) + head_like + b"\r\n0\r\n\r\n")
    preflight = rest.split(b"0\r\n\r\n", 1)[1]
    assert b"\r\nAccess-Control-Allow-Methods: GET, POST, DELETE, OPTIONS\r\n" in preflight
    assert b"\r\nAccess-Control-Allow-Credentials: true\r\n" in preflight


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# llama-server's Responses stream (tools/server/server-task.cpp): no output_index / content_index / sequence_number
LLAMA_RESPONSES = [
    ("response.created", {"type": "response.created", "response": {"id": "resp_1", "object": "response",
                                                                    "status": "in_progress"}}),
    ("response.output_item.added", {"type": "response.output_item.added", "item": {
        "content": [], "id": "msg_1", "role": "assistant", "status": "in_progress", "type": "message"}}),
    ("response.content_part.added", {"type": "response.content_part.added", "item_id": "msg_1",
                                     "part": {"type": "output_text", "text": ""}}),
    ("response.output_text.delta", {"type": "response.output_text.delta", "item_id": "msg_1", "delta": "Hel"}),
    ("response.output_text.delta", {"type": "response.output_text.delta", "item_id": "msg_1", "delta": "lo"}),
    ("response.output_item.added", {"type": "response.output_item.added", "item": {
        "id": "fc_x", "arguments": "", "call_id": "call_x", "name": "shell", "type": "function_call",
        "status": "in_progress"}}),
    ("response.function_call_arguments.delta", {"type": "response.function_call_arguments.delta",
                                                "delta": "{}", "item_id": "fc_x"}),
    ("response.output_text.done", {"type": "response.output_text.done", "item_id": "msg_1", "text": "Hello"}),
    ("response.output_item.done", {"type": "response.output_item.done", "item": {
        "type": "message", "status": "completed", "id": "msg_1", "role": "assistant", "content": []}}),
    ("response.output_item.done", {"type": "response.output_item.done", "item": {
        "id": "fc_x", "type": "function_call", "status": "completed", "arguments": "{}", "call_id": "call_x",
        "name": "shell"}}),
]


def _sse(events) -> bytes:
    return b"".join(f"event: {e}\ndata: {json.dumps(d)}\n\n".encode() for e, d in events)


def test_responses_events_get_the_indices_the_openai_sdk_reads():
    fixer = ResponsesStream()
    events, rest = split_events(_sse(LLAMA_RESPONSES))
    assert rest == b""
    out = [json.loads(e.split(b"data: ", 1)[1]) for ev in events for e in fixer.feed(ev)]
    assert [d["sequence_number"] for d in out] == list(range(len(LLAMA_RESPONSES)))
    index = {d["type"] + "/" + str(d.get("item_id") or d.get("item", {}).get("id")): d.get("output_index")
             for d in out}
    assert index["response.output_text.delta/msg_1"] == 0 and index["response.output_item.done/msg_1"] == 0
    assert index["response.function_call_arguments.delta/fc_x"] == 1 and index["response.output_item.done/fc_x"] == 1
    assert all(d["content_index"] == 0 for d in out if "text" in d["type"] or "content_part" in d["type"])
    assert "output_index" not in out[0]


def test_verbose_log_reads_a_codex_request_and_responses_answers():
    codex = {"model": "gpt-5-codex", "instructions": "be brief", "stream": True, "client_metadata": {"a": "b"},
             "input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "fix it"}]}],
             "tools": [{"type": "function", "name": "shell", "parameters": {"type": "object"}}]}
    line = summary(codex, _sse(LLAMA_RESPONSES))
    assert 'asked: "fix it"' in line and 'answered: "Hello[call shell]"' in line
    whole = {"object": "response", "output": [
        {"type": "message", "content": [{"type": "output_text", "text": "Hi there"}]},
        {"type": "function_call", "name": "shell", "arguments": "{}"}]}
    assert 'answered: "Hi there[call shell]"' in summary({"input": "q"}, json.dumps(whole).encode())
    assert summary({"messages": "odd", "input": 3}, b'data: {"delta": "x", "choices": ["y"]}\n\n')   # never raises


RICH = {
    "/v1/chat/completions": {"model": "m", "max_tokens": 2, "tool_choice": {"type": "function", "function": {
        "name": "f"}}, "tools": [{"type": "function", "function": {"name": "f", "parameters": {
            "$schema": "http://json-schema.org/draft-07/schema#", "type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}}}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                     {"role": "assistant", "content": None, "tool_calls": [
                         {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                     {"role": "tool", "tool_call_id": "c1", "content": "ok"}]},
    "/v1/messages": {"model": "m", "max_tokens": 2, "tool_choice": {"type": "tool", "name": "f"},
                     "tools": [{"name": "f", "input_schema": {"type": "object", "properties": {"a": {"type": "string"}}}}],
                     "messages": [{"role": "user", "content": "hi"},
                                  {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f",
                                                                     "input": {"a": "x"}}]},
                                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1",
                                                                "content": "ok"}]}]},
}
ODD = [None, True, -1, 1.5, "x", [], {}, [1, "x"], {"a": [None]}]


def _spots(doc, here=()):
    yield here
    children = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else []
    for k, v in children:
        yield from _spots(v, (*here, k))


def _replaced(doc, spot, value):
    doc = json.loads(json.dumps(doc))
    if not spot:
        return value
    target = doc
    for k in spot[:-1]:
        target = target[k]
    target[spot[-1]] = value
    return doc


@pytest.mark.parametrize("path", sorted(RICH))
def test_no_odd_value_anywhere_in_a_request_gets_a_500(stub, path):
    """Every node of a request with tools, calls and results replaced by each odd value in turn: the layer
    answers 4xx or passes the request on (the stub's 200), never fails itself."""
    with _client(stub) as c:
        assert c.post(path, json=RICH[path]).status_code == 200
        statuses = set()
        for spot in list(_spots(RICH[path])):
            for value in ODD:
                r = c.post(path, json=_replaced(RICH[path], spot, value))
                assert r.status_code in (200, 400), (spot, value, r.status_code, r.text)
                statuses.add(r.status_code)
    assert statuses == {200, 400}
