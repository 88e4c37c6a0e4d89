"""A real coding agent end to end: Claude Code, installed once from npm into the reamkit cache, pointed at
``reamkit serve`` the way ``--print-client-config claude-code`` says, answers a one-shot prompt; the server's
log shows the request and the answer.

The tiny model never chooses to stop, so this server biases ``<|im_end|>`` up (llama-server's own
``--logit-bias``): answers end after a few tokens with ``end_turn``, as a real model's would. Claude Code's
system prompt and tool list are ~19k tokens; the model's 64k context holds them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from reamkit.serving import client_config

from .serving_helpers import EOS_ID, KEY, Served, tiny_coder_gguf  # noqa: F401

pytestmark = pytest.mark.agent          # needs the npm registry the first time (then cached)

CLAUDE_CODE_VERSION = "2.1.328"
PROMPT = "Reply with one short word."


def claude_code() -> Path:
    """The pinned Claude Code CLI, installed once (atomically) under the reamkit cache."""
    from reamkit.zoo import cache_root

    home = cache_root() / "agents" / f"claude-code-{CLAUDE_CODE_VERSION}"
    binary = home / "node_modules" / ".bin" / "claude"
    if binary.exists():
        return binary
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm is not installed: the agent test installs Claude Code from the npm registry")
    home.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{home.name}.tmp-", dir=home.parent))
    try:
        subprocess.run([npm, "install", "--prefix", str(tmp), "--no-audit", "--no-fund", "--loglevel=error",
                        f"@anthropic-ai/claude-code@{CLAUDE_CODE_VERSION}"], check=True, timeout=900)
        os.replace(tmp, home)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return binary


def test_claude_code_one_shot_prompt(tiny_coder_gguf, tmp_path):
    claude = claude_code()
    s = Served(tiny_coder_gguf, tmp_path, f"--llama-arg=--logit-bias", f"--llama-arg={EOS_ID}+10",
               ctx=65536, parallel=1, threads=2)
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "CLAUDE_"))}
        for line in client_config("claude-code", s.url, "tiny-coder", 65536, KEY).splitlines():
            if line.startswith("export "):
                key, value = line[len("export "):].split("#")[0].strip().split("=", 1)
                env[key] = value
        home = tmp_path / "home"
        work = tmp_path / "work"
        home.mkdir()
        work.mkdir()
        env.update(HOME=str(home), DISABLE_AUTOUPDATER="1")
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
