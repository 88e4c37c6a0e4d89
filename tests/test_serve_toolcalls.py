"""Qwen3-Coder tool calls: a golden set of model outputs through the served parser, and our own layer's pieces
(binding ``tool_choice``, cut-off calls as text, stream holding) on their own.

The goldens are replayed through the real server: each is sent as the assistant turn to continue, with room for
one more token, so llama-server's Qwen3-Coder parser reads the golden text exactly as it would read the model's.
"""

from __future__ import annotations

import json

import pytest

from reamkit.serving import qwen3_coder
from reamkit.serving.streams import AnthropicToolStream, OpenAIToolStream, split_events

from .serving_helpers import Served, tiny_coder_gguf  # noqa: F401

TOOLS = [
    {"type": "function", "function": {"name": "write_file", "description": "w", "parameters": {
        "type": "object", "properties": {"path": {"type": "string"}, "content": {"type": "string"}},
        "required": ["path", "content"]}}},
    {"type": "function", "function": {"name": "configure", "description": "c", "parameters": {
        "type": "object", "properties": {
            "count": {"type": "integer"}, "ratio": {"type": "number"}, "dry_run": {"type": "boolean"},
            "options": {"type": "object"}, "files": {"type": "array", "items": {"type": "string"}},
            "note": {"type": ["string", "null"]}}, "required": ["count"]}}},
]


def call(name: str, **params: str) -> str:
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


GOLDENS = {
    "single call": (call("write_file", path="a.py", content="print(1)"),
                    "", [("write_file", {"path": "a.py", "content": "print(1)"})]),
    "prose before a call": ("I'll write the file now.\n\n" + call("write_file", path="a.py", content="x = 1"),
                            "I'll write the file now.\n\n", [("write_file", {"path": "a.py", "content": "x = 1"})]),
    "multiple calls": (call("write_file", path="a.py", content="a") + "\n" + call("configure", count="2"),
                       "", [("write_file", {"path": "a.py", "content": "a"}), ("configure", {"count": 2})]),
    "</parameter> inside code": (
        call("write_file", path="gen.py", content="TAG = '</parameter>'\nEND = \"</function></tool_call>\"\n"
                                                  "def f():\n    return '<parameter=x>'"),
        "", [("write_file", {"path": "gen.py", "content": "TAG = '</parameter>'\nEND = \"</function></tool_call>\"\n"
                                                         "def f():\n    return '<parameter=x>'"})]),
    "multi-line code with XML": (
        call("write_file", path="page.html", content="<html>\n  <body>\n    <p>hi</p>\n  </body>\n</html>"),
        "", [("write_file", {"path": "page.html", "content": "<html>\n  <body>\n    <p>hi</p>\n  </body>\n</html>"})]),
    "typed by the schema": (
        call("configure", count="42", ratio="0.25", dry_run="true", options='{"a": [1, 2], "b": null}',
             files='["x.py", "y.py"]', note="null"),
        "", [("configure", {"count": 42, "ratio": 0.25, "dry_run": True, "options": {"a": [1, 2], "b": None},
                            "files": ["x.py", "y.py"], "note": None})]),
    "no call intended (C++ include, a <function word)": (
        "Use `#include <functional>` and call <function> objects.", None, []),
}


@pytest.fixture(scope="module")
def server(tiny_coder_gguf, tmp_path_factory):
    s = Served(tiny_coder_gguf, tmp_path_factory.mktemp("serve-tools"))
    yield s
    s.stop()


@pytest.mark.parametrize("name", list(GOLDENS))
def test_golden_outputs_parse_through_the_server(server, name):
    text, content, calls = GOLDENS[name]
    status, r = server.post("/v1/chat/completions", {
        "messages": [{"role": "user", "content": "go"}, {"role": "assistant", "content": text}],
        "tools": TOOLS, "parallel_tool_calls": True, "max_tokens": 1, "temperature": 0})
    assert status == 200, r
    msg = r["choices"][0]["message"]
    got = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in msg.get("tool_calls") or []]
    assert got == calls
    if content is not None:
        assert msg["content"] == content
    else:   # no call: the text stays content (the model's one extra token follows it)
        assert not got and r["choices"][0]["finish_reason"] != "tool_calls"


def test_call_split_across_stream_chunks(server):
    """A forced call generated token by token arrives in many chunks and is whole when it ends."""
    import urllib.request

    req = urllib.request.Request(server.url + "/v1/chat/completions", data=json.dumps({
        "messages": [{"role": "user", "content": "go"}], "stream": True, "max_tokens": 200, "temperature": 0,
        "tools": [TOOLS[1]], "tool_choice": "required"}).encode(), headers={**server.headers(),
                                                                             "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        raw = r.read()
    events, rest = split_events(raw)
    assert rest == b"" and events[-1] == b"data: [DONE]\n\n"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    deltas = [d for c in chunks if c["choices"] for d in c["choices"][0]["delta"].get("tool_calls") or []]
    args = "".join(d["function"].get("arguments") or "" for d in deltas)
    assert deltas[0]["function"]["name"] == "configure" and len(deltas) > 3
    assert isinstance(json.loads(args)["count"], int)


# ---------------------------------------------------------------- our layer, on its own

def test_rewrite_required_prefills_the_call_and_named_keeps_one_tool():
    body = {"messages": [{"role": "user", "content": "x"}], "tools": TOOLS, "tool_choice": "required"}
    new, has_tools = qwen3_coder.rewrite_tool_choice(body, "openai")
    assert has_tools and new["messages"][-1] == {"role": "assistant", "content": "<tool_call>\n"}
    assert body["messages"][-1]["role"] == "user"                    # the caller's body is not changed
    named = dict(body, tool_choice={"type": "function", "function": {"name": "configure"}})
    new, _ = qwen3_coder.rewrite_tool_choice(named, "openai")
    assert [t["function"]["name"] for t in new["tools"]] == ["configure"] and new["tool_choice"] == "required"
    assert new["messages"][-1]["content"] == "<tool_call>\n<function=configure>\n"
    anth = {"messages": [{"role": "user", "content": "x"}], "tools": [{"name": "a", "input_schema": {}}],
            "tool_choice": {"type": "tool", "name": "a"}}
    new, _ = qwen3_coder.rewrite_tool_choice(anth, "anthropic")
    assert new["tool_choice"] == {"type": "any"} and new["messages"][-1]["content"].endswith("<function=a>\n")
    new, has_tools = qwen3_coder.rewrite_tool_choice(dict(anth, tool_choice={"type": "none"}), "anthropic")
    assert not has_tools and "tools" not in new
    auto = dict(body, tool_choice="auto")
    assert qwen3_coder.rewrite_tool_choice(auto, "openai") == (auto, True)
    prefilled = dict(body, messages=[*body["messages"], {"role": "assistant", "content": "Sure"}])
    assert qwen3_coder.rewrite_tool_choice(prefilled, "openai")[0]["messages"] == prefilled["messages"]


def test_partial_objects_keep_what_is_complete():
    p = qwen3_coder.parse_partial_object
    assert p('{"path": "a.py", "content": "print(') == {"path": "a.py", "content": "print("}
    assert p('{"count": 4') == {"count": 4}
    assert p('{"a": 1, "b": [1, 2') == {"a": 1, "b": [1, 2]}
    assert p('{"a": {"b": 1}, "c": tr') == {"a": {"b": 1}}
    assert p("") == {} and p("{") == {} and p("not json") == {}


def test_cut_off_openai_call_becomes_text():
    resp = {"choices": [{"finish_reason": "length", "message": {"content": "", "tool_calls": [
        {"function": {"name": "write_file", "arguments": '{"path":"a.py","content":"print(1'}}]}}]}
    assert qwen3_coder.repair_openai_message(resp, qwen3_coder.tool_schemas({"tools": TOOLS})) == 1
    msg = resp["choices"][0]["message"]
    assert "tool_calls" not in msg
    assert msg["content"] == ("<tool_call>\n<function=write_file>\n<parameter=path>\na.py\n</parameter>\n"
                              "<parameter=content>\nprint(1\n</parameter>\n")
    whole = {"choices": [{"finish_reason": "tool_calls", "message": {"content": "", "tool_calls": [
        {"function": {"name": "configure", "arguments": '{"count": 1}'}}]}}]}
    assert qwen3_coder.repair_openai_message(whole, qwen3_coder.tool_schemas({"tools": TOOLS})) == 0


def _feed_split(fixer, raw: bytes, step: int) -> bytes:
    out, pending = b"", b""
    for i in range(0, len(raw), step):
        events, pending = split_events(pending + raw[i:i + step])
        for e in events:
            out += b"".join(fixer.feed(e))
    return out + pending


SEPARATORS = (", ", ": ")       # llama-server writes compact JSON (",", ":"); the tests run both


def _oai_chunk(delta=None, finish=None) -> bytes:
    return b"data: " + json.dumps({"id": "c", "model": "m", "choices": [
        {"index": 0, "delta": delta or {}, "finish_reason": finish}]}, separators=SEPARATORS).encode() + b"\n\n"


@pytest.mark.parametrize("step", [1, 2, 7, 10_000])
@pytest.mark.parametrize("compact", [False, True], ids=["spaced", "compact"])
def test_openai_stream_holder_at_every_split(step, compact, monkeypatch):
    monkeypatch.setattr(f"{__name__}.SEPARATORS", (",", ":") if compact else (", ", ": "))
    schemas = qwen3_coder.tool_schemas({"tools": TOOLS})
    first = [_oai_chunk({"tool_calls": [{"index": 0, "id": "a", "function": {"name": "configure", "arguments": ""}}]}),
             _oai_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"count": 3}'}}]})]
    second = [_oai_chunk({"tool_calls": [{"index": 1, "id": "b", "function": {"name": "write_file", "arguments": "{"}}]}),
              _oai_chunk({"tool_calls": [{"index": 1, "function": {"arguments": '"path": "x'}}]})]
    raw = _oai_chunk({"content": "hi "}) + b"".join(first + second) + _oai_chunk(finish="length") + b"data: [DONE]\n\n"
    out = _feed_split(OpenAIToolStream(schemas), raw, step)
    events, _ = split_events(out)
    assert events[0] == _oai_chunk({"content": "hi "}) and events[1:3] == first   # the whole call passes as is
    turned = json.loads(events[3][6:])["choices"][0]["delta"]["content"]
    assert turned == "<tool_call>\n<function=write_file>\n<parameter=path>\nx\n</parameter>\n"
    assert events[4:] == [_oai_chunk(finish="length"), b"data: [DONE]\n\n"]
    # the same stream ending normally passes through byte for byte
    ok = _oai_chunk({"content": "hi "}) + b"".join(first + second) + _oai_chunk(finish="tool_calls") + b"data: [DONE]\n\n"
    assert _feed_split(OpenAIToolStream(schemas), ok, step) == ok


def test_plain_chunks_pass_without_parsing(monkeypatch):
    """llama-server's text chunks (compact JSON, ``"finish_reason":null``) are not parsed; the rest are."""
    from reamkit.serving import streams

    parsed = []
    monkeypatch.setattr(streams, "_data", lambda e, real=streams._data: parsed.append(e) or real(e))
    text = [json.dumps({"choices": [{"finish_reason": None, "index": 0, "delta": {"content": f"w{i} "}}]},
                       separators=(",", ":")).encode() for i in range(50)]
    quoted = json.dumps({"choices": [{"finish_reason": None, "index": 0, "delta": {"content": '"tool_calls" x'}}]},
                        separators=(",", ":")).encode()
    end = json.dumps({"choices": [{"finish_reason": "stop", "index": 0, "delta": {}}]}, separators=(",", ":")).encode()
    events = [b"data: " + t + b"\n\n" for t in [*text, quoted, end]]
    fixer = streams.OpenAIToolStream(qwen3_coder.tool_schemas({"tools": TOOLS}))
    assert [out for e in events for out in fixer.feed(e)] == events
    assert parsed == [events[-1]]       # quotes inside text are escaped: '"tool_calls"' there is no false alarm


def _ev(kind: str, **data) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n".encode()


@pytest.mark.parametrize("step", [1, 5, 10_000])
def test_anthropic_stream_holder_at_every_split(step):
    schemas = qwen3_coder.tool_schemas({"tools": TOOLS})
    tool = [_ev("content_block_start", index=1, content_block={"type": "tool_use", "id": "t", "name": "write_file"}),
            _ev("content_block_delta", index=1, delta={"type": "input_json_delta", "partial_json": '{"path": "a'}),
            _ev("content_block_stop", index=1)]
    head = [_ev("message_start", message={"content": []}),
            _ev("content_block_start", index=0, content_block={"type": "text", "text": ""}),
            _ev("content_block_delta", index=0, delta={"type": "text_delta", "text": "ok"}),
            _ev("content_block_stop", index=0)]
    cut = _ev("message_delta", delta={"stop_reason": "max_tokens"}, usage={"output_tokens": 9})
    raw = b"".join(head + tool) + cut + _ev("message_stop")
    events, _ = split_events(_feed_split(AnthropicToolStream(schemas), raw, step))
    assert events[:4] == head
    kinds = [json.loads(e.split(b"data: ", 1)[1])["type"] for e in events[4:]]
    assert kinds == ["content_block_start", "content_block_delta", "content_block_stop", "message_delta", "message_stop"]
    text = json.loads(events[5].split(b"data: ", 1)[1])["delta"]["text"]
    assert text == "<tool_call>\n<function=write_file>\n<parameter=path>\na\n</parameter>\n"
    whole = raw.replace(b'{\\"path\\": \\"a', b'{\\"path\\": \\"a\\", \\"content\\": \\"b\\"}')
    assert _feed_split(AnthropicToolStream(schemas), whole, step) == whole
