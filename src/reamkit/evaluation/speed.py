"""Speed of a GGUF variant on this machine: prompt processing and generation tokens/s from the pinned
``llama-bench``, load time, peak memory, and generation speed as a share of the memory-bandwidth bound.

Decoding is memory-bound: each generated token reads every weight a token passes through once, so
``tok/s <= bandwidth / bytes read per token``. For a MoE that is the non-expert weights (attention, linear
attention, shared expert, routers, norms, the output head), one row of the token embedding, and ``top_k /
n_expert`` of each routed-expert tensor; the sizes come from the GGUF's own tensor table, top-k and the expert
count from its metadata. KV-cache and recurrent-state reads are left out (llama-bench's ``tg`` starts at depth
0, where they are a small part). The bandwidth is measured once per run folder and thread count with a large
multi-threaded numpy copy (STREAM convention: read + write bytes), and cached in ``speed/bandwidth.json``.

Output: ``RUN_DIR/speed/<variant>.json`` (variant = file name without ``.gguf``) with a manifest beside it; the
same GGUF with the same options is skipped on a rerun.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import ReamkitError, ToolchainError
from ..fsutil import write_json
from ..identity import check_gguf, file_hash
from ..manifest import Manifest, manifest_path_for, read_manifest, stage_key, write_manifest
from ..toolchain import cpu_fingerprint, find_toolchain, last_error_line, repack_args, repack_decision, repack_env

BANDWIDTH_BYTES = 256 * 2**20      # per array; well above any CPU cache
BANDWIDTH_REPEATS = 5              # best of


@dataclass
class SpeedOptions:
    prompt: int = 512              # prompt tokens: llama-bench pp<N>
    gen: int = 128                 # generated tokens: llama-bench tg<N>
    repetitions: int = 5           # llama-bench -r
    threads: int | None = None     # default: every core


@dataclass
class SpeedResult:
    variant: str
    path: Path
    pp_tps: float
    pp_tps_sd: float
    tg_tps: float
    tg_tps_sd: float
    load_s: float                  # model load + context creation (page cache warm)
    peak_rss_bytes: int            # the llama-bench process's peak resident memory
    threads: int
    cpu: str
    bandwidth_gbps: float          # measured here, GB/s (1e9)
    bytes_per_token: int           # weights read per generated token
    bound_tps: float               # bandwidth / bytes_per_token
    bandwidth_share: float         # tg_tps / bound_tps
    n_params: int
    file_bytes: int
    llama_cpp_commit: str
    repack: bool
    options: dict = field(default_factory=dict)
    breakdown: dict = field(default_factory=dict)
    skipped: bool = False

    def as_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        d.pop("skipped")
        return d


def active_bytes_per_token(path: Path) -> dict:
    """Bytes of weights one generated token reads, from the GGUF's tensor table (see the module docstring)."""
    from ..quantization.inventory import _field, open_gguf

    reader = open_gguf(path)
    arch = _field(reader, "general.architecture")
    n_expert = int(_field(reader, f"{arch}.expert_count", 0))
    top_k = int(_field(reader, f"{arch}.expert_used_count", 0)) if n_expert else 0
    experts = shared = embd = other = 0
    n_params = 0
    for t in reader.tensors:
        nb, name = int(t.n_bytes), t.name
        n_params += int(t.n_elements)
        if name == "token_embd.weight":
            embd += nb // max(1, int(t.shape[-1]))            # one row of [n_embd, n_vocab]
        elif "_exps" in name and n_expert:
            experts += nb * top_k // n_expert
        elif "_shexp" in name:
            shared += nb
        else:
            other += nb
    total = experts + shared + embd + other
    return {"total": total, "routed_experts_active": experts, "shared_expert": shared, "token_embd_row": embd,
            "other": other, "n_expert": n_expert, "top_k": top_k, "n_params": n_params}


def measure_bandwidth(threads: int, nbytes: int = BANDWIDTH_BYTES) -> float:
    """Memory bandwidth in GB/s: best of a few multi-threaded copies of ``nbytes`` (read + write counted)."""
    import numpy as np
    from concurrent.futures import ThreadPoolExecutor

    src = np.ones(nbytes // 8)
    dst = np.empty_like(src)
    bounds = np.linspace(0, src.size, threads + 1, dtype=np.int64)
    parts = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]

    def copy(ab):
        np.copyto(dst[ab[0]:ab[1]], src[ab[0]:ab[1]])      # releases the GIL: threads copy in parallel

    best = 0.0
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(copy, parts))                          # touch the pages once
        for _ in range(BANDWIDTH_REPEATS):
            t0 = time.perf_counter()
            list(pool.map(copy, parts))
            best = max(best, 2 * src.nbytes / (time.perf_counter() - t0) / 1e9)
    return best


def cached_bandwidth(run_dir: Path, threads: int) -> float:
    """The bandwidth for ``threads``, measured once per run folder (and CPU) and kept in speed/bandwidth.json."""
    cache = Path(run_dir) / "speed" / "bandwidth.json"
    try:
        data = json.loads(cache.read_text())
    except (OSError, ValueError):
        data = {}
    entry = data.get(str(threads))
    if isinstance(entry, dict) and entry.get("cpu") == cpu_fingerprint() and entry.get("gbps", 0) > 0:
        return float(entry["gbps"])
    gbps = measure_bandwidth(threads)
    data[str(threads)] = {"gbps": gbps, "cpu": cpu_fingerprint(), "method": "numpy copy, read+write bytes",
                          "array_bytes": BANDWIDTH_BYTES}
    write_json(cache, data)
    return gbps


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_bench(gguf: Path, opts: SpeedOptions, threads: int) -> tuple[list[dict], float, int]:
    """Run llama-bench once (``-o json --progress``); returns (rows, load seconds, peak RSS bytes).

    Load time: from llama-bench's "benchmark 1/N: starting" progress line (printed just before it loads the
    model) to the next one (printed once the model and its context are ready). Peak RSS: the child's own
    high-water mark (``VmHWM``), polled until it exits; ``ru_maxrss`` cannot serve, because Linux carries the
    parent's RSS at fork time into it."""
    tool = find_toolchain().tool("llama-bench")
    args = ["-m", gguf, "-p", opts.prompt, "-n", opts.gen, "-r", opts.repetitions, "-t", threads,
            "-o", "json", "--progress"]
    args += repack_args("llama-bench", args)
    stamps: list[tuple[float, str]] = []
    with tempfile.TemporaryFile(mode="w+") as stdout:
        proc = subprocess.Popen([str(tool), *map(str, args)], stdout=stdout, stderr=subprocess.PIPE, text=True,
                                errors="replace", stdin=subprocess.DEVNULL,
                                env={**os.environ, "LLAMA_LOG_COLORS": "0", **repack_env("llama-bench")})

        def read_err():
            for line in proc.stderr:
                stamps.append((time.perf_counter(), line.rstrip("\n")))

        peak = [0]
        done = threading.Event()

        def poll_rss():
            status_file = Path(f"/proc/{proc.pid}/status")
            while not done.wait(0.02):
                peak[0] = max(peak[0], _vm_hwm(status_file))

        reader = threading.Thread(target=read_err, daemon=True)
        poller = threading.Thread(target=poll_rss, daemon=True)
        reader.start()
        poller.start()
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)     # wait for the exit, leave it unreaped
        done.set()
        poller.join()
        _, status = os.waitpid(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        reader.join(timeout=10)
        stdout.seek(0)
        text = stdout.read()
    if proc.returncode != 0:
        why = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
        raise ToolchainError(f"llama-bench failed on {gguf.name} ({why}): "
                             f"{last_error_line(chr(10).join(s for _, s in stamps))}")
    try:
        rows = json.loads(text)
    except ValueError:
        raise ToolchainError(f"llama-bench printed no JSON for {gguf.name}") from None
    start = next((t for t, s in stamps if "benchmark 1/" in s and "starting" in s), None)
    ready = next((t for t, s in stamps if start is not None and t > start and "benchmark 1/" in s
                  and "starting" not in s), None)
    load_s = (ready - start) if start is not None and ready is not None else float("nan")
    return rows, load_s, peak[0]


def _vm_hwm(status_file: Path) -> int:
    try:
        for line in status_file.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def measure_speed(gguf: Path, run_dir: Path, opts: SpeedOptions | None = None) -> SpeedResult:
    """Benchmark one GGUF; the result lands in ``run_dir/speed/<variant>.json`` (skipped when current)."""
    opts = opts or SpeedOptions()
    gguf = Path(gguf)
    if not gguf.is_file():
        raise ReamkitError(f"no such GGUF file: {gguf}")
    if opts.prompt < 1 or opts.gen < 1 or opts.repetitions < 1:
        raise ReamkitError("prompt tokens, generated tokens and repetitions must each be at least 1")
    threads = opts.threads or os.cpu_count() or 1
    if threads < 1:
        raise ReamkitError(f"--threads {threads} must be at least 1")
    check_gguf(gguf)
    act = active_bytes_per_token(gguf)            # also refuses what is not a readable GGUF
    tc = find_toolchain()
    repack = repack_decision().on
    params = {"prompt": opts.prompt, "gen": opts.gen, "repetitions": opts.repetitions,
              "threads": threads, "llama_cpp_commit": tc.commit, "repack": repack, "cpu": cpu_fingerprint()}
    inputs = {"gguf": file_hash(gguf)}
    variant = gguf.name.removesuffix(".gguf")
    out = Path(run_dir) / "speed" / f"{variant}.json"
    current = read_manifest(out, folder=False)
    if out.is_file() and current is not None and current.key == stage_key("speed", inputs, params):
        data = json.loads(out.read_text())
        known = {k: v for k, v in data.items() if k in SpeedResult.__dataclass_fields__}
        return SpeedResult(**{**known, "path": Path(data["path"]), "skipped": True})

    bandwidth = cached_bandwidth(run_dir, threads)
    rows, load_s, rss = run_bench(gguf, opts, threads)
    pp = next((r for r in rows if r.get("n_prompt", 0) > 0 and r.get("n_gen", 0) == 0), None)
    tg = next((r for r in rows if r.get("n_gen", 0) > 0 and r.get("n_prompt", 0) == 0), None)
    if pp is None or tg is None:
        raise ToolchainError(f"llama-bench reported no pp/tg rows for {gguf.name}")
    bound = bandwidth * 1e9 / act["total"]
    res = SpeedResult(
        variant=variant, path=gguf, pp_tps=float(pp["avg_ts"]), pp_tps_sd=float(pp["stddev_ts"]),
        tg_tps=float(tg["avg_ts"]), tg_tps_sd=float(tg["stddev_ts"]), load_s=load_s, peak_rss_bytes=rss,
        threads=int(tg.get("n_threads", threads)), cpu=str(tg.get("cpu_info") or cpu_model()),
        bandwidth_gbps=bandwidth, bytes_per_token=act["total"], bound_tps=bound,
        bandwidth_share=float(tg["avg_ts"]) / bound, n_params=act["n_params"], file_bytes=gguf.stat().st_size,
        llama_cpp_commit=tc.commit, repack=repack,
        options={"prompt": opts.prompt, "gen": opts.gen,
                 "repetitions": opts.repetitions},
        breakdown={k: v for k, v in act.items() if k not in ("total", "n_params")})
    write_json(out, {**res.as_dict(), "variant_fingerprint": inputs["gguf"]})
    write_manifest(manifest_path_for(out, folder=False), Manifest.new(
        "speed", inputs=inputs, params=params, info={"path": str(gguf)}, outputs={"file": out.name}))
    return res
