#!/usr/bin/env python3
"""Generation speed through ``reamkit serve`` against llama-bench's ``tg`` on the same GGUF and threads, robust to a
shared machine; and the CPU cost per streamed chunk of reamkit's layer.

    .venv/bin/python bench/serve.py MODEL.gguf [--threads 2] [--tokens 256] [--rounds 7] [--layer-nice 10]
    .venv/bin/python bench/serve.py --chunks-only          # the layer's cost per chunk; no model needed

Three sides decode the same number of tokens after the same number of prompt tokens, greedily, without
speculative decoding, on the same threads (count and CPUs: ``--threads`` N pins each side's llama.cpp to the
first N CPUs):
  * ``bench``  llama-bench ``-p 0 -n N -d P`` (P = the server prompt's token count): decoding only, the ceiling;
  * ``direct`` llama-server started with exactly the command line reamkit serve gives it;
  * ``serve``  ``reamkit serve``: the same llama-server behind reamkit's layer. The layer itself is a separate
    process, left on every CPU as in a deployment: with N below the CPU count it runs beside generation, with
    N equal to it (every core generating) it takes its CPU time from generation.
The servers get one warm-up request each, not counted. The sides then run in rounds (bench, direct, serve;
the order rotates every round), so a neighbour's burst hits all three alike, and each round gives paired
ratios. Streamed speed is (tokens - 1) / (last token - first token) as the client receives them; ``server``
is llama-server's own ``timings.predicted_per_second`` of the same request. Printed: median ratio
``serve / bench`` (target >= 0.95) with its spread over rounds, ``serve / direct`` (reamkit's own layer),
streamed / server speed of the same request (robust to load: both are timed over the same moments), the
1-minute load average seen during the run, and the threads used.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_chunks import chunk_costs  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper and the sea, with many details."


def llama_bench_tg(tool: Path, model: Path, threads: int, tokens: int, depth: int, env: dict, pin) -> float:
    from reamkit.llamacpp.repack import repack_args

    cmd = [str(tool), "-m", str(model), "-t", str(threads), "-p", "0", "-n", str(tokens), "-d", str(depth),
           "-r", "1", "-o", "json", *repack_args("llama-bench")]     # repacking as the servers have it
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env, preexec_fn=pin)
    return float(json.loads(out.stdout)[0]["avg_ts"])


def stream(url: str, key: str, tokens: int) -> tuple[float, float, int, int]:
    """(client tok/s first->last token, llama-server's predicted_per_second, tokens, prompt tokens)."""
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": tokens,
                       "ignore_eos": True, "stream": True, "temperature": 0, "top_k": 1,
                       "stream_options": {"include_usage": True}, "timings_per_token": False}).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", data=body, headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    first = last = None
    n, server_tps, prompt_n = 0, float("nan"), 0
    with urllib.request.urlopen(req, timeout=900) as r:
        for line in r:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                last = time.perf_counter()
                first = first or last
                n += 1
            if chunk.get("timings"):
                server_tps = chunk["timings"].get("predicted_per_second", server_tps)
            if chunk.get("usage"):
                n_usage, prompt_n = chunk["usage"]["completion_tokens"], chunk["usage"]["prompt_tokens"]
                if n_usage != tokens:
                    sys.exit(f"asked for {tokens} tokens, got {n_usage}")
    return (n - 1) / (last - first), server_tps, n, prompt_n


def pin_llama_server(serve_pid: int, cpus: list[int]) -> None:
    """Pin every thread of the llama-server that ``reamkit serve`` started to ``cpus``, as llama-bench and the
    direct server are pinned; reamkit's own layer keeps every CPU, as it does when deployed."""
    import psutil

    servers = [c for c in psutil.Process(serve_pid).children(recursive=True) if "llama-server" in c.name()]
    if len(servers) != 1:
        sys.exit(f"expected one llama-server under reamkit serve, found {len(servers)}")
    for task in Path(f"/proc/{servers[0].pid}/task").iterdir():
        os.sched_setaffinity(int(task.name), cpus)


def wait_health(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
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


class LoadSampler:
    """The 1-minute load average every few seconds while the bench runs."""

    def __init__(self, every: float = 5.0):
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)

    def _run(self, every: float) -> None:
        while not self._stop.is_set():
            self.samples.append(os.getloadavg()[0])
            self._stop.wait(every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def spread(values: list[float]) -> str:
    q = statistics.quantiles(values, n=4) if len(values) >= 2 else [values[0]] * 3
    return f"{statistics.median(values):.3f} (IQR {q[0]:.3f}-{q[2]:.3f}, range {min(values):.3f}-{max(values):.3f})"


def run_model(args) -> None:
    from reamkit.serving.server import ServeOptions, free_port, llama_server_command
    from reamkit.llamacpp.repack import repack_env
    from reamkit.llamacpp.toolchain import find_toolchain

    tc = find_toolchain()
    cpus = sorted(os.sched_getaffinity(0))[: args.threads]
    pin = lambda: os.sched_setaffinity(0, cpus)  # noqa: E731   all three sides on the same CPUs
    key, tmp = "bench", Path(tempfile.mkdtemp(prefix="reamkit-bench-"))
    spec = ["--spec-type", "none"]
    opts = ServeOptions(ctx=4096, parallel=1, threads=args.threads, extra_args=spec)

    port = free_port()
    (tmp / "key").write_text(key)                       # mkdtemp's folder: readable by this user only
    direct_cmd = llama_server_command(tc.tool("llama-server"), args.model, opts, port, str(tmp / "key"), "m")
    procs = {"direct": subprocess.Popen(direct_cmd, stdout=subprocess.DEVNULL, stderr=open(tmp / "direct.log", "wb"),
                                        env={**os.environ, **repack_env("llama-server")}, preexec_fn=pin,
                                        start_new_session=True)}
    urls = {"direct": f"http://127.0.0.1:{port}"}
    port = free_port()
    serve_cmd = [sys.executable, "-m", "reamkit.cli", "serve", str(args.model), "--port", str(port), "--api-key", key,
                 "--ctx", "4096", "--parallel", "1", "--threads", str(args.threads), "--llama-arg=--spec-type",
                 "--llama-arg=none", "--log-file", str(tmp / "serve-llama.log"), "--layer-nice", str(args.layer_nice)]
    procs["serve"] = subprocess.Popen(serve_cmd, stdout=subprocess.DEVNULL, stderr=open(tmp / "serve.log", "wb"),
                                      start_new_session=True)        # the layer runs where the system puts it
    urls["serve"] = f"http://127.0.0.1:{port}"
    results: dict[str, list[float]] = {"bench": [], "direct": [], "serve": [], "direct_server": [], "serve_server": []}
    rounds: list[dict[str, float]] = []
    try:
        for side in ("direct", "serve"):
            wait_health(urls[side], procs[side])
        pin_llama_server(procs["serve"].pid, cpus)
        time.sleep(1.0)
        depth = 0
        for side in ("direct", "serve"):                    # warm-up, not counted
            tps, _, _, depth = stream(urls[side], key, args.tokens)
            print(f"  warm-up {side}: {tps:.1f} tok/s, {depth} prompt tokens", flush=True)
        env = {**os.environ, **repack_env("llama-bench")}
        bench_tool = tc.tool("llama-bench")
        with LoadSampler() as load:
            for r in range(args.rounds):
                order = ["bench", "direct", "serve"]
                order = order[r % 3:] + order[:r % 3]
                got: dict[str, float] = {}
                for side in order:
                    if side == "bench":
                        got["bench"] = llama_bench_tg(bench_tool, args.model, args.threads, args.tokens, depth, env,
                                                      pin)
                    else:
                        got[side], got[f"{side}_server"], _, _ = stream(urls[side], key, args.tokens)
                rounds.append(got)
                for k, v in got.items():
                    results[k].append(v)
                print(f"  round {r + 1}: " + "  ".join(f"{k} {got[k]:.1f}" for k in ("bench", "direct", "serve"))
                      + f"  tok/s  (load {os.getloadavg()[0]:.2f})", flush=True)
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, 15)
                p.wait(30)

    size = args.model.stat().st_size / 2**20
    print(f"\nmodel {args.model.name} ({size:.0f} MiB), {args.threads} threads on CPUs {cpus} "
          f"(reamkit's layer on CPUs {sorted(os.sched_getaffinity(0))} at nice {args.layer_nice}), "
          f"{args.tokens} generated tokens after {depth} prompt tokens, greedy, no speculative decoding, "
          f"{args.rounds} rounds")
    print(f"load average (1 min) during the run: median {statistics.median(load.samples):.2f}, "
          f"range {min(load.samples):.2f}-{max(load.samples):.2f}, on {os.cpu_count()} CPUs")
    for k, label in (("bench", "llama-bench tg"), ("direct", "llama-server (streamed)"),
                     ("direct_server", "llama-server (its timings)"), ("serve", "reamkit serve (streamed)"),
                     ("serve_server", "reamkit serve (llama-server timings)")):
        print(f"  {label:38s} median {statistics.median(results[k]):8.1f} tok/s")
    print(f"serve / bench:  {spread([g['serve'] / g['bench'] for g in rounds])}   (target >= 0.95)")
    print(f"direct / bench: {spread([g['direct'] / g['bench'] for g in rounds])}")
    print(f"serve / direct: {spread([g['serve'] / g['direct'] for g in rounds])}   (reamkit's own layer)")
    print("streamed / llama-server's own timing of the same request (both clocks see the same moments, so a\n"
          "neighbour's burst cancels out; what the HTTP path costs in delivered tokens/s):")
    print(f"  direct: {spread([g['direct'] / g['direct_server'] for g in rounds])}")
    print(f"  serve:  {spread([g['serve'] / g['serve_server'] for g in rounds])}")
    if statistics.median(load.samples) > os.cpu_count():
        print(f"note: the load average ({statistics.median(load.samples):.1f}) exceeded the {os.cpu_count()} CPUs: the "
              f"three sides ran at different moments under different contention, so the ratios between them say "
              f"little; rerun on a quiet machine")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path, nargs="?")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=256, help="generated tokens per request and per llama-bench run")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--layer-nice", type=int, default=10, help="reamkit serve --layer-nice (0: the layer competes "
                    "with generation at the same priority)")
    ap.add_argument("--chunks", type=int, default=2000, help="streamed chunks for the per-chunk cost")
    ap.add_argument("--chunks-only", action="store_true")
    args = ap.parse_args()
    if not args.chunks_only:
        if args.model is None:
            ap.error("give a GGUF, or --chunks-only")
        run_model(args)
    print(f"\nreamkit's layer, CPU per streamed chunk (stub upstream, {args.chunks} chunks, median of 5):")
    for label, us in chunk_costs(args.chunks).items():
        print(f"  {label:44s} {us:7.1f} us")


if __name__ == "__main__":
    main()
