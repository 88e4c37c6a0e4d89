"""``reamkit serve`` without a model loaded: picking a variant from a run folder, one-line errors before any
work, the loopback default and the warning for an open bind, and the printed client settings."""

from __future__ import annotations

import json
import tomllib

import pytest
from typer.testing import CliRunner

from reamkit.cli import app
from reamkit.errors import ReamkitError
from reamkit.serving import CLIENTS, ServeOptions, client_config, resolve_model
from reamkit.serving.access import SERVED
from reamkit.serving.server import check_options, is_loopback, llama_server_command

runner = CliRunner()


def _run_folder(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("coder.Q4_K_M.gguf", "coder.Q8_0.gguf", "coder.IQ4_XS-00001-of-00002.gguf",
                 "coder.IQ4_XS-00002-of-00002.gguf", "notes.txt"):
        (run / name).write_bytes(b"GGUF")
    return run


def test_run_folder_variant_is_picked_by_name(tmp_path):
    run = _run_folder(tmp_path)
    assert resolve_model(run, "Q4_K_M").name == "coder.Q4_K_M.gguf"
    assert resolve_model(run, "q8_0").name == "coder.Q8_0.gguf"                      # case-insensitive
    assert resolve_model(run, "IQ4_XS").name == "coder.IQ4_XS-00001-of-00002.gguf"   # split: first part
    with pytest.raises(ReamkitError, match="no Q2_K variant .* it has: IQ4_XS, Q4_K_M, Q8_0"):
        resolve_model(run, "Q2_K")
    with pytest.raises(ReamkitError, match="holds 3 variants .* choose one with --variant"):
        resolve_model(run)
    single = tmp_path / "single"
    single.mkdir()
    (single / "m.F16.gguf").write_bytes(b"GGUF")
    assert resolve_model(single).name == "m.F16.gguf"
    assert resolve_model(single / "m.F16.gguf", "f16").name == "m.F16.gguf"
    with pytest.raises(ReamkitError, match="does not match"):
        resolve_model(single / "m.F16.gguf", "Q4_K_M")
    with pytest.raises(ReamkitError, match="not found"):
        resolve_model(tmp_path / "nope")
    with pytest.raises(ReamkitError, match="no .gguf files"):
        resolve_model(tmp_path / "run" / "..")
    with pytest.raises(ReamkitError, match="not a .gguf"):
        resolve_model(run / "notes.txt")


@pytest.mark.parametrize("args, message", [
    (["--port", "70000"], "not a TCP port"),
    (["--ctx", "100"], "too small"),
    (["--parallel", "0"], "at least 1"),
    (["--cache-type", "q3_k"], "not one of"),
    (["--api-key", " "], "empty"),
    (["--layer-nice", "20"], "between 0 and 19"),
    (["--llama-arg=--slot-save-path", "--llama-arg=/tmp"], "cannot be passed through"),
    (["--llama-arg=--tools=all"], "cannot be passed through"),
    (["--llama-arg=--api-key-file=/tmp/k"], "cannot be passed through"),
    (["--strict-fields", "--allow-unknown-fields"], "contradict"),
    (["--cors-origins", " "], "empty"),
    ([], "not found"),
])
def test_bad_arguments_fail_in_one_line_before_any_work(tmp_path, args, message):
    result = runner.invoke(app, ["serve", str(tmp_path / "missing.gguf"), *args])
    assert result.exit_code == 2
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.output


def test_default_bind_is_loopback_and_llama_server_stays_private(tmp_path):
    assert ServeOptions().host == "127.0.0.1"
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
    cmd = llama_server_command(tmp_path / "llama-server", tmp_path / "m.gguf", ServeOptions(), 1234, "/dev/fd/5", "m")
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--api-key-file") + 1] == "/dev/fd/5" and "--api-key" not in cmd   # no key on it
    assert "--jinja" in cmd and cmd[cmd.index("--cors-origins") + 1] == "localhost"
    assert not {"/slots", "/props", "/metrics"} & set(SERVED)          # on for the owner, never served
    assert not {"--tools", "--agent", "--slot-save-path", "--rpc"} & set(cmd)
    check_options(ServeOptions())


def test_open_bind_without_key_warns_before_anything_starts(tmp_path):
    result = runner.invoke(app, ["serve", str(tmp_path / "missing.gguf"), "--host", "0.0.0.0"])
    assert "serving on 0.0.0.0 without an API key" in result.output
    assert result.output.strip().splitlines()[-1].startswith("error:")      # and still refused the bad model
    quiet = runner.invoke(app, ["serve", str(tmp_path / "missing.gguf"), "--host", "0.0.0.0", "--api-key", "k"])
    assert "without an API key" not in quiet.output


@pytest.mark.parametrize("client", CLIENTS)
def test_print_client_config(client, tmp_path):
    result = runner.invoke(app, ["serve", "--print-client-config", client, "--port", "9123", "--api-key", "sekret",
                                 "--alias", "coder-q4"])
    assert result.exit_code == 0, result.output
    text = result.output
    assert "coder-q4" in text and "sekret" in text
    if client == "claude-code":
        assert "ANTHROPIC_BASE_URL=http://127.0.0.1:9123\n" in text      # no /v1 for the Anthropic SDK
        assert "ANTHROPIC_DEFAULT_HAIKU_MODEL=coder-q4" in text
    elif client == "codex":
        config = tomllib.loads(text.split("# and in the shell")[0])
        provider = config["model_providers"][config["model_provider"]]
        assert provider["wire_api"] == "responses" and provider["base_url"] == "http://127.0.0.1:9123/v1"
        assert f"export {provider['env_key']}=sekret\n" in text and config["model"] == "coder-q4"
    else:
        assert "http://127.0.0.1:9123/v1" in text


def test_client_config_without_key_still_gives_one():
    assert "OPENAI_API_KEY=reamkit" in client_config("aider", "http://127.0.0.1:8080", "m", 32768)


def test_verbose_log_reads_responses_api_requests_and_answers():
    from reamkit.serving.requestlog import summary

    body = {"model": "m", "input": [
        {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "rules"}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "<env/>"},
                                                        {"type": "input_text", "text": "Say hi."}]}]}
    events = [{"type": "response.created", "response": {"output": []}},
              {"type": "response.output_text.delta", "delta": "Hel"},
              {"type": "response.output_text.delta", "delta": "lo"},
              {"type": "response.output_item.added", "item": {"type": "function_call", "name": "shell"}},
              {"type": "response.function_call_arguments.delta", "delta": "{\"cmd\""},
              {"type": "response.completed", "response": {"output": [{"type": "message", "content": [
                  {"type": "output_text", "text": "Hello"}]}]}}]
    stream = b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events)
    assert summary(body, stream) == 'fields: model,input | asked: "Say hi." | answered: "Hello[call shell]"'
    whole = {"output": [{"type": "reasoning", "content": []},
                        {"type": "message", "content": [{"type": "output_text", "text": "Hi"}]},
                        {"type": "function_call", "name": "shell", "arguments": "{}"}]}
    assert summary({"input": "Say hi."}, json.dumps(whole).encode()).endswith('asked: "Say hi." | answered: "Hi[call shell]"')
