"""``reamkit serve`` end to end: the real server on 127.0.0.1 with a tiny GGUF, driven by the real ``openai`` and
``anthropic`` client libraries. The tiny model writes gibberish, so tool calls are forced with ``tool_choice``
(which reamkit makes binding) on tools whose arguments the grammar keeps short."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import urllib.request

import anthropic
import openai
import psutil
import pytest

from .serving_helpers import KEY, Served, anthropic_tool, tiny_coder_gguf, weather_tool, write_tool  # noqa: F401


def timer_tool() -> dict:
    return {"type": "function", "function": {
        "name": "set_timer", "description": "Start a timer",
        "parameters": {"type": "object", "properties": {"minutes": {"type": "integer", "minimum": 1, "maximum": 9}},
                       "required": ["minutes"]}}}


@pytest.fixture(scope="module")
def server(tiny_coder_gguf, tmp_path_factory):
    s = Served(tiny_coder_gguf, tmp_path_factory.mktemp("serve"))
    yield s
    s.stop()


@pytest.fixture
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture
def claude(server):
    return anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0, timeout=120)


# ---------------------------------------------------------------- OpenAI

def test_layer_runs_below_llama_server_priority(server, oai):
    """reamkit's HTTP layer (every thread of it, after answering a request) runs at nice 10; llama-server,
    which does the generating, keeps the normal priority."""
    oai.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    layer = psutil.Process(server.proc.pid)
    llama = [c for c in layer.children(recursive=True) if "llama-server" in c.name()]
    assert len(llama) == 1
    nice = lambda proc: {os.getpriority(os.PRIO_PROCESS, t.id) for t in proc.threads()}  # noqa: E731
    assert nice(layer) == {10}
    assert nice(llama[0]) == {0}


def test_openai_models_and_chat_any_model_name(oai):
    models = oai.models.list().data
    assert [m.id for m in models] == ["tiny-coder"]
    r = oai.chat.completions.create(model="gpt-5-whatever", messages=[{"role": "user", "content": "hi"}],
                                    max_tokens=8, temperature=0)
    assert r.model == "tiny-coder"
    assert isinstance(r.choices[0].message.content, str) and r.choices[0].message.content
    assert r.usage.completion_tokens == 8 and r.usage.prompt_tokens > 0
    assert r.choices[0].finish_reason == "length"


def test_openai_streaming_chat_with_usage(oai):
    chunks = list(oai.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}], max_tokens=12,
                                              stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 2   # really streamed
    assert chunks[-1].usage.completion_tokens == 12
    assert any(c.choices and c.choices[0].finish_reason == "length" for c in chunks)


def test_openai_completions(oai):
    r = oai.completions.create(model="x", prompt="def add(a, b):", max_tokens=6)
    assert r.choices[0].text and r.usage.completion_tokens == 6


def test_openai_tool_call_round_trip(oai):
    tools = [weather_tool(), timer_tool()]
    msgs = [{"role": "user", "content": "Weather in Paris for a few days?"}]
    r = oai.chat.completions.create(model="x", messages=msgs, tools=tools, tool_choice="required", max_tokens=200,
                                    temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    assert isinstance(args["days"], int) and 1 <= args["days"] <= 7        # typed by the schema
    assert isinstance(args["metric"], bool)
    msgs += [choice.message.model_dump(exclude_none=True),
             {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    r2 = oai.chat.completions.create(model="x", messages=msgs, tools=tools, max_tokens=8, temperature=0)
    assert r2.choices[0].message.content is not None
    assert r2.usage.prompt_tokens > r.usage.prompt_tokens    # the call and its result went back into the prompt


def test_openai_named_tool_choice_is_binding(oai):
    r = oai.chat.completions.create(model="x", messages=[{"role": "user", "content": "time it"}],
                                    tools=[weather_tool(), timer_tool()], max_tokens=120, temperature=0,
                                    tool_choice={"type": "function", "function": {"name": "set_timer"}})
    calls = r.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["set_timer"]
    assert 1 <= json.loads(calls[0].function.arguments)["minutes"] <= 9


def test_openai_streamed_tool_call_reassembles(oai):
    stream = oai.chat.completions.create(model="x", messages=[{"role": "user", "content": "weather?"}],
                                         tools=[weather_tool()], tool_choice="required", max_tokens=200, stream=True,
                                         temperature=0)
    name, args, finish = "", "", None
    for chunk in stream:
        if not chunk.choices:
            continue
        for d in chunk.choices[0].delta.tool_calls or []:
            name += d.function.name or ""
            args += d.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert name == "get_weather" and finish == "tool_calls"
    assert set(json.loads(args)) == {"days", "metric"}


def test_cut_off_call_comes_back_as_text(oai):
    """max_tokens ends the call inside a string argument: no half call to execute, the text is kept."""
    for stream in (False, True):
        kw = dict(model="x", messages=[{"role": "user", "content": "write it"}], tools=[write_tool()],
                  tool_choice="required", max_tokens=30, temperature=0)
        if stream:
            chunks = list(oai.chat.completions.create(stream=True, **kw))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            calls = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        else:
            r = oai.chat.completions.create(**kw)
            text, calls, finish = r.choices[0].message.content, r.choices[0].message.tool_calls, [r.choices[0].finish_reason]
        assert not calls, stream
        assert text.startswith("<tool_call>\n<function=write_file>\n<parameter="), (stream, text)
        assert finish == ["length"]


# ---------------------------------------------------------------- Anthropic

def test_anthropic_messages_any_model_name(claude):
    m = claude.messages.create(model="claude-haiku-4-5", max_tokens=8, system="be brief",
                               messages=[{"role": "user", "content": "hi"}])
    assert m.content[0].type == "text" and m.content[0].text
    assert m.stop_reason == "max_tokens" and m.usage.output_tokens == 8 and m.usage.input_tokens > 0


def test_anthropic_bearer_token_too(server):
    c = anthropic.Anthropic(base_url=server.url, auth_token=KEY, max_retries=0)
    assert c.messages.create(model="claude-sonnet-4", max_tokens=4,
                             messages=[{"role": "user", "content": "hi"}]).content
    assert c.messages.count_tokens(model="m", messages=[{"role": "user", "content": "hi"}]).input_tokens > 0


def test_anthropic_stream_event_sequence(server, claude):
    with claude.messages.stream(model="claude-sonnet-4", max_tokens=10,
                                messages=[{"role": "user", "content": "hi"}]) as s:
        events = [e.type for e in s if e.type in ("message_start", "content_block_start", "content_block_delta",
                                                   "content_block_stop", "message_delta", "message_stop")]
        final = s.get_final_message()
    assert events[0] == "message_start" and events[1] == "content_block_start"
    assert events[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert events.count("content_block_delta") >= 2
    assert final.content[0].text and final.usage.output_tokens == 10


def test_anthropic_tool_use_round_trip(claude):
    tools = [anthropic_tool(weather_tool()), anthropic_tool(timer_tool())]
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    m = claude.messages.create(model="claude-opus-4", max_tokens=200, tools=tools, tool_choice={"type": "any"},
                               messages=msgs, extra_body={"temperature": 0})
    uses = [b for b in m.content if b.type == "tool_use"]
    assert m.stop_reason == "tool_use" and uses[0].name == "get_weather"
    assert isinstance(uses[0].input["days"], int) and isinstance(uses[0].input["metric"], bool)
    msgs += [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in m.content]},
             {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id, "content": "sunny"},
                                          {"type": "text", "text": "and tomorrow?"}]}]
    m2 = claude.messages.create(model="claude-opus-4", max_tokens=8, tools=tools, messages=msgs, extra_body={"temperature": 0})
    seen = lambda u: u.input_tokens + (u.cache_read_input_tokens or 0)   # noqa: E731
    assert m2.content and seen(m2.usage) > seen(m.usage)


def test_anthropic_streamed_tool_use_and_named_choice(claude):
    tools = [anthropic_tool(weather_tool()), anthropic_tool(timer_tool())]
    with claude.messages.stream(model="claude-opus-4", max_tokens=200, tools=tools,
                                tool_choice={"type": "tool", "name": "set_timer"}, extra_body={"temperature": 0},
                                messages=[{"role": "user", "content": "timer"}]) as s:
        final = s.get_final_message()
    uses = [b for b in final.content if b.type == "tool_use"]
    assert uses and {u.name for u in uses} == {"set_timer"} and 1 <= uses[0].input["minutes"] <= 9
    assert final.stop_reason == "tool_use"


def test_anthropic_cut_off_call_comes_back_as_text(claude):
    tools = [anthropic_tool(write_tool())]
    kw = dict(model="m", max_tokens=30, tools=tools, tool_choice={"type": "any"}, extra_body={"temperature": 0},
              messages=[{"role": "user", "content": "write"}])
    whole = claude.messages.create(**kw)
    with claude.messages.stream(**kw) as s:
        streamed = s.get_final_message()
    for m in (whole, streamed):
        assert [b.type for b in m.content] == ["text"], m
        assert m.content[0].text.startswith("<tool_call>\n<function=write_file>\n")
        assert m.stop_reason == "max_tokens"


# ---------------------------------------------------------------- auth and bind

ENDPOINTS = [("GET", "/v1/models"), ("GET", "/models"), ("GET", "/props"), ("GET", "/metrics"), ("GET", "/slots"),
             ("POST", "/v1/chat/completions"), ("POST", "/chat/completions"), ("POST", "/v1/completions"),
             ("POST", "/completion"), ("POST", "/v1/messages"), ("POST", "/v1/messages/count_tokens"),
             ("POST", "/v1/responses"), ("POST", "/v1/embeddings"), ("POST", "/tokenize"), ("POST", "/detokenize"),
             ("POST", "/apply-template"), ("POST", "/infill"), ("POST", "/v1/chat/completions/input_tokens"),
             ("GET", "/no-such-path")]
BODY = json.dumps({"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}],
                   "prompt": "hi", "content": "hi", "tokens": [1], "input": "hi"}).encode()


def _status(url, method, headers):
    req = urllib.request.Request(url, data=BODY if method == "POST" else None, method=method,
                                 headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"x-api-key": "wrong"},
                                     {"Authorization": f"Basic {KEY}"}, {"x-api-key": KEY[:-1]}],
                         ids=["none", "bearer-wrong", "x-api-key-wrong", "basic", "prefix"])
def test_every_endpoint_refuses_missing_or_wrong_key(server, headers):
    refused = {path: _status(server.url + path, m, headers) for m, path in ENDPOINTS}
    assert set(refused.values()) == {401}, refused
    assert _status(server.url + "/health", "GET", headers) == 200      # health stays public


def test_right_key_in_either_header(server):
    assert _status(server.url + "/v1/models", "GET", {"x-api-key": KEY}) == 200
    assert _status(server.url + "/v1/models", "GET", {"Authorization": f"Bearer {KEY}"}) == 200


def test_binds_loopback_and_llama_server_is_private(server):
    proc = psutil.Process(server.proc.pid)
    listening = {(c.laddr.ip, c.laddr.port) for p in [proc, *proc.children(recursive=True)]
                 for c in p.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
    assert ("127.0.0.1", server.port) in listening
    assert all(ip == "127.0.0.1" for ip, _ in listening), listening
    inner = [port for ip, port in listening if port != server.port]
    assert inner, listening
    # the llama-server port is behind its own random key: the user's key does not open it
    assert _status(f"http://127.0.0.1:{inner[0]}/v1/models", "GET", {"Authorization": f"Bearer {KEY}"}) == 401


# ---------------------------------------------------------------- bad requests

def test_bad_requests_get_4xx_and_server_stays_up(server):
    ok_msgs = [{"role": "user", "content": "hi"}]
    cases = {
        "malformed json": ("/v1/chat/completions", b'{"messages": [', 400),
        "malformed json (anthropic)": ("/v1/messages", b'{"model": "m", ', 400),
        "not an object": ("/v1/chat/completions", b'[1, 2]', 400),
        "unknown role": ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400),
        "unknown content type": ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "foo"}]}]}, 400),
        "unknown block type (anthropic)": ("/v1/messages", {"model": "m", "max_tokens": 2, "messages": [
            {"role": "user", "content": [{"type": "foo", "text": "x"}]}]}, 400),
        "messages not a list (anthropic)": ("/v1/messages", {"model": "m", "max_tokens": 2, "messages": "hi"}, 400),
        "wrong type": ("/v1/chat/completions", {"messages": ok_msgs, "max_tokens": "lots"}, 400),
        "max_tokens beyond context": ("/v1/chat/completions", {"messages": ok_msgs, "max_tokens": 10**9}, 400),
        "max_tokens beyond context (anthropic)": ("/v1/messages", {"model": "m", "messages": ok_msgs, "max_tokens": 5000}, 400),
        "prompt longer than context": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello world " * 3000}], "max_tokens": 2}, 400),
        "prompt longer than context (anthropic)": ("/v1/messages", {"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "hello world " * 3000}]}, 400),
        "10 MB body": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 10_000_000}], "max_tokens": 2}, 413),
    }
    got = {}
    for name, (path, body, want) in cases.items():
        status, answer = server.post(path, body)
        got[name] = status
        assert status == want, (name, status, answer)
        assert answer["error"]["message"], (name, answer)      # OpenAI and Anthropic shapes both have it
        if path == "/v1/messages" and status != 400 or name.startswith("max_tokens") and "anthropic" in name:
            assert answer["type"] == "error", (name, answer)     # our own refusals use the Anthropic shape
    assert server.post("/v1/chat/completions", {"messages": ok_msgs, "max_tokens": 2})[0] == 200
    assert server.proc.poll() is None


UNKNOWN_FIELD = {
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    "/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    "/v1/chat/completions/input_tokens": {"messages": [{"role": "user", "content": "hi"}]},
    "/v1/completions": {"prompt": "hi", "max_tokens": 2},
    "/v1/responses": {"input": "hi", "max_output_tokens": 2},
    "/v1/embeddings": {"input": "hi"},
    "/v1/messages": {"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]},
    "/v1/messages/count_tokens": {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
}


TYPO = {"/v1/responses": "max_output_token", "/v1/embeddings": "dimension", "/v1/messages/count_tokens": "mesages"}


def test_each_endpoint_refuses_a_typo_passes_a_foreign_field_and_stays_up(server, oai, claude):
    for path, body in UNKNOWN_FIELD.items():
        typo = TYPO.get(path, "max_token")
        status, answer = server.post(path, {**body, typo: 2})
        assert status == 400, (path, status, answer)
        assert f"'{typo}'" in answer["error"]["message"] and "did you mean" in answer["error"]["message"], answer
        assert "--allow-unknown-fields" in answer["error"]["message"]
        assert (answer.get("type") == "error") == path.startswith("/v1/messages"), (path, answer)
        status, answer = server.post(path, {**body, "x_made_up_option": True})
        assert status == (501 if path == "/v1/embeddings" else 200), (path, status, answer)   # passed on
    with pytest.raises(openai.BadRequestError, match="did you mean 'repeat_penalty'"):
        oai.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                    extra_body={"repetition_penalty": 1.1})
    with pytest.raises(anthropic.BadRequestError, match="did you mean 'max_tokens'"):
        claude.messages.create(model="m", max_tokens=2, messages=[{"role": "user", "content": "hi"}],
                               extra_body={"max_token": 1})
    assert "passing unknown field 'x_made_up_option' through" in server.log
    assert server.proc.poll() is None
    assert oai.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}], max_tokens=2).choices


def test_strict_fields_refuses_every_unknown_field(tiny_coder_gguf, tmp_path):
    s = Served(tiny_coder_gguf, tmp_path, "--strict-fields", parallel=1)
    try:
        status, answer = s.post("/v1/chat/completions", {**UNKNOWN_FIELD["/v1/chat/completions"], "x_made_up_option": 1})
        assert status == 400 and "'x_made_up_option'" in answer["error"]["message"], answer
        assert "--strict-fields" in answer["error"]["message"]
        status, answer = s.post("/v1/chat/completions", UNKNOWN_FIELD["/v1/chat/completions"])
        assert status == 200 and answer["usage"]["completion_tokens"] == 2, answer
    finally:
        s.stop()


def test_fields_real_clients_send_are_accepted(oai, claude):
    """API fields llama-server has no use for (metadata, store, user, ...) and its own sampling extensions."""
    r = oai.chat.completions.create(
        model="x", messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        max_completion_tokens=3, temperature=0, top_p=0.9, seed=1, stop=["\n\n"], frequency_penalty=0.1,
        presence_penalty=0.1, logit_bias={"5": 1}, user="u1", metadata={"k": "v"}, store=False, n=1,
        parallel_tool_calls=False, response_format={"type": "text"}, service_tier="auto", prompt_cache_key="c",
        safety_identifier="s", stream=False,
        extra_body={"top_k": 20, "min_p": 0.05, "repeat_penalty": 1.05, "cache_prompt": True,
                    "chat_template_kwargs": {}})
    assert r.usage.completion_tokens == 3
    assert oai.completions.create(model="x", prompt="def f():", max_tokens=2, seed=1, user="u", n=1,
                                  extra_body={"top_k": 1, "ignore_eos": True}).usage.completion_tokens == 2
    m = claude.messages.create(model="claude-sonnet-4", max_tokens=3, metadata={"user_id": "u1"},
                               system=[{"type": "text", "text": "be brief", "cache_control": {"type": "ephemeral"}}],
                               stop_sequences=["\n\n\n"], service_tier="auto",
                               messages=[{"role": "user", "content": "hi"}],
                               extra_body={"temperature": 0, "top_k": 20, "top_p": 0.9})
    assert m.usage.output_tokens == 3
    assert claude.messages.count_tokens(model="m", system="be brief",
                                        messages=[{"role": "user", "content": "hi"}]).input_tokens > 0


def test_refusals_are_answered_before_the_key_check_would_leak_nothing(server):
    """Without a key even a malformed or oversized request gets 401, not a hint about its content."""
    status, _ = server.post("/v1/chat/completions", b'{"messages": [', headers={"Authorization": "Bearer nope"})
    assert status == 401


# ---------------------------------------------------------------- shutdown

def test_sigterm_stops_server_and_llama_server(tiny_coder_gguf, tmp_path):
    s = Served(tiny_coder_gguf, tmp_path, key=None)
    try:
        children = psutil.Process(s.proc.pid).children(recursive=True)
        assert any("llama-server" in c.name() for c in children)
        os.kill(s.proc.pid, signal.SIGTERM)
        assert s.proc.wait(30) == 0
        gone, alive = psutil.wait_procs(children, timeout=20)
        assert not alive
    finally:
        s.stop()


def test_sigterm_with_answers_in_flight_exits_at_once(tiny_coder_gguf, tmp_path):
    """SIGTERM while two answers (one streamed, one whole) are asked for 4000 tokens each: reamkit serve gives
    them half a second, not the whole generation, and stops llama-server, whose own SIGTERM handler can block
    while it generates (then a second SIGTERM ends it): exit code 0 within a few seconds, no process left."""
    s = Served(tiny_coder_gguf, tmp_path, key=None, ctx=8192)
    socks = []
    try:
        children = psutil.Process(s.proc.pid).children(recursive=True)
        for stream in (True, False):
            body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "go"}], "max_tokens": 4000,
                               "ignore_eos": True, "stream": stream}).encode()
            sock = socket.create_connection(("127.0.0.1", s.port))
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            socks.append(sock)
        got = b""
        while got.count(b"data: ") < 3:                   # the stream is generating
            got += socks[0].recv(4096)
        start = time.monotonic()
        os.kill(s.proc.pid, signal.SIGTERM)
        assert s.proc.wait(30) == 0
        took = time.monotonic() - start
        gone, alive = psutil.wait_procs(children, timeout=5)
        assert not alive
        while chunk := socks[0].recv(65536):
            got += chunk
        assert b"[DONE]" not in got                       # the stream was cut short, not waited for
        print(f"reamkit serve exited {took:.2f} s after SIGTERM with 2 answers in flight")
        assert took < 8, f"exit took {took:.1f} s"        # (waiting for either: 10-17 s on 2 busy cores)
    finally:
        for sock in socks:
            sock.close()
        s.stop()
