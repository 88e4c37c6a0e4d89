"""CPU time reamkit's layer spends per streamed chunk, without a model (used by ``bench/serve.py``).

A stub upstream streams N chat-completion chunks (or Anthropic ``content_block_delta`` events), one write each
and ~0.3 ms apart as llama-server does on a fast model, so every chunk reaches the layer as its own read. The
layer runs as ``reamkit serve`` runs it (uvicorn, one event-loop thread, here in a thread of this process); the
CPU time of that thread while a client reads the stream through it, divided by N, is the layer's cost per chunk
(CPU time, so other processes on the machine change it little). With tools in the request the layer watches
the stream for cut-off tool calls (:mod:`reamkit.serving.streams`).
"""

from __future__ import annotations

import http.client
import json
import socket
import statistics
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

OPENAI_CHUNK = ('data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":" word"}}],'
                '"created":1764370000,"id":"chatcmpl-0123456789abcdef","model":"m","system_fingerprint":'
                '"b1-0c1e570","object":"chat.completion.chunk"}\n\n').encode()
OPENAI_END = ('data: {"choices":[{"finish_reason":"length","index":0,"delta":{}}],"created":1764370000,'
              '"id":"chatcmpl-0123456789abcdef","model":"m","object":"chat.completion.chunk"}\n\n'
              'data: [DONE]\n\n').encode()
ANTHROPIC_START = (b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1","type":"message",'
                   b'"role":"assistant","content":[],"model":"m","usage":{"input_tokens":5,"output_tokens":0}}}\n\n'
                   b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
                   b'"content_block":{"type":"text","text":""}}\n\n')
ANTHROPIC_CHUNK = (b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
                   b'"delta":{"type":"text_delta","text":" word"}}\n\n')
ANTHROPIC_END = (b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
                 b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"max_tokens"},'
                 b'"usage":{"output_tokens":2000}}\n\nevent: message_stop\ndata: {"type":"message_stop"}\n\n')
TOOL = {"type": "function", "function": {"name": "write_file", "description": "Write a file", "parameters": {
    "type": "object", "properties": {"path": {"type": "string"}, "content": {"type": "string"}}}}}


class _Stub(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"      # the body ends when the connection closes
    chunks = 2000
    gap = 0.0003

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        anthropic = self.path.startswith("/v1/messages")
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        self.wfile.write(ANTHROPIC_START if anthropic else b"")
        chunk = ANTHROPIC_CHUNK if anthropic else OPENAI_CHUNK
        for _ in range(self.chunks):
            self.wfile.write(chunk)
            self.wfile.flush()
            time.sleep(self.gap)
        self.wfile.write(ANTHROPIC_END if anthropic else OPENAI_END)

    def log_message(self, *args):
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read(port: int, path: str, body: dict) -> int:
    """CPU-cheap client: read the whole stream; returns the bytes received."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    n = 0
    while data := resp.read1(65536):
        n += len(data)
    conn.close()
    return n


def _cpu(clock: int, port: int, path: str, body: dict) -> float:
    t = time.clock_gettime(clock)
    _read(port, path, body)
    return time.clock_gettime(clock) - t


def chunk_costs(chunks: int = 2000, repeats: int = 5) -> dict[str, float]:
    """Microseconds of CPU per chunk spent in reamkit's layer, per kind of stream."""
    import uvicorn

    from reamkit.serving.proxy import Settings, build_app

    _Stub.chunks = chunks
    stub = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    threading.Thread(target=stub.serve_forever, daemon=True).start()
    stub_port = stub.server_address[1]
    port = _free_port()
    settings = Settings(f"http://127.0.0.1:{stub_port}", "inner", None, 1 << 20, True, 1 << 24)
    server = uvicorn.Server(uvicorn.Config(build_app(settings), host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="on"))
    layer = threading.Thread(target=server.run, daemon=True)
    layer.start()
    while not server.started:
        time.sleep(0.05)
    clock = time.pthread_getcpuclockid(layer.ident)
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    messages = {"model": "m", "max_tokens": 4096, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    cases = {"OpenAI chat, no tools (passed through)": ("/v1/chat/completions", chat),
             "OpenAI chat with tools (watched for cut-off calls)": ("/v1/chat/completions", {**chat, "tools": [TOOL]}),
             "Anthropic messages with tools (watched)": ("/v1/messages", {
                 **messages, "tools": [{"name": "write_file", "description": "Write a file",
                                        "input_schema": TOOL["function"]["parameters"]}]})}
    out = {}
    try:
        for label, (path, body) in cases.items():
            _read(port, path, body)                                      # warm-up
            out[label] = 1e6 * statistics.median(_cpu(clock, port, path, body) for _ in range(repeats)) / chunks
    finally:
        server.should_exit = True
        stub.shutdown()
    return out
