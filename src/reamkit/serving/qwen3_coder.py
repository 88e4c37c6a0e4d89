"""Qwen3-Coder tool calls: what llama-server leaves to us.

llama-server parses Qwen3-Coder's XML calls itself (``<tool_call>\\n<function=NAME>\\n<parameter=P>\\nvalue\\n
</parameter>\\n</function>\\n</tool_call>``) with a grammar that keeps every call it starts well formed and
types each parameter by the request's JSON schema. Three gaps remain, closed here as plain functions on
request and response JSON:

* ``tool_choice`` ``required`` (Anthropic ``any``) still lets the model write prose first, and a *named*
  choice (OpenAI ``{"type": "function", ...}``, Anthropic ``{"type": "tool", ...}``) is silently treated as
  ``auto``. We do what Anthropic documents for its own API: prefill the assistant turn with the opening tags
  (and keep only the named tool), so the grammar takes over from the first token.
* A call cut off by ``max_tokens`` comes back as a structured call with unparsable ``arguments`` (OpenAI) or
  an empty ``input`` (Anthropic), which an agent would execute. We return it as plain text instead, rebuilt in
  the model's own XML, so nothing generated is lost and nothing half-written is run.
* Anthropic ``tool_choice: {"type": "none"}`` is ignored; we drop the tools for that request.
"""

from __future__ import annotations

import json
from typing import Any

CALL_OPEN = "<tool_call>\n"


def is_qwen3_coder_template(template: str) -> bool:
    """The same test llama.cpp applies to pick its Qwen3-Coder parser."""
    return "<tool_call>" in template and "<function=" in template and "<parameter=" in template


def _tool_name(tool: dict) -> str | None:
    fn = tool.get("function") if isinstance(tool.get("function"), dict) else tool
    name = fn.get("name") if isinstance(fn, dict) else None
    return name if isinstance(name, str) else None


def _last_is_assistant(messages: Any) -> bool:
    return isinstance(messages, list) and bool(messages) and isinstance(messages[-1], dict) \
        and messages[-1].get("role") == "assistant"


def rewrite_tool_choice(body: dict, api: str) -> tuple[dict, bool]:
    """Make ``required``/``any`` and named tool choices binding (see module doc).

    ``api`` is ``"openai"`` or ``"anthropic"``. Returns the (possibly new) body and whether the request
    offers tools at all (so the caller knows to check the answer's calls).
    """
    tools = body.get("tools")
    if not isinstance(tools, list) or not tools:
        return body, False
    choice = body.get("tool_choice")
    forced: str | None = None     # None: leave as is; "": any tool; else the tool's name
    if api == "openai":
        if choice == "required":
            forced = ""
        elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
            forced = choice["function"].get("name") or ""
    else:
        kind = choice.get("type") if isinstance(choice, dict) else None
        if kind == "none":
            body = {k: v for k, v in body.items() if k not in ("tools", "tool_choice")}
            return body, False
        if kind == "any":
            forced = ""
        elif kind == "tool":
            forced = choice.get("name") or ""
    if forced is None:
        return body, True
    body = dict(body)
    if forced:
        kept = [t for t in tools if isinstance(t, dict) and _tool_name(t) == forced]
        if kept:
            body["tools"] = kept
            if api == "openai":
                body.setdefault("parallel_tool_calls", False)    # a named choice means one call of that tool
        else:
            forced = ""
    body["tool_choice"] = "required" if api == "openai" else {"type": "any"}
    messages = body.get("messages")
    if isinstance(messages, list) and not _last_is_assistant(messages):
        prefill = CALL_OPEN + (f"<function={forced}>\n" if forced else "")
        body["messages"] = [*messages, {"role": "assistant", "content": prefill}]
    return body, True


def render_call(name: str, args: dict) -> str:
    """A call in Qwen3-Coder's XML, as the model writes it (non-string values as JSON)."""
    parts = [f"{CALL_OPEN}<function={name}>\n"]
    for key, value in args.items():
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        parts.append(f"<parameter={key}>\n{text}\n</parameter>\n")
    return "".join(parts)


def parse_partial_object(text: str) -> dict:
    """The keys of a JSON object cut off anywhere (``{"a": 1, "b": "xy``), as far as they are complete.

    Values are closed as far as they go (a cut-off string or list keeps its start); where closing fails, the
    keys before the cut-off one are kept. The result only ever becomes text for the client. Never raises.
    """
    try:
        value = json.loads(text)
        return value if isinstance(value, dict) else {}
    except (ValueError, TypeError):
        pass
    for suffix in ('"}', "}", '"]}', "]}", "}}", '"}}'):
        try:
            value = json.loads(text + suffix)
            if isinstance(value, dict):
                return value
        except ValueError:
            continue
    dec = json.JSONDecoder()
    out: dict = {}
    i = text.find("{") + 1
    while 0 < i < len(text):
        try:
            key, i = dec.raw_decode(text, _skip(text, i))
            i = _skip(text, i)
            if text[i:i + 1] != ":":
                break
            value, i = dec.raw_decode(text, _skip(text, i + 1))
        except (ValueError, IndexError):
            break
        out[key] = value
        i = _skip(text, i)
        if text[i:i + 1] != ",":
            break
        i += 1
    return out


def _skip(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def call_is_complete(arguments: Any, schema: dict | None) -> bool:
    """Whether a parsed call can be run: a JSON object holding every required parameter."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return False
    if not isinstance(arguments, dict):
        return False
    required = (schema or {}).get("required") or []
    return all(k in arguments for k in required if isinstance(k, str))


def tool_schemas(body: dict) -> dict[str, dict]:
    """Tool name -> its parameters schema, for OpenAI (``function.parameters``) and Anthropic
    (``input_schema``) tool lists."""
    out: dict[str, dict] = {}
    for tool in body.get("tools") or []:
        if not isinstance(tool, dict):
            continue
        name = _tool_name(tool)
        fn = tool.get("function") if isinstance(tool.get("function"), dict) else tool
        schema = fn.get("parameters", fn.get("input_schema")) if isinstance(fn, dict) else None
        if name:
            out[name] = schema if isinstance(schema, dict) else {}
    return out


def repair_openai_message(resp: dict, schemas: dict[str, dict]) -> int:
    """Turn cut-off calls of a non-streamed chat completion into text. Returns how many were turned."""
    turned = 0
    for choice in resp.get("choices") or []:
        msg = choice.get("message") or {}
        calls = msg.get("tool_calls") or []
        kept, text = [], []
        for call in calls:
            fn = call.get("function") or {}
            args = fn.get("arguments", "")
            if call_is_complete(args, schemas.get(fn.get("name"))):
                kept.append(call)
            else:
                text.append(render_call(fn.get("name", ""), parse_partial_object(args if isinstance(args, str)
                                                                                 else json.dumps(args))))
        if text:
            turned += len(text)
            msg["content"] = (msg.get("content") or "") + "".join(text)
            if kept:
                msg["tool_calls"] = kept
            else:
                msg.pop("tool_calls", None)
                if choice.get("finish_reason") == "tool_calls":
                    choice["finish_reason"] = "length"
    return turned


def repair_anthropic_message(resp: dict, schemas: dict[str, dict]) -> int:
    """The same for a non-streamed Anthropic message (cut-off calls arrive with an incomplete ``input``)."""
    blocks = resp.get("content")
    if not isinstance(blocks, list):
        return 0
    out, turned = [], 0
    for block in blocks:
        if isinstance(block, dict) and block.get("type") == "tool_use" \
                and not call_is_complete(block.get("input"), schemas.get(block.get("name"))):
            out.append({"type": "text", "text": render_call(block.get("name", ""), block.get("input") or {})})
            turned += 1
        else:
            out.append(block)
    if turned:
        resp["content"] = out
        if not any(b.get("type") == "tool_use" for b in out) and resp.get("stop_reason") == "tool_use":
            resp["stop_reason"] = "max_tokens"
    return turned


def first_call_only(resp: dict) -> bool:
    """Leave out every block of a non-streamed Anthropic message after its first ``tool_use`` (for
    ``disable_parallel_tool_use``, which llama-server's Anthropic conversion drops). Returns whether any was."""
    blocks = resp.get("content")
    if not isinstance(blocks, list):
        return False
    first = next((i for i, b in enumerate(blocks) if isinstance(b, dict) and b.get("type") == "tool_use"), None)
    if first is None or first == len(blocks) - 1:
        return False
    resp["content"] = blocks[:first + 1]
    resp["stop_reason"] = "tool_use"
    return True
