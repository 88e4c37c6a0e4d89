"""Load on the real server: 32 concurrent clients x 5 requests with zero errors, and a client that hangs up
mid-stream frees its slot for the next request."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time

import openai
import pytest

from .serving_helpers import KEY, Served, tiny_coder_gguf  # noqa: F401


@pytest.fixture(scope="module")
def server(tiny_coder_gguf, tmp_path_factory):
    s = Served(tiny_coder_gguf, tmp_path_factory.mktemp("serve-load"), parallel=4, threads=1, ctx=8192)
    yield s
    s.stop()


def test_32_concurrent_clients_5_requests_each(server, figure):
    async def client(i: int, oai: openai.AsyncOpenAI) -> list[str]:
        errors = []
        for j in range(5):
            try:
                if j % 2:
                    text = ""
                    stream = await oai.chat.completions.create(
                        model="m", messages=[{"role": "user", "content": f"client {i} request {j}"}],
                        max_tokens=8, stream=True)
                    async for chunk in stream:
                        if chunk.choices:
                            text += chunk.choices[0].delta.content or ""
                else:
                    r = await oai.chat.completions.create(
                        model="m", messages=[{"role": "user", "content": f"client {i} request {j}"}], max_tokens=8)
                    text = r.choices[0].message.content
                if not text:
                    errors.append(f"{i}/{j}: empty answer")
            except Exception as e:   # noqa: BLE001 - every failure counts
                errors.append(f"{i}/{j}: {type(e).__name__}: {e}")
        return errors

    async def main():
        oai = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=300)
        try:
            return await asyncio.gather(*(client(i, oai) for i in range(32)))
        finally:
            await oai.close()

    t0 = time.perf_counter()
    errors = [e for errs in asyncio.run(main()) for e in errs]
    took = time.perf_counter() - t0
    figure(f"serve load: 32 clients x 5 requests (8 tokens each, 4 slots) in {took:.1f} s, {len(errors)} errors")
    assert errors == []
    assert server.proc.poll() is None


def test_client_hanging_up_mid_stream_frees_its_slot(tiny_coder_gguf, tmp_path):
    """One slot: a stream asked for 4000 tokens is dropped after its first chunks; llama-server cancels it and
    the next request gets the slot."""
    s = Served(tiny_coder_gguf, tmp_path, parallel=1, threads=1, ctx=8192)
    try:
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "go"}], "max_tokens": 4000,
                           "stream": True}).encode()
        sock = socket.create_connection(("127.0.0.1", s.port))
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: " + str(len(body)).encode()
                     + b"\r\n\r\n" + body)
        got = b""
        while got.count(b"data: ") < 3:
            got += sock.recv(4096)
        sock.close()                                      # hang up mid-stream
        oai = openai.OpenAI(base_url=s.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        r = oai.chat.completions.create(model="m", messages=[{"role": "user", "content": "next"}], max_tokens=4)
        assert r.choices[0].message.content and r.usage.completion_tokens == 4
        # llama-server cancelled the dropped stream's task: its slot stopped long before 4000 tokens
        log = s.llama_log.read_text(errors="replace")
        assert "cancel task" in log
        used = [int(m) for m in re.findall(r"stop processing: n_tokens = (\d+)", log)]
        assert len(used) == 2 and max(used) < 2000, used
    finally:
        s.stop()
