"""Which top-level request fields each OpenAI / Anthropic endpoint knows, and what happens to the others.

llama-server ignores a field it does not know, so a misspelt option (``max_token``) silently does nothing.
Agent clients, though, add fields of their own with every release (Codex sends ``client_metadata``). So by
default an unknown field is refused only when it looks like a mistake, and otherwise passed through with a
warning logged once per name:

* refused (400, "did you mean"): a name another server uses for one of ours (:data:`RENAMED`), a close
  spelling of a known field (a letter or two off: ``max_token``, ``temprature``; ``maxTokens``), or one of
  llama-server's own sampling fields on an Anthropic endpoint, whose conversion drops them;
* passed through: everything else. ``--strict-fields`` refuses every unknown field instead,
  ``--allow-unknown-fields`` passes every one (typos too).

The known fields per endpoint are the union of

* every field of the API's request type, as the pinned ``openai`` / ``anthropic`` SDKs define it (the
  tests check that against the installed SDKs), plus fields of the Anthropic API that older clients still
  send (``temperature``, ``top_p``, ``top_k``);
* llama-server's own per-request fields (``tools/server/server-schema.cpp`` and the chat conversion in
  ``server-common.cpp`` of the pinned build), on the OpenAI endpoints only: its Anthropic conversion keeps
  just ``temperature``/``top_p``/``top_k``/``stream``/``chat_template_kwargs`` and drops the rest;
* fields seen from real agents (:data:`CLIENT_EXTRAS`).

Fields llama-server sets itself while rendering the chat template (``chat_format``, ``chat_parser``,
``grammar_triggers``, ...) are not known fields. llama-server's native endpoints (``/completion``,
``/infill``, ``/tokenize``, ...) are not checked.
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
           "max_token": "max_tokens", "max_tokens": "max_output_tokens"}


POLICIES = ("typos", "strict", "off")   # the default; --strict-fields; --allow-unknown-fields


def unknown_fields(path: str, body: dict) -> list[str]:
    """The top-level fields of ``body`` that ``path`` does not know, in request order ([] if the path is
    not checked)."""
    allowed = ALLOWED.get(path)
    if allowed is None:
        return []
    return [k for k in body if k not in allowed]


def _squash(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "")


def likely_meant(path: str, field: str) -> str | None:
    """The known field ``field`` is probably a mistake for, or None."""
    allowed = ALLOWED[path]
    if RENAMED.get(field) in allowed:
        return RENAMED[field]
    squashed = {_squash(k): k for k in allowed}
    if _squash(field) in squashed:
        return squashed[_squash(field)]
    # a slip per ~10 letters; short names of different fields differ by one (top_a, top_k)
    budget = 0 if len(field) < 6 else 1 if len(field) < 12 else 2
    close = sorted((_distance(field, k), k) for k in allowed if abs(len(k) - len(field)) <= budget)
    return close[0][1] if close and close[0][0] <= budget else None


def _distance(a: str, b: str) -> int:
    """Edits (insert, delete, substitute, swap two neighbours) that turn ``a`` into ``b``."""
    prev2, prev = [], list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        row = [i]
        for j, cb in enumerate(b, 1):
            row.append(min(prev[j] + 1, row[j - 1] + 1, prev[j - 1] + (ca != cb)))
            if i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                row[j] = min(row[j], prev2[j - 2] + 1)
        prev2, prev = prev, row
    return prev[-1]


def _misplaced(path: str, field: str) -> bool:
    return path.startswith("/v1/messages") and field in LLAMA_GENERATION


def to_refuse(path: str, fields: list[str], policy: str = "typos") -> list[str]:
    """Which of the unknown ``fields`` the ``policy`` refuses (the rest pass through)."""
    if policy == "strict":
        return list(fields)
    if policy == "off":
        return []
    return [f for f in fields if likely_meant(path, f) or _misplaced(path, f)]


def refusal(path: str, fields: list[str], policy: str = "typos") -> str:
    """One line naming the first refused field, what to do instead, and the opt-out."""
    field = fields[0]
    more = f" (and {len(fields) - 1} more: {', '.join(fields[1:4])}{', ...' if len(fields) > 4 else ''})" \
        if len(fields) > 1 else ""
    meant = likely_meant(path, field)
    if meant:
        hint = f"; did you mean {meant!r}?"
    elif _misplaced(path, field):
        hint = f"; llama-server takes {field!r} on /v1/chat/completions but ignores it on {path}"
    else:
        hint = ""
    opt_out = ("start reamkit serve without --strict-fields to pass unknown fields through" if policy == "strict"
               else "start reamkit serve with --allow-unknown-fields to pass it through anyway")
    return (f"unknown field {field!r} in the request body{more}: {path} does not use it{hint}. Remove it, or "
            f"{opt_out} (llama-server ignores what it does not know)")
