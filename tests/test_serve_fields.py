"""The unknown-field policy of ``reamkit serve`` without a model: the lists of known fields cover every request
field the pinned ``openai`` / ``anthropic`` SDKs define and every field Claude Code was seen to send. By default
a likely typo of a known field gets 400 with "did you mean" and never reaches llama-server, while any other
unknown field (Codex's ``client_metadata``) passes through verbatim, logged once; ``--strict-fields`` refuses
every unknown field, ``--allow-unknown-fields`` passes every one. llama-server is replaced by a recording stub."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from starlette.testclient import TestClient

from reamkit.serving.fields import ALLOWED, likely_meant, refusal, to_refuse, unknown_fields
from reamkit.serving.proxy import Settings, build_app


def _sdk_fields(*typed_dicts) -> set[str]:
    return set().union(*(set(t.__required_keys__) | set(t.__optional_keys__) for t in typed_dicts))


def _sdk_request_types() -> dict[str, set[str]]:
    from anthropic.types import message_count_tokens_params as count, message_create_params as msg
    from anthropic.types.beta import message_count_tokens_params as bcount, message_create_params as bmsg
    from openai.types import completion_create_params as compl, embedding_create_params as emb
    from openai.types.chat import completion_create_params as chat
    from openai.types.responses import input_token_count_params as rtok, response_create_params as resp

    return {
        "/v1/chat/completions": _sdk_fields(chat.CompletionCreateParamsStreaming,
                                            chat.CompletionCreateParamsNonStreaming),
        "/v1/completions": _sdk_fields(compl.CompletionCreateParamsStreaming, compl.CompletionCreateParamsNonStreaming),
        "/v1/responses": _sdk_fields(resp.ResponseCreateParamsStreaming, resp.ResponseCreateParamsNonStreaming),
        "/v1/responses/input_tokens": _sdk_fields(rtok.InputTokenCountParams),
        "/v1/embeddings": _sdk_fields(emb.EmbeddingCreateParams),
        "/v1/messages": _sdk_fields(msg.MessageCreateParamsStreaming, msg.MessageCreateParamsNonStreaming,
                                    bmsg.MessageCreateParamsStreaming, bmsg.MessageCreateParamsNonStreaming),
        "/v1/messages/count_tokens": _sdk_fields(count.MessageCountTokensParams, bcount.MessageCountTokensParams),
    }


# What Claude Code 2.1.328 sends on /v1/messages (the `fields:` of its request in the `reamkit serve -v` log).
CLAUDE_CODE_FIELDS = {"model", "messages", "system", "tools", "metadata", "max_tokens", "thinking",
                      "context_management", "output_config", "stream"}


@pytest.mark.parametrize("path", sorted(_sdk_request_types()))
def test_every_sdk_request_field_is_accepted(path):
    defined = _sdk_request_types()[path]
    assert len(defined) >= 5, defined                       # the SDK types were really read
    body = dict.fromkeys(sorted(defined), None)
    assert unknown_fields(path, body) == [], path


def test_claude_code_and_llama_server_fields_are_accepted():
    assert unknown_fields("/v1/messages", dict.fromkeys(CLAUDE_CODE_FIELDS | {"temperature", "top_k"})) == []
    llama = {"top_k", "min_p", "repeat_penalty", "cache_prompt", "n_predict", "ignore_eos", "samplers",
             "chat_template_kwargs", "reasoning_format", "json_schema", "grammar", "n_probs", "id_slot"}
    assert unknown_fields("/v1/chat/completions", dict.fromkeys(llama)) == []
    assert unknown_fields("/v1/completions", dict.fromkeys(llama - {"chat_template_kwargs", "reasoning_format"})) == []


def test_unknown_and_server_internal_fields_are_named():
    body = {"model": "m", "messages": [], "x_made_up": 1, "chat_parser": "...", "grammar_triggers": []}
    assert unknown_fields("/v1/chat/completions", body) == ["x_made_up", "chat_parser", "grammar_triggers"]
    # llama-server's Anthropic conversion drops its own sampling fields: refused there, with the reason
    assert unknown_fields("/v1/messages", {"model": "m", "min_p": 0.1}) == ["min_p"]
    assert "takes 'min_p' on /v1/chat/completions but ignores it on /v1/messages" in refusal("/v1/messages", ["min_p"])
    # llama-server's native endpoints are its own API: not checked
    assert unknown_fields("/completion", {"x_made_up": 1}) == []


def test_refusal_names_the_field_a_fix_and_the_opt_out():
    line = refusal("/v1/chat/completions", ["repetition_penalty", "b", "c"])
    assert line.startswith("unknown field 'repetition_penalty' in the request body (and 2 more: b, c)")
    assert "did you mean 'repeat_penalty'?" in line and "--allow-unknown-fields" in line and "\n" not in line
    assert "did you mean" not in refusal("/v1/chat/completions", ["x_made_up"], "strict")
    assert "without --strict-fields" in refusal("/v1/chat/completions", ["x_made_up"], "strict")


@pytest.mark.parametrize("path, field, meant", [
    ("/v1/chat/completions", "max_token", "max_tokens"), ("/v1/chat/completions", "temprature", "temperature"),
    ("/v1/chat/completions", "maxTokens", "max_tokens"), ("/v1/chat/completions", "tool_choices", "tool_choice"),
    ("/v1/chat/completions", "repetition_penalty", "repeat_penalty"), ("/v1/messages", "max_token", "max_tokens"),
    ("/v1/messages", "stop_sequence", "stop_sequences"), ("/v1/responses", "max_tokens", "max_output_tokens"),
    ("/v1/responses", "instruction", "instructions"), ("/v1/responses", "paralel_tool_calls", "parallel_tool_calls"),
])
def test_likely_typos_are_refused_with_the_known_name(path, field, meant):
    assert likely_meant(path, field) == meant
    assert to_refuse(path, [field]) == [field]
    assert f"did you mean {meant!r}?" in refusal(path, [field])
    assert to_refuse(path, [field], "off") == []


@pytest.mark.parametrize("path, field", [
    ("/v1/responses", "client_metadata"), ("/v1/chat/completions", "client_metadata"),
    ("/v1/chat/completions", "top_a"), ("/v1/chat/completions", "session_id"),
    ("/v1/responses", "reasoning_effort"), ("/v1/responses", "conversation_id"), ("/v1/messages", "x_made_up"),
])
def test_other_unknown_fields_pass_by_default(path, field):
    assert unknown_fields(path, {field: 1}) == [field]
    assert likely_meant(path, field) is None and to_refuse(path, [field]) == []
    assert to_refuse(path, [field], "strict") == [field]


# ---------------------------------------------------------------- the layer, in front of a recording stub

class _Stub(BaseHTTPRequestHandler):
    bodies: list[dict] = []

    def do_POST(self):
        self.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        answer = b'{"ok": true}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def stub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _client(stub: str, policy: str = "typos") -> TestClient:
    return TestClient(build_app(Settings(stub, "inner", None, 4096, False, 2**20, field_policy=policy)))


BODIES = {
    "/v1/chat/completions": {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    "/v1/completions": {"model": "m", "prompt": "hi", "max_tokens": 2},
    "/v1/responses": {"model": "m", "input": "hi"},
    "/v1/embeddings": {"model": "m", "input": "hi"},
    "/v1/messages": {"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]},
    "/v1/messages/count_tokens": {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
}


@pytest.mark.parametrize("path", sorted(BODIES))
def test_strict_fields_refuses_a_made_up_field_before_llama_server_sees_it(stub, path):
    with _client(stub, "strict") as c:
        _Stub.bodies.clear()
        r = c.post(path, json={**BODIES[path], "x_made_up": {"a": 1}})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert "'x_made_up'" in err["message"] and "--strict-fields" in err["message"]
        assert err["type"] == "invalid_request_error"
        if path.startswith("/v1/messages"):
            assert r.json()["type"] == "error"                     # Anthropic shape
        else:
            assert err["param"] == "x_made_up"                    # OpenAI shape
        assert _Stub.bodies == []
        assert c.post(path, json=BODIES[path]).status_code == 200     # the same request without it goes through
        assert _Stub.bodies == [BODIES[path]]


@pytest.mark.parametrize("path", sorted(BODIES))
def test_by_default_a_typo_is_refused_and_a_foreign_field_passes_verbatim(stub, path, caplog):
    typo = {"/v1/responses": "instruction", "/v1/embeddings": "dimension",
            "/v1/messages/count_tokens": "mesages"}.get(path, "max_token")
    with _client(stub) as c, caplog.at_level("WARNING", logger="reamkit.serve"):
        _Stub.bodies.clear()
        r = c.post(path, json={**BODIES[path], typo: 2})
        assert r.status_code == 400 and "did you mean" in r.json()["error"]["message"], r.text
        assert _Stub.bodies == []
        body = {**BODIES[path], "client_metadata": {"originator": "codex_exec"}}
        assert c.post(path, json=body).status_code == 200
        assert c.post(path, json=body).status_code == 200
    assert _Stub.bodies == [body, body]
    warned = [r.getMessage() for r in caplog.records if "client_metadata" in r.getMessage()]
    assert len(warned) == 1 and "passing unknown field" in warned[0]           # once per field, not per request


def test_allow_unknown_fields_passes_even_typos_through_verbatim(stub):
    body = {**BODIES["/v1/chat/completions"], "max_token": 3, "x_made_up": {"a": 1}}
    with _client(stub, "off") as c:
        _Stub.bodies.clear()
        assert c.post("/v1/chat/completions", json=body).status_code == 200
    assert _Stub.bodies == [body]
