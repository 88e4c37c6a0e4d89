"""``reamkit serve`` against what clients get wrong or do unexpectedly, on one real server (one slot, the tiny
Qwen3-Coder-style GGUF): malformed requests get 4xx (never 500) in the API's own error shape and the server
keeps answering; only the documented paths are served, whatever their spelling; the private llama-server's key
is on no command line; a client that hangs up on a whole (non-streamed) answer frees its slot at once; CORS
preflights are answered without a key; agent clients' extra fields pass while typos are refused; the openai
SDK's Responses stream helper and Anthropic's ``disable_parallel_tool_use`` work.

llama-server also accepts the key in ``LLAMA_API_KEY`` of its environment, which these tests set so they can
read ``/slots`` on the private port directly."""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import time
import urllib.request

import anthropic
import openai
import psutil
import pytest

from .serving_helpers import KEY, Served, anthropic_tool, tiny_coder_gguf, weather_tool  # noqa: F401

OWNER_KEY = "owner-key-for-the-private-port"
CTX = 8192
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server(tiny_coder_gguf, tmp_path_factory):
    s = Served(tiny_coder_gguf, tmp_path_factory.mktemp("hardening"), parallel=1, ctx=CTX,
               env={"LLAMA_API_KEY": OWNER_KEY})
    yield s
    s.stop()


def _llama(server) -> psutil.Process:
    kids = [c for c in psutil.Process(server.proc.pid).children(recursive=True) if "llama-server" in c.name()]
    assert len(kids) == 1
    return kids[0]


@pytest.fixture(scope="module")
def inner(server) -> str:
    ports = {c.laddr.port for c in _llama(server).net_connections("tcp") if c.status == psutil.CONN_LISTEN}
    assert len(ports) == 1, ports
    return f"http://127.0.0.1:{ports.pop()}"


def _raw(server, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """One request with the path sent exactly as given (no client-side normalisation)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    hdrs = {"Content-Type": "application/json", **server.headers(), **(headers or {})}
    conn.request(method, path, body=body, headers=hdrs)
    resp = conn.getresponse()
    raw = resp.read()
    conn.close()
    try:
        return resp.status, dict(resp.getheaders()), json.loads(raw) if raw else None
    except ValueError:
        return resp.status, dict(resp.getheaders()), raw.decode(errors="replace")


def _get(url: str, key: str | None) -> tuple[int, object]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, None


# ---------------------------------------------------------------- malformed requests

def _tool_turns(call_id: str) -> list:
    return [{"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": call_id, "content": "sunny"}]


def _anthropic_turns(use_id: str) -> list:
    return [{"role": "user", "content": "weather?"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                               "input": {"days": 1, "metric": True}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use_id, "content": "sunny"}]}]


CHAT, MSGS, COUNT = "/v1/chat/completions", "/v1/messages", "/v1/messages/count_tokens"
OK_CHAT = {"model": "m", "messages": HI, "max_tokens": 2}
OK_MSGS = {"model": "m", "messages": HI, "max_tokens": 2}
TOOLS = [weather_tool()]
LONG = [{"role": "user", "content": "hello world " * 6000}]
MALFORMED = {                       # name: (method, path, body, status)
    "empty body": ("POST", CHAT, b"", 400),
    "blank body": ("POST", CHAT, b"  \n", 400),
    "empty body (anthropic)": ("POST", MSGS, b"", 400),
    "empty body (responses)": ("POST", "/v1/responses", b"", 400),
    "malformed json": ("POST", CHAT, b'{"messages": [', 400),
    "malformed json (anthropic)": ("POST", MSGS, b'{"model": "m", ', 400),
    "not utf-8": ("POST", CHAT, b'{"model": "m", "messages": "\xff\xfe"}', 400),
    "not an object": ("POST", CHAT, b"[1, 2]", 400),
    "a bare string": ("POST", CHAT, b'"hi"', 400),
    "lone high surrogate": ("POST", CHAT, b'{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 2}', 400),
    "lone low surrogate": ("POST", MSGS, b'{"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "a\\udc00b"}]}', 400),
    "nested 100000 deep": ("POST", CHAT, b'{"messages": ' + b"[" * 100000 + b"]" * 100000 + b"}", 400),
    "nested 200 deep": ("POST", CHAT, json.dumps({**OK_CHAT, "metadata": json.loads("[" * 200 + "]" * 200)}).encode(), 400),
    "max_tokens 3.5": ("POST", CHAT, {**OK_CHAT, "max_tokens": 3.5}, 400),
    "max_tokens true": ("POST", CHAT, {**OK_CHAT, "max_tokens": True}, 400),
    "max_tokens a string": ("POST", CHAT, {**OK_CHAT, "max_tokens": "lots"}, 400),
    "max_tokens -5": ("POST", CHAT, {**OK_CHAT, "max_tokens": -5}, 400),
    "max_tokens 0": ("POST", CHAT, {**OK_CHAT, "max_tokens": 0}, 400),
    "max_tokens beyond context": ("POST", CHAT, {**OK_CHAT, "max_tokens": 10**9}, 400),
    "max_completion_tokens a float": ("POST", CHAT, {**OK_CHAT, "max_completion_tokens": 1e9}, 400),
    "max_tokens -1 with ignore_eos": ("POST", CHAT, {**OK_CHAT, "max_tokens": -1, "ignore_eos": True}, 400),
    "ignore_eos without a limit": ("POST", CHAT, {"model": "m", "messages": HI, "ignore_eos": True}, 400),
    "messages empty": ("POST", CHAT, {**OK_CHAT, "messages": []}, 400),
    "messages missing": ("POST", CHAT, {"model": "m", "max_tokens": 2}, 400),
    "messages a string": ("POST", CHAT, {**OK_CHAT, "messages": "hi"}, 400),
    "message not an object": ("POST", CHAT, {**OK_CHAT, "messages": [1]}, 400),
    "unknown role": ("POST", CHAT, {**OK_CHAT, "messages": [{"role": "wizard", "content": "x"}]}, 400),
    "tool message for an unknown call id": ("POST", CHAT, {**OK_CHAT, "tools": TOOLS, "messages": _tool_turns("call_9")}, 400),
    "text part not a string": ("POST", CHAT, {**OK_CHAT, "messages": [{"role": "user", "content": [
        {"type": "text", "text": 5}]}]}, 400),
    "earlier call without a name": ("POST", CHAT, {**OK_CHAT, "messages": [*HI, {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"arguments": "{}"}}]}]}, 400),
    "earlier call's arguments not JSON": ("POST", CHAT, {**OK_CHAT, "messages": [*HI, {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "x"}}]}]}, 400),
    "anthropic tool_use input a string": ("POST", MSGS, {**OK_MSGS, "messages": [*HI, {"role": "assistant", "content": [
        {"type": "tool_use", "id": "t", "name": "f", "input": "x"}]}]}, 400),
    "anthropic max_tokens -1": ("POST", MSGS, {**OK_MSGS, "max_tokens": -1}, 400),
    "tool_choice names a missing tool": ("POST", CHAT, {**OK_CHAT, "tools": TOOLS, "tool_choice": {
        "type": "function", "function": {"name": "launch_rocket"}}}, 400),
    "tool_choice required without tools": ("POST", CHAT, {**OK_CHAT, "tool_choice": "required"}, 400),
    "tool without function": ("POST", CHAT, {**OK_CHAT, "tools": [{"type": "function"}]}, 400),
    "tool function without name": ("POST", CHAT, {**OK_CHAT, "tools": [{"type": "function", "function": {
        "parameters": {"type": "object"}}}]}, 400),
    "tool schema of unknown type": ("POST", CHAT, {**OK_CHAT, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "nonsense"}}}]}, 400),
    "tool schema not an object": ("POST", CHAT, {**OK_CHAT, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": "x"}}]}, 400),
    "tool schema with an unresolvable $ref": ("POST", CHAT, {**OK_CHAT, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"a": {"$ref": "#/$defs/gone"}}}}}]}, 400),
    "tool schema with an empty enum": ("POST", MSGS, {**OK_MSGS, "tools": [{"name": "f", "input_schema": {
        "type": "object", "properties": {"a": {"enum": []}}}}]}, 400),
    "tools not a list": ("POST", CHAT, {**OK_CHAT, "tools": {"a": 1}}, 400),
    "tool not an object": ("POST", CHAT, {**OK_CHAT, "tools": [1]}, 400),
    "typo of a known field": ("POST", CHAT, {**OK_CHAT, "max_token": 5}, 400),
    "prompt longer than context": ("POST", CHAT, {**OK_CHAT, "messages": LONG}, 400),
    "10 MB body": ("POST", CHAT, {**OK_CHAT, "messages": [{"role": "user", "content": "x" * 10_000_000}]}, 413),
    "anthropic without max_tokens": ("POST", MSGS, {"model": "m", "messages": HI}, 400),
    "anthropic max_tokens 3.5": ("POST", MSGS, {**OK_MSGS, "max_tokens": 3.5}, 400),
    "anthropic max_tokens beyond context": ("POST", MSGS, {**OK_MSGS, "max_tokens": 50000}, 400),
    "anthropic messages empty": ("POST", MSGS, {**OK_MSGS, "messages": []}, 400),
    "anthropic messages a string": ("POST", MSGS, {**OK_MSGS, "messages": "hi"}, 400),
    "anthropic unknown block type": ("POST", MSGS, {**OK_MSGS, "messages": [{"role": "user", "content": [
        {"type": "foo", "text": "x"}]}]}, 400),
    "anthropic tool_result for an unknown id": ("POST", MSGS, {**OK_MSGS, "tools": [anthropic_tool(weather_tool())],
                                                               "messages": _anthropic_turns("toolu_9")}, 400),
    "anthropic tool_choice names a missing tool": ("POST", MSGS, {**OK_MSGS, "tools": [anthropic_tool(weather_tool())],
                                                                  "tool_choice": {"type": "tool", "name": "nope"}}, 400),
    "anthropic invalid input_schema": ("POST", MSGS, {**OK_MSGS, "tools": [{"name": "f", "input_schema": {
        "type": "object", "properties": {"a": {"type": 5}}}}]}, 400),
    "anthropic prompt longer than context": ("POST", MSGS, {**OK_MSGS, "messages": LONG}, 400),
    "count_tokens messages a string": ("POST", COUNT, {"model": "m", "messages": "hi"}, 400),
    "count_tokens messages empty": ("POST", COUNT, {"model": "m", "messages": []}, 400),
    "completions max_tokens 3.5": ("POST", "/v1/completions", {"model": "m", "prompt": "hi", "max_tokens": 3.5}, 400),
    "native n_predict -2": ("POST", "/completion", {"prompt": "hi", "n_predict": -2}, 400),
    "responses max_output_tokens true": ("POST", "/v1/responses", {"model": "m", "input": "hi",
                                                                   "max_output_tokens": True}, 400),
    # paths: matched after normalisation, validated as their canonical form, nothing else reaches llama-server
    "encoded dot-dot to /props": ("GET", "/v1/models/..%2f..%2fprops", None, 404),
    "dot-dot to /slots": ("GET", "/v1/../slots", None, 404),
    "/props": ("GET", "/props", None, 404),
    "/slots": ("GET", "/slots", None, 404),
    "/metrics": ("GET", "/metrics", None, 404),
    "slot erase": ("POST", "/slots/0?action=erase", b"{}", 404),
    "lora adapters": ("POST", "/lora-adapters", b"[]", 404),
    "double slash skips nothing": ("POST", "//v1/chat/completions", {**OK_CHAT, "max_tokens": 3.5}, 400),
    "dot segment skips nothing": ("POST", "/v1/./chat/completions", {**OK_CHAT, "messages": []}, 400),
    "dot-dot segment skips nothing": ("POST", "/v1/x/../chat/completions", {**OK_CHAT, "max_token": 5}, 400),
    "wrong method": ("GET", CHAT, None, 405),
}


def test_malformed_requests_get_4xx_in_the_api_shape_and_the_server_stays_up(server):
    assert len(MALFORMED) >= 40
    got = {}
    for name, (method, path, body, want) in MALFORMED.items():
        data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
        status, _, answer = _raw(server, method, path, data)
        got[name] = status
        assert isinstance(answer, dict), (name, status, answer)
        if path.split("?")[0].rstrip("/").endswith(("/v1/messages", "/count_tokens")):
            assert answer["type"] == "error" and answer["error"]["message"], (name, answer)    # Anthropic shape
        else:
            assert answer["error"]["message"] and answer["error"]["code"] == status, (name, answer)   # OpenAI's
    wrong = {name: (status, MALFORMED[name][3]) for name, status in got.items() if status != MALFORMED[name][3]}
    assert not wrong, wrong
    assert server.post(CHAT, OK_CHAT)[0] == 200
    assert server.post(MSGS, OK_MSGS)[0] == 200
    assert server.proc.poll() is None
    assert "Traceback" not in server.log


def test_documented_paths_answer_in_any_spelling(server):
    for path in ("//v1/chat/completions", "/v1/./chat/completions", "/v1/x/../chat/completions",
                 "/v1/chat/completions/"):
        status, _, answer = _raw(server, "POST", path, json.dumps(OK_CHAT).encode())
        assert status == 200 and answer["usage"]["completion_tokens"] == 2, (path, answer)
    assert _raw(server, "GET", "//v1/models")[0] == 200


# ---------------------------------------------------------------- the private port's key

def test_inner_key_is_on_no_command_line_and_the_inner_port_needs_it(server, inner):
    llama = _llama(server)
    tree = [psutil.Process(server.proc.pid), *psutil.Process(server.proc.pid).children(recursive=True)]
    cmd = llama.cmdline()
    assert "--api-key" not in cmd
    key_file = cmd[cmd.index("--api-key-file") + 1]
    fd = re.fullmatch(r"/dev/fd/(\d+)", key_file)
    assert fd, key_file                                    # a pipe, not a file on disk
    assert os.readlink(f"/proc/{llama.pid}/fd/{fd[1]}").startswith("pipe:")
    token = re.compile(r"(?:^|=)[A-Za-z0-9_-]{32}$")      # secrets.token_urlsafe(24), alone or as --opt=KEY
    for proc in tree:
        assert not [a for a in proc.cmdline() if token.search(a)], proc.cmdline()
    # without the key, with the user's key or a wrong one, the private port refuses everything but /health
    for key in (None, KEY, "wrong"):
        assert _get(inner + "/v1/models", key)[0] == 401
        assert _get(inner + "/slots", key)[0] == 401
    assert _get(inner + "/health", None)[0] == 200
    assert _get(inner + "/slots", OWNER_KEY)[0] == 200    # LLAMA_API_KEY: the owner's own key works


# ---------------------------------------------------------------- cancellation

def _busy(inner: str) -> bool:
    status, slots = _get(inner + "/slots", OWNER_KEY)
    assert status == 200
    return any(s.get("is_processing") for s in slots)


def test_abandoned_non_streamed_request_frees_its_slot_within_2s(server, inner):
    """The layer closes the upstream request as soon as the client hangs up. llama-server checks a whole
    answer's connection once per second of no results from any task, so /slots is left alone for 1.2 s."""
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "go"}], "max_tokens": 4000,
                       "ignore_eos": True}).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: " + str(len(body)).encode()
                 + b"\r\n\r\n" + body)
    deadline = time.monotonic() + 30
    while not _busy(inner):
        assert time.monotonic() < deadline, "the request never started generating"
        time.sleep(0.05)
    sock.close()                                          # hang up before the answer is whole
    hung_up = time.monotonic()
    time.sleep(1.2)
    while _busy(inner):
        assert time.monotonic() - hung_up < 2.0, "the slot kept generating after the client left"
        time.sleep(0.1)
    print(f"slot idle {time.monotonic() - hung_up:.2f} s after the client hung up")
    log = server.llama_log.read_text(errors="replace")
    used = [int(n) for n in re.findall(r"stop processing: n_tokens = (\d+)", log)]
    assert "cancel task" in log and used[-1] < 4000, used[-3:]      # stopped, not finished
    assert "client went away" in server.log
    assert server.post(CHAT, OK_CHAT)[0] == 200


# ---------------------------------------------------------------- CORS

def test_cors_preflight_needs_no_key_and_reflects_the_origin(server):
    pre = {"Origin": "http://web.example", "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization,content-type"}
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("OPTIONS", CHAT, headers=pre)                # no key: browsers send none on a preflight
    r = conn.getresponse()
    r.read()
    assert r.status == 200
    assert r.getheader("Access-Control-Allow-Origin") == "http://web.example"
    assert r.getheader("Access-Control-Allow-Credentials") == "true"
    assert "POST" in r.getheader("Access-Control-Allow-Methods")
    assert "authorization" in r.getheader("Access-Control-Allow-Headers").lower()
    # the request itself: the origin reflected on the answer, and on a 401 too (a browser can read why)
    status, headers, _ = _raw(server, "POST", CHAT, json.dumps(OK_CHAT).encode(), {"Origin": "http://web.example"})
    assert status == 200 and headers["Access-Control-Allow-Origin"] == "http://web.example"     # llama-server's case
    status, headers, _ = _raw(server, "GET", "/v1/models", None, {"Origin": "http://web.example",
                                                                  "Authorization": "Bearer wrong"})
    assert status == 401 and headers["Access-Control-Allow-Origin"] == "http://web.example"
    status, headers, _ = _raw(server, "GET", "/v1/models")
    assert status == 200 and "access-control-allow-origin" not in {k.lower() for k in headers}


# ---------------------------------------------------------------- fields and clients

def test_agent_extra_field_passes_and_a_typo_is_refused(server):
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    r = oai.responses.create(model="gpt-5-codex", input="hi", max_output_tokens=4,
                             extra_body={"client_metadata": {"originator": "codex_exec"}})
    assert r.status == "completed" and r.usage.output_tokens == 4
    c = oai.chat.completions.create(model="m", messages=HI, max_tokens=2, extra_body={"client_metadata": {"a": 1}})
    assert c.usage.completion_tokens == 2
    with pytest.raises(openai.BadRequestError, match="did you mean 'max_tokens'"):
        oai.chat.completions.create(model="m", messages=HI, extra_body={"max_token": 2})
    claude = anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0, timeout=120)
    with pytest.raises(anthropic.BadRequestError, match="did you mean 'max_tokens'"):
        claude.messages.create(model="m", max_tokens=2, messages=HI, extra_body={"max_token": 2})
    assert "passing unknown field 'client_metadata' through" in server.log


def test_responses_stream_helper_and_the_verbose_log(server):
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    with oai.responses.stream(model="m", input=[{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}],
                              max_output_tokens=12, extra_body={"client_metadata": {"x": "y"}}) as s:
        deltas = [e.delta for e in s if e.type == "response.output_text.delta"]
        final = s.get_final_response()
    assert len(deltas) >= 2 and final.output_text == "".join(deltas)
    assert final.usage.output_tokens == 12
    # the -v request log read the streamed Responses answer (it used to raise on it)
    line = [ln for ln in server.log.splitlines() if "POST /v1/responses" in ln and " stream " in ln][-1]
    assert f'answered: {json.dumps(" ".join(final.output_text.split())[:120], ensure_ascii=False)[:-1]}' in line, line
    assert "AttributeError" not in server.log and "Traceback" not in server.log


TIMER = {"name": "set_timer", "description": "Start a timer", "input_schema": {
    "type": "object", "properties": {"minutes": {"type": "integer", "minimum": 1, "maximum": 9}},
    "required": ["minutes"]}}


@pytest.mark.parametrize("choice, prompt", [({"type": "tool", "name": "set_timer"}, "go"), ({"type": "any"}, "hi")],
                         ids=["named", "any"])
def test_anthropic_disable_parallel_tool_use_gives_one_call(server, choice, prompt):
    """Greedy decoding of the tiny model makes several calls here (the control; "any" ends in a cut-off call,
    returned as text); with disable_parallel_tool_use only the first is answered, whole or streamed."""
    claude = anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0, timeout=120)
    kw = dict(model="m", max_tokens=300, tools=[TIMER], messages=[{"role": "user", "content": prompt}],
              extra_body={"temperature": 0, "top_k": 1})
    control = claude.messages.create(tool_choice=choice, **kw)
    assert [b.type for b in control.content].count("tool_use") >= 2, control.content
    single = {**choice, "disable_parallel_tool_use": True}
    whole = claude.messages.create(tool_choice=single, **kw)
    with claude.messages.stream(tool_choice=single, **kw) as s:
        streamed = s.get_final_message()
    for m in (whole, streamed):
        assert [b.type for b in m.content] == ["tool_use"], m.content
        assert m.content[0].name == "set_timer" and m.stop_reason == "tool_use"
        assert m.content[0].input == control.content[0].input          # the same first call
