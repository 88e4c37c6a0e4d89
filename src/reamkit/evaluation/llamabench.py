"""Running the pinned ``llama-bench`` until its figures can be trusted.

One *batch* is one llama-bench call (``-r repetitions`` runs of the pp and tg tests). Batches are repeated
until each test's spread is at most :data:`SPREAD_TARGET` (at least :data:`MIN_SAMPLES` samples) or
:data:`MAX_CLEAN_BATCHES` is reached. During every batch the CPU time other processes took is measured
(:mod:`.cpuload`); a batch during which they took cores the benchmark needed is set aside, the stage waits
(longer each time) and tries again, up to ``busy_retries`` times. Figures come from the clean batches; only when
there are none are the busy batches' figures reported, marked ``busy``.

Figures: the median of the samples; the spread is the robust relative standard deviation
(``1.4826 x MAD / median``); the standard error of the median is ``1.2533 x robust sd / sqrt(n)``.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ToolchainError
from ..llamacpp.tools import run_tool
from .cpuload import CpuWatch, Load

SPREAD_TARGET = 0.05        # robust relative sd of the samples
MIN_SAMPLES = 3
MAX_CLEAN_BATCHES = 4


@dataclass
class Batch:
    rows: list[dict]
    load_s: float
    peak_rss: int
    load: Load
    busy: bool


@dataclass
class Measured:
    pp: list[float]
    tg: list[float]
    load_s: float
    peak_rss: int
    busy: bool
    batches: list[dict] = field(default_factory=list)     # per batch: others' CPU, busy, samples

    def figures(self, key: str) -> dict:
        xs = self.pp if key == "pp" else self.tg
        med = statistics.median(xs)
        rsd = robust_sd(xs)
        return {f"{key}_tps": med, f"{key}_tps_sd": rsd, f"{key}_spread": rsd / med if med else None,
                f"{key}_tps_se": 1.2533 * rsd / math.sqrt(len(xs)), f"{key}_samples": len(xs)}


def robust_sd(xs: list[float]) -> float:
    if len(xs) < 2:
        return 0.0
    med = statistics.median(xs)
    mad = statistics.median(abs(x - med) for x in xs)
    return 1.4826 * mad if mad > 0 else statistics.stdev(xs)


def spread(xs: list[float]) -> float:
    med = statistics.median(xs) if xs else 0.0
    return robust_sd(xs) / med if med > 0 else math.inf


def _test_samples(rows: list[dict], gguf: Path) -> tuple[list[float], list[float]]:
    pp = next((r for r in rows if r.get("n_prompt", 0) > 0 and r.get("n_gen", 0) == 0), None)
    tg = next((r for r in rows if r.get("n_gen", 0) > 0 and r.get("n_prompt", 0) == 0), None)
    if pp is None or tg is None:
        raise ToolchainError(f"llama-bench reported no pp/tg rows for {gguf.name}")
    return ([float(x) for x in pp.get("samples_ts") or [pp["avg_ts"]]],
            [float(x) for x in tg.get("samples_ts") or [tg["avg_ts"]]])


def sample(gguf: Path, prompt: int, gen: int, repetitions: int, threads: int, busy_retries: int,
           busy_wait_s: float) -> tuple[Measured, list[dict]]:
    """Batches until the spread is small or a cap is reached (rules in the module docstring); also returns the
    last batch's rows (llama-bench's own fields: threads, CPU)."""
    clean: list[Batch] = []
    busy: list[Batch] = []
    last_rows: list[dict] = []
    while len(clean) < MAX_CLEAN_BATCHES:
        watch = CpuWatch()
        rows, load_s, rss, child_s = run_bench(gguf, prompt, gen, repetitions, threads)
        load = watch.stop(child_s)
        b = Batch(rows, load_s, rss, load, load.busy(threads))
        last_rows = rows
        if b.busy:
            busy.append(b)
            if len(busy) > busy_retries:
                break
            time.sleep(busy_wait_s * len(busy))        # later in the run: the other work may have finished
            continue
        clean.append(b)
        pp = [x for c in clean for x in _test_samples(c.rows, gguf)[0]]
        tg = [x for c in clean for x in _test_samples(c.rows, gguf)[1]]
        if len(tg) >= MIN_SAMPLES and spread(pp) <= SPREAD_TARGET and spread(tg) <= SPREAD_TARGET:
            break
    use = clean or busy
    pp = [x for b in use for x in _test_samples(b.rows, gguf)[0]]
    tg = [x for b in use for x in _test_samples(b.rows, gguf)[1]]
    loads = [b.load_s for b in use if not math.isnan(b.load_s)]
    log = [{**b.load.as_dict(), "busy": b.busy, "tg_samples": _test_samples(b.rows, gguf)[1]}
           for b in [*clean, *busy]]
    return Measured(pp=pp, tg=tg, load_s=statistics.median(loads) if loads else float("nan"),
                    peak_rss=max(b.peak_rss for b in use), busy=not clean, batches=log), last_rows


def run_bench(gguf: Path, prompt: int, gen: int, repetitions: int, threads: int) -> tuple[list[dict], float, int,
                                                                                          float]:
    """Run llama-bench once (``-o json --progress``); returns (rows, load seconds, peak RSS bytes, its CPU s).

    Load time: from llama-bench's "benchmark 1/N: starting" progress line (printed just before it loads the
    model) to the next one (printed once the model and its context are ready). Peak RSS: the child's own
    high-water mark (``VmHWM``), polled until it exits; ``ru_maxrss`` cannot serve, because Linux carries the
    parent's RSS at fork time into it. CPU seconds: the child's, from ``wait4``."""
    args = ["-m", gguf, "-p", prompt, "-n", gen, "-r", repetitions, "-t", threads, "-o", "json", "--progress"]
    stamps: list[tuple[float, str]] = []
    done = run_tool("llama-bench", args, on_line=lambda line: stamps.append((time.perf_counter(), line)),
                    separate_stdout=True, measure_memory=True, on=gguf.name)
    text = done.stdout
    try:
        rows = json.loads(text)
    except ValueError:
        raise ToolchainError(f"llama-bench printed no JSON for {gguf.name}") from None
    start = next((t for t, s in stamps if "benchmark 1/" in s and "starting" in s), None)
    ready = next((t for t, s in stamps if start is not None and t > start and "benchmark 1/" in s
                  and "starting" not in s), None)
    load_s = (ready - start) if start is not None and ready is not None else float("nan")
    return rows, load_s, done.peak_rss, done.cpu_s
