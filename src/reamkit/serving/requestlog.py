"""What ``reamkit serve -v`` logs of each request: its top-level fields, the newest user text and the answer's
text (tool calls as ``[call NAME]``), each cut to one short line. Chat Completions, Messages and Responses
requests and answers, whole or streamed."""

from __future__ import annotations

import json


def summary(body: dict, answer: bytes) -> str:
    return (f"fields: {','.join(body)} | asked: {_preview(_last_user_text(body))}"
            f" | answered: {_preview(_answer_text(answer))}")


def _preview(text: str, n: int = 120) -> str:
    text = " ".join(text.split())
    return json.dumps(text[:n] + ("..." if len(text) > n else ""), ensure_ascii=False)


def _last_user_text(body: dict) -> str:
    if isinstance(body.get("input"), str):                 # the Responses API
        return body["input"]
    messages = body.get("messages") or (body.get("input") if isinstance(body.get("input"), list) else [])
    for msg in reversed(messages):
        if isinstance(msg, dict) and msg.get("role") == "user":
            content = msg.get("content")
            if isinstance(content, list):     # the newest text block: agents put reminders before the prompt
                texts = [b["text"] for b in content if isinstance(b, dict) and isinstance(b.get("text"), str)]
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
        for c in d.get("choices") or []:
            m = c.get("message") or c.get("delta") or {}
            parts.append(m.get("content") or c.get("text") or "")
            for call in m.get("tool_calls") or []:
                parts.append(f"[call {(call.get('function') or {}).get('name') or ''}]")
        if isinstance(d.get("content"), list):
            parts += [b.get("text") or f"[tool_use {b.get('name')}]" for b in d["content"] if isinstance(b, dict)]
        if d.get("type") == "response.output_text.delta":          # Responses API events
            parts.append(str(d.get("delta") or ""))
        elif d.get("type") == "response.output_item.added" and (d.get("item") or {}).get("type") == "function_call":
            parts.append(f"[call {d['item'].get('name')}]")
        for item in d.get("output") if isinstance(d.get("output"), list) else []:   # a whole Responses answer
            if isinstance(item, dict) and item.get("type") == "function_call":
                parts.append(f"[call {item.get('name')}]")
            elif isinstance(item, dict):
                parts += [b.get("text") or "" for b in item.get("content") or [] if isinstance(b, dict)]
        delta = d.get("delta") if isinstance(d.get("delta"), dict) else {}
        parts.append(delta.get("text") or "")
        block = d.get("content_block") or {}
        if block.get("type") == "tool_use":
            parts.append(f"[tool_use {block.get('name')}]")
    return "".join(parts)
