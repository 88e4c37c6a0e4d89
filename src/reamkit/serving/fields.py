"""Which top-level request fields each OpenAI / Anthropic endpoint accepts; any other gets 400.

llama-server ignores a field it does not know, so a misspelt or foreign option (``max_token``, vLLM's
``repetition_penalty``) silently does nothing. Coding agents, though, send fields the server has no use for
(``metadata``, ``store``, ``service_tier``, ...). The allowlist per endpoint is therefore the union of

* every field of the API's request type, as the pinned ``openai`` / ``anthropic`` SDKs define it (the
  tests check that against the installed SDKs), plus fields of the Anthropic API that older clients still
  send (``temperature``, ``top_p``, ``top_k``);
* llama-server's own per-request fields (``tools/server/server-schema.cpp`` and the chat conversion in
  ``server-common.cpp`` of the pinned build), on the OpenAI endpoints only: its Anthropic conversion keeps
  just ``temperature``/``top_p``/``top_k``/``stream``/``chat_template_kwargs`` and drops the rest;
* fields seen from real agents (:data:`CLIENT_EXTRAS`).

Fields llama-server sets itself while rendering the chat template (``chat_format``, ``chat_parser``,
``grammar_triggers``, ...) are not accepted from clients. llama-server's native endpoints (``/completion``,
``/infill``, ``/tokenize``, ...) are not checked. ``reamkit serve --allow-unknown-fields`` passes unknown
fields through (logged once per name) for clients not covered here.
"""

from __future__ import annotations

OPENAI_CHAT = frozenset({
    "audio", "frequency_penalty", "function_call", "functions", "logit_bias", "logprobs", "max_completion_tokens",
    "max_tokens", "messages", "metadata", "modalities", "model", "moderation", "n", "parallel_tool_calls",
    "prediction", "presence_penalty", "prompt_cache_key", "prompt_cache_options", "prompt_cache_retention",
    "reasoning_effort", "response_format", "safety_identifier", "seed", "service_tier", "stop", "store", "stream",
    "stream_options", "temperature", "tool_choice", "tools", "top_logprobs", "top_p", "user", "verbosity",
    "web_search_options"})
OPENAI_COMPLETIONS = frozenset({
    "best_of", "echo", "frequency_penalty", "logit_bias", "logprobs", "max_tokens", "model", "n", "presence_penalty",
    "prompt", "seed", "stop", "stream", "stream_options", "suffix", "temperature", "top_p", "user"})
OPENAI_RESPONSES = frozenset({
    "access_programs", "background", "context_management", "conversation", "image", "include", "input",
    "instructions", "max_output_tokens", "max_tool_calls", "metadata", "model", "moderation", "parallel_tool_calls",
    "previous_response_id", "prompt", "prompt_cache_key", "prompt_cache_options", "prompt_cache_retention",
    "reasoning", "safety_identifier", "service_tier", "store", "stream", "stream_options", "temperature", "text",
    "tool_choice", "tools", "top_logprobs", "top_p", "truncation", "user",
    "personality"})                                       # input_tokens only
OPENAI_EMBEDDINGS = frozenset({"dimensions", "encoding_format", "input", "model", "user"})

ANTHROPIC_MESSAGES = frozenset({
    "cache_control", "container", "diagnostics", "inference_geo", "max_tokens", "messages", "metadata", "model",
    "output_config", "service_tier", "speed", "stop_sequences", "stream", "system", "thinking", "tool_choice",
    "tools", "user_profile_id", "workspace_id",
    # the beta Messages API (what Claude Code calls)
    "betas", "billing_policy", "compaction", "context_management", "fallback_credit_token", "fallbacks",
    "mcp_servers", "thread",
    # sampling fields of earlier API versions; llama-server still reads them
    "temperature", "top_p", "top_k"})
ANTHROPIC_COUNT_TOKENS = ANTHROPIC_MESSAGES - {"max_tokens", "stream", "stop_sequences", "temperature", "top_p",
                                               "top_k", "service_tier", "container", "inference_geo",
                                               "diagnostics", "metadata", "fallbacks", "fallback_credit_token",
                                               "thread"}

# llama-server's per-request generation fields (server-schema.cpp), minus those its chat conversion fills in
LLAMA_GENERATION = frozenset({
    "verbose", "timings_per_token", "stream_options", "cache_prompt", "return_tokens", "return_progress",
    "sse_ping_interval", "n_predict", "n_indent", "n_keep", "n_discard", "n_cmpl", "n_cache_reuse",
    "t_max_predict_ms", "response_fields", "top_k", "min_p", "top_n_sigma", "xtc_probability", "xtc_threshold",
    "typical_p", "dynatemp_range", "dynatemp_exponent", "repeat_last_n", "repeat_penalty", "dry_multiplier",
    "dry_base", "dry_allowed_length", "dry_penalty_last_n", "dry_sequence_breakers", "mirostat", "mirostat_tau",
    "mirostat_eta", "adaptive_target", "adaptive_decay", "n_probs", "min_keep", "backend_sampling",
    "post_sampling_probs", "lora", "json_schema", "grammar", "ignore_eos", "samplers", "id_slot",
    "reasoning_budget_tokens", "thinking_budget_tokens", "reasoning_budget_message", "reasoning_control"})
# read by llama-server's chat-template step (server-common.cpp)
LLAMA_CHAT = frozenset({"chat_template_kwargs", "add_generation_prompt", "continue_final_message",
                        "reasoning_format"})
LLAMA_EMBEDDINGS = frozenset({"content", "embd_normalize"})
# the only extras llama-server's Anthropic conversion keeps
LLAMA_ANTHROPIC = frozenset({"chat_template_kwargs"})

# Extension fields real agents send beyond the SDK types, from their requests' ``fields:`` in the ``-v`` log.
# None so far: Claude Code 2.1.328 sends model, messages, system, tools, metadata, max_tokens, thinking,
# context_management, output_config and stream, all defined by the (beta) Messages API.
CLIENT_EXTRAS: frozenset[str] = frozenset()

_CHAT = OPENAI_CHAT | LLAMA_GENERATION | LLAMA_CHAT | CLIENT_EXTRAS
_RESPONSES = OPENAI_RESPONSES | LLAMA_GENERATION | LLAMA_CHAT | CLIENT_EXTRAS
ALLOWED: dict[str, frozenset[str]] = {
    "/v1/chat/completions": _CHAT,
    "/chat/completions": _CHAT,
    "/v1/chat/completions/input_tokens": _CHAT,
    "/chat/completions/input_tokens": _CHAT,
    "/v1/completions": OPENAI_COMPLETIONS | LLAMA_GENERATION | CLIENT_EXTRAS,
    "/v1/responses": _RESPONSES,
    "/responses": _RESPONSES,
    "/v1/responses/input_tokens": _RESPONSES,
    "/responses/input_tokens": _RESPONSES,
    "/v1/embeddings": OPENAI_EMBEDDINGS | LLAMA_EMBEDDINGS,
    "/v1/messages": ANTHROPIC_MESSAGES | LLAMA_ANTHROPIC | CLIENT_EXTRAS,
    "/v1/messages/count_tokens": ANTHROPIC_COUNT_TOKENS | LLAMA_ANTHROPIC | CLIENT_EXTRAS,
}

# Names other servers use for something llama-server calls differently: the refusal says which to use.
RENAMED = {"repetition_penalty": "repeat_penalty", "max_new_tokens": "max_tokens", "num_predict": "max_tokens",
           "max_output_tokens": "max_tokens", "stop_sequences": "stop", "typical": "typical_p",
           "max_token": "max_tokens"}


def unknown_fields(path: str, body: dict) -> list[str]:
    """The top-level fields of ``body`` that ``path`` does not accept, in request order ([] if the path is
    not checked)."""
    allowed = ALLOWED.get(path)
    if allowed is None:
        return []
    return [k for k in body if k not in allowed]


def refusal(path: str, fields: list[str]) -> str:
    """One line naming the first unknown field, what to do instead, and the opt-out."""
    field = fields[0]
    more = f" (and {len(fields) - 1} more: {', '.join(fields[1:4])}{', ...' if len(fields) > 4 else ''})" \
        if len(fields) > 1 else ""
    if RENAMED.get(field) in ALLOWED[path]:
        hint = f"; did you mean {RENAMED[field]!r}?"
    elif path.startswith("/v1/messages") and field in ALLOWED["/v1/chat/completions"]:
        hint = f"; llama-server takes {field!r} on /v1/chat/completions but ignores it on {path}"
    else:
        hint = ""
    return (f"unknown field {field!r} in the request body{more}: {path} does not use it{hint}. Remove it, or start "
            f"reamkit serve with --allow-unknown-fields to pass unknown fields through to llama-server (which "
            f"ignores what it does not know)")
