"""Speed of a GGUF variant on this machine: prompt processing and generation tokens/s from the pinned
``llama-bench`` (median and spread of repeated batches, marked ``busy`` when other processes took the cores it
needed: see :mod:`.llamabench`), load time, peak memory, and generation speed as a share of the
memory-bandwidth bound. Threads default to the cores other processes leave free.

Decoding is memory-bound: each generated token reads every weight a token passes through once, so
``tok/s <= bandwidth / bytes read per token``. For a MoE that is the non-expert weights (attention, linear
attention, shared expert, routers, norms, the output head), one row of the token embedding, and ``top_k /
n_expert`` of each routed-expert tensor; the sizes come from the GGUF's own tensor table, top-k and the expert
count from its metadata, and which tensors are routed or shared experts from the family its architecture names.
KV-cache and recurrent-state reads are left out (llama-bench's ``tg`` starts at depth 0, where they are a small
part). The bandwidth is measured once per run folder and thread count with a large
multi-threaded numpy copy (STREAM convention: read + write bytes), and cached in ``speed/bandwidth.json``.
Where a token's bytes fit in the last-level cache the weights need not come from memory at all, and the share
is "n/a" (``None``).

Output: ``RUN_DIR/speed/<variant>.json`` (variant = file name without ``.gguf``) with a manifest beside it; the
same GGUF with the same options is skipped on a rerun.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import defaults
from ..errors import ReamkitError
from ..fsutil import run_relative, write_json
from ..identity import file_hash
from ..manifest import Manifest, manifest_path_for, read_manifest, stage_key, write_manifest
from ..llamacpp.gguf_file import check_gguf, open_gguf, read_field
from ..llamacpp.repack import cpu_fingerprint, repack_decision
from ..llamacpp.toolchain import find_toolchain
from .cpuload import free_cores, last_level_cache_bytes
from .llamabench import sample

BANDWIDTH_BYTES = 256 * 2**20      # per array; well above any CPU cache
BANDWIDTH_REPEATS = 5              # best of


@dataclass
class SpeedOptions:
    prompt: int = defaults.SPEED_PROMPT            # prompt tokens: llama-bench pp<N>
    gen: int = defaults.SPEED_GEN                  # generated tokens: llama-bench tg<N>
    repetitions: int = defaults.SPEED_REPETITIONS  # llama-bench -r, per batch (see .llamabench)
    threads: int | None = None     # default: the cores other processes leave free
    busy_retries: int = 1          # batches retried when other processes took the cores we need
    busy_wait_s: float = 10.0      # wait before a retry (times the retry number)


@dataclass
class SpeedResult:
    variant: str
    path: Path
    pp_tps: float                  # median of the samples
    pp_tps_sd: float               # robust sd of the samples (1.4826 x MAD)
    tg_tps: float
    tg_tps_sd: float
    load_s: float                  # model load + context creation (page cache warm)
    peak_rss_bytes: int            # the llama-bench process's peak resident memory
    threads: int
    cpu: str
    bandwidth_gbps: float          # measured here, GB/s (1e9)
    bytes_per_token: int           # weights read per generated token
    bound_tps: float               # bandwidth / bytes_per_token
    bandwidth_share: float | None  # tg_tps / bound_tps; None when a token's bytes fit in the last-level cache
    n_params: int
    file_bytes: int
    llama_cpp_commit: str
    repack: bool
    options: dict = field(default_factory=dict)
    breakdown: dict = field(default_factory=dict)
    pp_tps_se: float = 0.0         # standard error of the median
    tg_tps_se: float = 0.0
    pp_spread: float | None = None  # robust sd / median
    tg_spread: float | None = None
    pp_samples: int = 0
    tg_samples: int = 0
    busy: bool = False             # no batch ran while the cores were free: figures measured on a busy machine
    llc_bytes: int | None = None
    batches: list = field(default_factory=list)
    skipped: bool = False

    def as_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        d.pop("skipped")
        return d


def active_bytes_per_token(path: Path) -> dict:
    """Bytes of weights one generated token reads, from the GGUF's tensor table (see the module docstring)."""
    from ..models import gguf_family

    reader = open_gguf(path)
    arch = read_field(reader, "general.architecture")
    family = gguf_family(arch)
    n_expert = int(read_field(reader, f"{arch}.expert_count", 0))
    top_k = int(read_field(reader, f"{arch}.expert_used_count", 0)) if n_expert else 0
    experts = shared = embd = other = 0
    n_params = 0
    for t in reader.tensors:
        nb, name = int(t.n_bytes), t.name
        n_params += int(t.n_elements)
        if name == "token_embd.weight":
            embd += nb // max(1, int(t.shape[-1]))            # one row of [n_embd, n_vocab]
        elif family.gguf_routed(name) and n_expert:
            experts += nb * top_k // n_expert
        elif family.gguf_shared(name):
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


def measure_speed(gguf: Path, run_dir: Path, opts: SpeedOptions | None = None) -> SpeedResult:
    """Benchmark one GGUF; the result lands in ``run_dir/speed/<variant>.json`` (skipped when current)."""
    opts = opts or SpeedOptions()
    gguf = Path(gguf)
    if not gguf.is_file():
        raise ReamkitError(f"no such GGUF file: {gguf}")
    if opts.prompt < 1 or opts.gen < 1 or opts.repetitions < 1:
        raise ReamkitError("prompt tokens, generated tokens and repetitions must each be at least 1")
    if opts.threads is not None and opts.threads < 1:
        raise ReamkitError(f"--threads {opts.threads} must be at least 1")
    check_gguf(gguf)
    act = active_bytes_per_token(gguf)            # also refuses what is not a readable GGUF
    tc = find_toolchain()
    repack = repack_decision().on
    params = {"prompt": opts.prompt, "gen": opts.gen, "repetitions": opts.repetitions,
              "threads": opts.threads or "free", "llama_cpp_commit": tc.commit, "repack": repack,
              "cpu": cpu_fingerprint()}
    inputs = {"gguf": file_hash(gguf)}
    variant = gguf.name.removesuffix(".gguf")
    out = Path(run_dir) / "speed" / f"{variant}.json"
    current = read_manifest(out, folder=False)
    if out.is_file() and current is not None and current.key == stage_key("speed", inputs, params):
        data = json.loads(out.read_text())
        if not data.get("busy"):                  # a figure from a busy machine is measured again on a rerun
            known = {k: v for k, v in data.items() if k in SpeedResult.__dataclass_fields__}
            return SpeedResult(**{**known, "path": Path(run_dir) / data["path"], "skipped": True})

    threads = opts.threads or free_cores()
    bandwidth = cached_bandwidth(run_dir, threads)
    m, rows = sample(gguf, opts.prompt, opts.gen, opts.repetitions, threads, opts.busy_retries, opts.busy_wait_s)
    tg = next((r for r in rows if r.get("n_gen", 0) > 0), {})
    figs = {**m.figures("pp"), **m.figures("tg")}
    bound = bandwidth * 1e9 / act["total"]
    llc = last_level_cache_bytes()
    in_cache = llc is not None and act["total"] <= llc
    res = SpeedResult(
        variant=variant, path=gguf, **figs, load_s=m.load_s, peak_rss_bytes=m.peak_rss,
        threads=int(tg.get("n_threads", threads)), cpu=str(tg.get("cpu_info") or cpu_model()),
        bandwidth_gbps=bandwidth, bytes_per_token=act["total"], bound_tps=bound,
        bandwidth_share=None if in_cache else figs["tg_tps"] / bound, n_params=act["n_params"],
        file_bytes=gguf.stat().st_size, llama_cpp_commit=tc.commit, repack=repack,
        options={"prompt": opts.prompt, "gen": opts.gen, "repetitions": opts.repetitions,
                 "threads": opts.threads or "free"},
        breakdown={k: v for k, v in act.items() if k not in ("total", "n_params")},
        busy=m.busy, llc_bytes=llc, batches=m.batches)
    write_json(out, {**res.as_dict(), "path": run_relative(gguf, run_dir), "variant_fingerprint": inputs["gguf"]})
    write_manifest(manifest_path_for(out, folder=False), Manifest.new(
        "speed", inputs=inputs, params=params, info={"path": str(gguf)}, outputs={"file": out.name}))
    return res
