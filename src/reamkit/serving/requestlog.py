"""What ``reamkit serve -v`` logs of each request: its top-level fields, the newest user text and the answer's
text (tool calls as ``[call NAME]``), each cut to one short line. Chat completions, Messages and Responses
(whole or streamed) are read; anything else in an answer is skipped, never an error."""

from __future__ import annotations

import json


def summary(body: dict, answer: bytes) -> str:
    return (f"fields: {','.join(body)} | asked: {_preview(_last_user_text(body))}"
            f" | answered: {_preview(_answer_text(answer))}")


def _preview(text: str, n: int = 120) -> str:
    text = " ".join(text.split())
    return json.dumps(text[:n] + ("..." if len(text) > n else ""), ensure_ascii=False)


def _last_user_text(body: dict) -> str:
    turns = body.get("messages") or body.get("input") or []
    if isinstance(turns, str):                 # Responses: "input" may be the prompt itself
        return turns
    for msg in reversed(turns if isinstance(turns, list) else []):
        if isinstance(msg, dict) and msg.get("role") == "user":
            content = msg.get("content")
            if isinstance(content, list):     # the newest text block: agents put reminders before the prompt
                texts = [b.get("text", "") for b in content if isinstance(b, dict) and b.get("text")]
                return texts[-1] if texts else ""
            return str(content or "")
    return str(body.get("prompt", ""))


def _answer_text(answer: bytes) -> str:
    """The generated text of a whole or streamed OpenAI/Anthropic answer (for the verbose log only)."""
    docs = []
    for line in answer.split(b"\n"):
        line = line[6:] if line.startswith(b"data: ") else line
        if line.startswith(b"{"):
            try:
                docs.append(json.loads(line))
            except ValueError:
                pass
    parts: list[str] = []
    for d in docs:
        if isinstance(d, dict):
            _collect(d, parts)
    return "".join(p for p in parts if isinstance(p, str))


def _obj(value) -> dict:
    return value if isinstance(value, dict) else {}


def _collect(d: dict, parts: list) -> None:
    for c in d.get("choices") or []:                                   # chat completions
        c = _obj(c)
        m = _obj(c.get("message") or c.get("delta"))
        parts.append(m.get("content") or c.get("text") or "")
        for call in m.get("tool_calls") or []:
            parts.append(f"[call {_obj(_obj(call).get('function')).get('name') or ''}]")
    if isinstance(d.get("content"), list):                             # a whole Anthropic message
        parts += [b.get("text") or f"[tool_use {b.get('name')}]" for b in d["content"] if isinstance(b, dict)]
    kind = d.get("type") if isinstance(d.get("type"), str) else ""
    if kind.startswith("response."):                                   # a Responses stream
        if kind == "response.output_text.delta":
            parts.append(d.get("delta"))
        item = _obj(d.get("item"))
        if kind == "response.output_item.added" and item.get("type") == "function_call":
            parts.append(f"[call {item.get('name')}]")
        return
    if d.get("object") == "response" or isinstance(d.get("output"), list):   # a whole Responses answer
        for item in d.get("output") or []:
            item = _obj(item)
            if item.get("type") == "function_call":
                parts.append(f"[call {item.get('name')}]")
            parts += [_obj(c).get("text") for c in item.get("content") or [] if item.get("type") == "message"]
        return
    parts.append(_obj(d.get("delta")).get("text") or "")               # Anthropic stream events
    block = _obj(d.get("content_block"))
    if block.get("type") == "tool_use":
        parts.append(f"[tool_use {block.get('name')}]")
