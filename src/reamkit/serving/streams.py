"""Streamed answers with tool calls: hold each call until it is known to be whole, then pass it on or turn it
into text (see :mod:`.qwen3_coder`).

llama-server's grammar keeps every call well formed unless generation stops inside it, so a call followed by
another call or text is whole; only the last one can be cut off, and ``finish_reason: "length"`` /
``stop_reason: "max_tokens"`` says so. Holding costs nothing in tokens; the client just sees a call's
arguments in one piece when it ends instead of token by token. Everything else streams through untouched.
"""

from __future__ import annotations

import json

from .qwen3_coder import call_is_complete, parse_partial_object, render_call


def split_events(buffer: bytes) -> tuple[list[bytes], bytes]:
    """Complete SSE events (each ending in a blank line) and the unfinished rest."""
    events = []
    while True:
        cut = buffer.find(b"\n\n")
        if cut < 0:
            return events, buffer
        events.append(buffer[:cut + 2])
        buffer = buffer[cut + 2:]


def _data(event: bytes) -> dict | None:
    for line in event.split(b"\n"):
        if line.startswith(b"data: ") and line[6:7] == b"{":
            try:
                return json.loads(line[6:])
            except ValueError:
                return None
    return None


class OpenAIToolStream:
    """Chat-completion chunks (``data: {...}``); holds ``delta.tool_calls`` per call index."""

    def __init__(self, schemas: dict[str, dict]):
        self.schemas = schemas
        self.held: dict[int, list[bytes]] = {}
        self.calls: dict[int, dict] = {}
        self.turned = 0

    def feed(self, event: bytes) -> list[bytes]:
        if b'"finish_reason":null' in event and b'"tool_calls"' not in event:
            return [event]            # plain text or usage, most chunks: nothing to hold or release, no parsing
        chunk = _data(event)
        choices = chunk.get("choices") if chunk else None
        if not choices:
            return [event]
        choice = choices[0]
        deltas = (choice.get("delta") or {}).get("tool_calls")
        out: list[bytes] = []
        if deltas:
            for d in deltas:
                idx = d.get("index", 0)
                for earlier in [i for i in self.held if i < idx]:
                    out += self.held.pop(earlier)          # a later call started: the earlier one is whole
                call = self.calls.setdefault(idx, {"name": "", "arguments": ""})
                fn = d.get("function") or {}
                call["name"] += fn.get("name") or ""
                call["arguments"] += fn.get("arguments") or ""
            self.held.setdefault(deltas[-1].get("index", 0), []).append(event)
            if choice.get("finish_reason") is None:
                return out
            event = None
        if choice.get("finish_reason") is not None:
            out += self._finish(chunk, choice["finish_reason"])
        if event is not None:
            out.append(event)
        return out

    def _finish(self, chunk: dict, reason: str) -> list[bytes]:
        out: list[bytes] = []
        for idx in sorted(self.held):
            events = self.held.pop(idx)
            call = self.calls[idx]
            if reason != "length" or call_is_complete(call["arguments"], self.schemas.get(call["name"])):
                out += events
                continue
            self.turned += 1
            text = render_call(call["name"], parse_partial_object(call["arguments"]))
            as_text = {k: v for k, v in chunk.items() if k not in ("choices", "usage", "timings")}
            as_text["choices"] = [{"index": 0, "finish_reason": None, "delta": {"content": text}}]
            out.append(b"data: " + json.dumps(as_text, ensure_ascii=False).encode() + b"\n\n")
        return out


class AnthropicToolStream:
    """Messages events (``event: X`` + ``data: {...}``); holds a ``tool_use`` block until the next block or
    the ``message_delta`` shows whether it was cut off. With ``single`` (``disable_parallel_tool_use``, which
    llama-server's Anthropic conversion drops) every block after the first whole call is left out."""

    def __init__(self, schemas: dict[str, dict], single: bool = False):
        self.schemas, self.single = schemas, single
        self.held: list[bytes] = []
        self.block: dict | None = None
        self.turned = 0
        self.called = self.dropped = False

    def feed(self, event: bytes) -> list[bytes]:
        if self.block is None and not self.called and \
                event.startswith((b"event: content_block_delta\n", b"event: ping\n")):
            return [event]            # text while no call is held, most events: no parsing
        data = _data(event)
        kind = data.get("type") if data else None
        if self.called and kind in ("content_block_start", "content_block_delta", "content_block_stop"):
            self.dropped = True
            return []
        if kind == "content_block_start":
            out = self._release(cut_off=False)
            if self.called:
                self.dropped = True
                return out
            block = data.get("content_block") or {}
            if block.get("type") == "tool_use":
                self.block = {"index": data.get("index", 0), "name": block.get("name", ""), "json": ""}
                self.held = [event]
                return out
            return out + [event]
        if self.block is not None and kind in ("content_block_delta", "content_block_stop"):
            delta = data.get("delta") or {}
            self.block["json"] += delta.get("partial_json") or ""
            self.held.append(event)
            return []
        if kind == "message_delta":
            cut_off = (data.get("delta") or {}).get("stop_reason") == "max_tokens"
            out = self._release(cut_off=cut_off)
            if self.dropped:
                data["delta"]["stop_reason"] = "tool_use"
                event = _sse("message_delta", data)
            return out + [event]
        return [event]

    def _release(self, cut_off: bool) -> list[bytes]:
        block, held = self.block, self.held
        self.block, self.held = None, []
        if block is None:
            return []
        if not cut_off or call_is_complete(block["json"] or "{}", self.schemas.get(block["name"])):
            self.called = self.single
            return held
        self.turned += 1
        text = render_call(block["name"], parse_partial_object(block["json"]))
        i = block["index"]
        return [_sse("content_block_start", {"type": "content_block_start", "index": i,
                                             "content_block": {"type": "text", "text": ""}}),
                _sse("content_block_delta", {"type": "content_block_delta", "index": i,
                                             "delta": {"type": "text_delta", "text": text}}),
                _sse("content_block_stop", {"type": "content_block_stop", "index": i})]


def _sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


class ResponsesStream:
    """Responses API events: llama-server's lack ``output_index``, ``content_index`` and ``sequence_number``,
    which the openai SDK's ``responses.stream()`` reads; each event gets them (items numbered in the order
    they are added, one content part per item)."""

    def __init__(self):
        self.items: dict[str, int] = {}
        self.seq = 0

    def feed(self, event: bytes) -> list[bytes]:
        data = _data(event)
        if data is None or not isinstance(data.get("type"), str):
            return [event]
        kind = data["type"]
        item = data.get("item") if isinstance(data.get("item"), dict) else None
        key = item.get("id") if item else data.get("item_id")
        if key is not None:
            data.setdefault("output_index", self.items.setdefault(key, len(self.items)))
        if kind.startswith(("response.output_text.", "response.content_part.", "response.reasoning_text.")):
            data.setdefault("content_index", 0)
        if kind == "response.output_text.delta" or kind == "response.output_text.done":
            data.setdefault("logprobs", [])
        data.setdefault("sequence_number", self.seq)
        self.seq += 1
        name = event.split(b"\n", 1)[0][7:].decode() if event.startswith(b"event: ") else kind
        return [_sse(name, data)]
