"""How to point each coding agent at ``reamkit serve`` (what ``--print-client-config`` prints).

Every client gets a non-empty key even when the server has none (the SDKs refuse an empty one), and any model
name it sends is answered by the served model, so Claude Code's background "haiku" requests work too.
"""

from __future__ import annotations

import json

CLIENTS = ("claude-code", "codex", "cline", "continue", "aider")
PLACEHOLDER_KEY = "reamkit"


def client_config(client: str, url: str, model: str, n_ctx: int, api_key: str | None = None) -> str:
    key = api_key or PLACEHOLDER_KEY
    max_out = max(1024, min(32000, n_ctx // 2))
    if client == "claude-code":
        return "\n".join([
            "# Claude Code speaks the Anthropic Messages API; the base URL has no /v1.",
            f"export ANTHROPIC_BASE_URL={url}",
            f"export ANTHROPIC_AUTH_TOKEN={key}",
            f"export ANTHROPIC_MODEL={model}",
            f"export ANTHROPIC_DEFAULT_OPUS_MODEL={model}",
            f"export ANTHROPIC_DEFAULT_SONNET_MODEL={model}",
            f"export ANTHROPIC_DEFAULT_HAIKU_MODEL={model}",
            f"export CLAUDE_CODE_MAX_OUTPUT_TOKENS={max_out}   # answers must fit the {n_ctx}-token context",
            "export CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1",
            "export API_TIMEOUT_MS=600000",
            "claude",
        ])
    if client == "codex":
        return "\n".join([
            "# Codex CLI speaks the OpenAI Responses API. In ~/.codex/config.toml (top-level keys above any [table]):",
            f'model = "{model}"',
            'model_provider = "reamkit"',
            f"model_context_window = {n_ctx}",
            "",
            "[model_providers.reamkit]",
            'name = "reamkit serve"',
            f'base_url = "{url}/v1"',
            'env_key = "REAMKIT_API_KEY"',
            'wire_api = "responses"',
            "",
            "# and in the shell that runs it:",
            f"export REAMKIT_API_KEY={key}",
            "codex",
        ])
    if client == "cline":
        return "\n".join([
            "# Cline: Settings -> API Provider 'OpenAI Compatible'",
            f"Base URL:        {url}/v1",
            f"API Key:         {key}",
            f"Model ID:        {model}",
            f"Context Window:  {n_ctx}",
            f"Max Output:      {max_out}",
            "Native tool calling works; the XML tool format of older Cline versions is plain text to the server.",
        ])
    if client == "continue":
        return "\n".join([
            "# Continue: add to ~/.continue/config.yaml under models:",
            "models:",
            f"  - name: {model} (reamkit)",
            "    provider: openai",
            f"    model: {model}",
            f"    apiBase: {url}/v1",
            f"    apiKey: {key}",
            "    roles: [chat, edit, apply]",
            "    capabilities: [tool_use]",
            "    defaultCompletionOptions:",
            f"      contextLength: {n_ctx}",
            f"      maxTokens: {max_out}",
        ])
    if client == "aider":
        meta = {f"openai/{model}": {"max_input_tokens": n_ctx, "max_output_tokens": max_out,
                                    "input_cost_per_token": 0, "output_cost_per_token": 0,
                                    "litellm_provider": "openai", "mode": "chat"}}
        return "\n".join([
            "# aider talks to the OpenAI API; save the model's limits once so it knows the context size.",
            f"export OPENAI_API_BASE={url}/v1",
            f"export OPENAI_API_KEY={key}",
            f"echo '{json.dumps(meta)}' > .aider.model.metadata.json",
            f"aider --model openai/{model} --edit-format whole",
        ])
    raise ValueError(f"unknown client {client!r}")
