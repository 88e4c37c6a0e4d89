#!/usr/bin/env python3
"""Generation speed through ``reamkit serve`` against llama-bench's ``tg`` on the same GGUF and threads.

    .venv/bin/python bench/serve.py MODEL.gguf [--threads 2] [--tokens 128] [--runs 5]

Prints three figures and their ratios:
  * llama-bench tg<N>: pure decoding, no HTTP, no sampling (the ceiling);
  * llama-server directly: a streamed chat completion, tokens/s from the first to the last token;
  * reamkit serve: the same request through reamkit's layer.
``serve / bench`` is the number to watch (target >= 0.95 on a real model, where a token takes milliseconds);
``serve / llama-server`` isolates reamkit's own layer. Every generation is exactly N tokens (``ignore_eos``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def llama_bench_tg(bench: Path, model: Path, threads: int, tokens: int, runs: int) -> float:
    out = subprocess.run([str(bench), "-m", str(model), "-t", str(threads), "-p", "0", "-n", str(tokens),
                          "-r", str(runs), "-o", "json"], capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout)[0]["avg_ts"])


def streamed_tps(url: str, key: str, tokens: int, runs: int) -> float:
    """Median tokens/s between the first and the last streamed token of a chat completion."""
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "Write a long story."}],
                       "max_tokens": tokens, "ignore_eos": True, "stream": True, "temperature": 0}).encode()
    speeds = []
    for _ in range(runs + 1):                       # the first run warms the prompt cache; not counted
        req = urllib.request.Request(url + "/v1/chat/completions", data=body, headers={
            "Content-Type": "application/json", "Authorization": f"Bearer {key}"})
        first = last = None
        n = 0
        with urllib.request.urlopen(req, timeout=600) as r:
            for line in r:
                if not line.startswith(b"data: {"):
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                    last = time.perf_counter()
                    first = first or last
                    n += 1
        speeds.append((n - 1) / (last - first))
    return statistics.median(speeds[1:])


def request_ms(url: str, key: str, n: int = 40) -> float:
    """Median wall time of a one-token, non-streamed chat completion (the per-request cost of each layer)."""
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}).encode()
    times = []
    for _ in range(n + 2):
        req = urllib.request.Request(url + "/v1/chat/completions", data=body, headers={
            "Content-Type": "application/json", "Authorization": f"Bearer {key}"})
        t0 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=60) as r:
            r.read()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times[2:])


def wait_health(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    sys.exit("server did not become healthy")


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log, "wb"), start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()

    from reamkit.toolchain import find_toolchain

    tc = find_toolchain()
    key, tmp = "bench", Path(tempfile.mkdtemp(prefix="reamkit-bench-"))
    common = ["--ctx", "4096", "--parallel", "1", "--threads", str(args.threads)]

    bench = llama_bench_tg(tc.tool("llama-bench"), args.model, args.threads, args.tokens, args.runs)

    port = free_port()
    direct = start([str(tc.tool("llama-server")), "-m", str(args.model), "--host", "127.0.0.1", "--port", str(port),
                    "--api-key", key, "-c", "4096", "-np", "1", "--kv-unified", "--jinja", "--no-webui",
                    "-t", str(args.threads), "-tb", str(args.threads)], tmp / "llama-server.log")
    try:
        wait_health(f"http://127.0.0.1:{port}", direct)
        raw = streamed_tps(f"http://127.0.0.1:{port}", key, args.tokens, args.runs)
        raw_ms = request_ms(f"http://127.0.0.1:{port}", key)
    finally:
        stop(direct)

    port = free_port()
    served = start([sys.executable, "-m", "reamkit.cli", "serve", str(args.model), "--port", str(port), "--api-key", key,
                    *common, "--log-file", str(tmp / "serve-llama.log")], tmp / "serve.log")
    try:
        wait_health(f"http://127.0.0.1:{port}", served)
        time.sleep(0.5)
        via = streamed_tps(f"http://127.0.0.1:{port}", key, args.tokens, args.runs)
        via_ms = request_ms(f"http://127.0.0.1:{port}", key)
    finally:
        stop(served)

    print(f"model {args.model.name}, {args.threads} threads, {args.tokens} tokens, median of {args.runs} runs")
    print(f"  llama-bench tg{args.tokens}:     {bench:9.1f} tok/s")
    print(f"  llama-server (direct): {raw:9.1f} tok/s   {raw / bench:.3f} of llama-bench")
    print(f"  reamkit serve:         {via:9.1f} tok/s   {via / bench:.3f} of llama-bench, "
          f"{via / raw:.3f} of llama-server")
    print(f"  one-token request:     {raw_ms:.1f} ms direct, {via_ms:.1f} ms through reamkit serve "
          f"(+{via_ms - raw_ms:.1f} ms per request)")
    print(f"serve/bench ratio: {via / bench:.3f} (target >= 0.95)")


if __name__ == "__main__":
    main()
