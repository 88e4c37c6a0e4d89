"""Real coding agents end to end: Claude Code and Codex CLI, each installed once from npm into the reamkit cache
and pointed at ``reamkit serve`` the way ``--print-client-config`` says, answer a one-shot prompt (Messages API,
Responses API); the server's log shows the request and the answer.

The tiny model never chooses to stop, so this server biases ``<|im_end|>`` up (llama-server's own
``--logit-bias``): answers end after a few tokens with ``end_turn``, as a real model's would. Claude Code's
system prompt and tool list are ~19k tokens, Codex's ~10k; the model's 64k context holds them.
"""

from __future__ import annotations

import json
import subprocess
import tomllib
from pathlib import Path

import pytest

from reamkit.serving import client_config

from .serving_helpers import EOS_ID, KEY, Served, agent_env, npm_agent, tiny_coder_gguf  # noqa: F401

pytestmark = pytest.mark.agent          # needs the npm registry the first time (then cached)

CLAUDE_CODE_VERSION = "2.1.328"
CODEX_VERSION = "0.171.0"
PROMPT = "Reply with one short word."


def claude_code() -> Path:
    return npm_agent("@anthropic-ai/claude-code", CLAUDE_CODE_VERSION, "claude")


def test_claude_code_one_shot_prompt(tiny_coder_gguf, tmp_path):
    claude = claude_code()
    s = Served(tiny_coder_gguf, tmp_path, f"--llama-arg=--logit-bias", f"--llama-arg={EOS_ID}+10",
               ctx=65536, parallel=1, threads=2)
    try:
        env = agent_env(client_config("claude-code", s.url, "tiny-coder", 65536, KEY), tmp_path / "home",
                        ("ANTHROPIC_", "CLAUDE_"))
        env["DISABLE_AUTOUPDATER"] = "1"
        work = tmp_path / "work"
        work.mkdir()
        run = subprocess.run([str(claude), "-p", PROMPT, "--max-turns", "1"], cwd=work, env=env,
                             stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=900)
        log = s.log
        assert run.returncode == 0, (run.stdout[-2000:], run.stderr[-2000:], log[-3000:])
        requests = [ln for ln in log.splitlines() if "POST /v1/messages" in ln]
        assert any(PROMPT in ln for ln in requests), log
        assert all("-> 200" in ln for ln in requests), requests
        # the tiny model's answer may be empty (Claude Code then asks once more) or hold control characters,
        # which the log writes JSON-escaped
        answer = json.dumps(" ".join(run.stdout.split())[:60], ensure_ascii=False)[1:-1]
        assert answer and any(f'answered: "{answer}' in ln for ln in requests), (answer, requests)
    finally:
        s.stop()


def codex_turn(gguf: Path, tmp: Path, *serve_args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """``codex exec`` of the pinned Codex CLI, configured as ``--print-client-config codex`` says, through a
    ``reamkit serve`` given ``serve_args``; its run (JSON events) and the server's ``/v1/responses`` log lines."""
    codex = npm_agent("@openai/codex", CODEX_VERSION, "codex")
    s = Served(gguf, tmp, "--llama-arg=--logit-bias", f"--llama-arg={EOS_ID}+10", *serve_args,
               ctx=65536, parallel=1, threads=2)
    try:
        config, shell = client_config("codex", s.url, "tiny-coder", 65536, KEY).split("# and in the shell")
        assert tomllib.loads(config)["model_providers"]["reamkit"]["wire_api"] == "responses"
        env = agent_env(shell, tmp / "home", ("OPENAI_", "CODEX_"))
        env["CODEX_HOME"] = str(tmp / "codex-home")
        (tmp / "codex-home").mkdir()
        (tmp / "codex-home" / "config.toml").write_text(config)
        work = tmp / "work"
        work.mkdir()
        # --strict-config: every key of the printed configuration is one this Codex version knows
        run = subprocess.run([str(codex), "exec", "--json", "--strict-config", "--skip-git-repo-check", PROMPT],
                             cwd=work, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=900)
        return run, [ln for ln in s.log.splitlines() if "POST /v1/responses" in ln]
    finally:
        s.stop()


def test_codex_exec_one_shot_prompt(tiny_coder_gguf, tmp_path):
    check_codex_turn(tiny_coder_gguf, tmp_path)


def check_codex_turn(gguf: Path, tmp: Path, *serve_args: str, tries: int = 3) -> None:
    """One ``codex exec`` turn completes and Codex reports as the model's message what the server answered.
    The tiny model's sampled answer is empty now and then (``<|im_end|>`` first): Codex then completes the turn
    with no message, which is checked too, and the turn is run again (at most ``tries`` times)."""
    for n in range(tries):
        (tmp / f"try-{n}").mkdir()
        run, requests = codex_turn(gguf, tmp / f"try-{n}", *serve_args)
        assert run.returncode == 0, (run.stdout[-2000:], run.stderr[-3000:], requests)
        events = [json.loads(ln) for ln in run.stdout.splitlines() if ln.startswith("{")]
        turns = [e["type"] for e in events if e["type"].startswith("turn.")]
        assert turns[-1:] == ["turn.completed"] and "turn.failed" not in turns, events
        assert requests and all("-> 200" in ln for ln in requests), requests
        assert any(f'asked: "{PROMPT}"' in ln for ln in requests), requests
        # what Codex reports as the model's message is what the server answered (the log JSON-escapes it)
        said = [e["item"]["text"] for e in events if e["type"] == "item.completed"
                and e["item"].get("type") == "agent_message"]
        if not said and all(ln.endswith('answered: ""') for ln in requests):
            continue                                       # an empty answer, and no message: sample again
        answer = json.dumps(" ".join(said[-1].split())[:60], ensure_ascii=False)[1:-1] if said else None
        assert answer and any(f'answered: "{answer}' in ln for ln in requests), (said, requests)
        return
    pytest.fail(f"the model answered nothing in {tries} turns")
