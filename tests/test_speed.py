"""reamkit speed: llama-bench pp/tg tokens/s, load time, peak memory and the share of the memory-bandwidth bound,
on the demo model's quantized GGUFs (tiny test sizes; real figures come from bench runs, not from assertions)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from reamkit.cli import app
from reamkit.errors import ReamkitError
from reamkit.evaluation import speed as speed_mod
from reamkit.evaluation.cpuload import Load
from reamkit.evaluation.speed import SpeedOptions, active_bytes_per_token, measure_speed
from reamkit.llamacpp.repack import repack_decision

from .report_support import tiny_ladder

OPTS = SpeedOptions(prompt=32, gen=8, repetitions=2, threads=1, busy_wait_s=0.5)


@pytest.fixture(scope="module")
def ladder(tmp_path_factory) -> dict[str, Path]:
    return tiny_ladder(tmp_path_factory.getbasetemp() / "report-ladder")


@pytest.fixture(scope="module")
def measured(ladder, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("speed-run")
    return run_dir, measure_speed(ladder["Q2_K"], run_dir, OPTS)


def test_speed_writes_measured_figures(measured, figure):
    run_dir, r = measured
    figure(f"demo Q2_K, 1 thread: pp32 {r.pp_tps:.0f} t/s, tg8 {r.tg_tps:.0f} ± {r.tg_tps_se:.1f} t/s (spread "
           f"{r.tg_spread:.0%}, {r.tg_samples} samples, busy {r.busy}), load {r.load_s * 1000:.0f} ms, "
           f"peak RSS {r.peak_rss_bytes / 1e6:.0f} MB, bandwidth {r.bandwidth_gbps:.1f} GB/s, "
           f"{r.bytes_per_token / 1e6:.2f} MB/token in a {r.llc_bytes / 2**20:.0f} MiB last-level cache")
    assert r.pp_tps > 0 and r.tg_tps > 0
    assert r.threads == 1 and r.cpu.strip()
    assert r.tg_samples >= 2 and r.tg_tps_se > 0 and r.tg_spread is not None and r.batches
    assert r.llc_bytes and r.bytes_per_token <= r.llc_bytes      # a demo token's weights fit in the cache ...
    assert r.bandwidth_share is None                              # ... so the bandwidth bound does not apply
    assert r.bound_tps == pytest.approx(r.bandwidth_gbps * 1e9 / r.bytes_per_token)
    assert 0 < r.load_s < 60
    assert r.peak_rss_bytes > r.bytes_per_token          # the weights a token reads were resident
    assert r.repack == repack_decision().on                # the quantized file ran under the repack decision
    stored = json.loads((run_dir / "speed" / "demo.Q2_K.json").read_text())
    assert stored["tg_tps"] == r.tg_tps and stored["pp_tps"] == r.pp_tps
    assert stored["bandwidth_share"] == r.bandwidth_share and stored["threads"] == 1
    assert stored["busy"] == r.busy and stored["tg_tps_se"] == r.tg_tps_se
    assert (run_dir / "speed" / "demo.Q2_K.json.manifest.json").is_file()


def test_bytes_per_token_counts_top_k_experts(ladder):
    """F16 demo model (4 layers, 16 experts of 256 x 256 x 3, top-2): the routed part by hand."""
    act = active_bytes_per_token(ladder["F16"])
    assert (act["n_expert"], act["top_k"]) == (16, 2)
    assert act["routed_experts_active"] == 4 * 3 * 256 * 256 * 16 * 2 * 2 // 16
    assert act["shared_expert"] == 4 * (3 * 256 * 256 * 2 + 256 * 4)   # gate/up/down F16 + its F32 gate vector
    assert act["token_embd_row"] == 256 * 2                          # one F16 row of the embedding
    assert act["total"] == sum(act[k] for k in ("routed_experts_active", "shared_expert", "token_embd_row", "other"))
    assert act["total"] < ladder["F16"].stat().st_size / 2


def test_rerun_skips_and_bandwidth_is_measured_once(measured, ladder, monkeypatch):
    run_dir, first = measured
    out = run_dir / "speed" / "demo.Q2_K.json"
    before = out.stat().st_mtime_ns
    again = measure_speed(ladder["Q2_K"], run_dir, OPTS)
    if first.busy:                          # measured on a busy machine: a rerun measures again
        assert not again.skipped and out.stat().st_mtime_ns != before
    else:
        assert again.skipped and again.tg_tps == first.tg_tps
        assert out.stat().st_mtime_ns == before

    def no_second_measurement(*a, **k):
        raise AssertionError("bandwidth measured twice in one run folder")

    monkeypatch.setattr(speed_mod, "measure_bandwidth", no_second_measurement)
    other = measure_speed(ladder["Q2_K"], run_dir, SpeedOptions(prompt=16, gen=4, repetitions=1, threads=1,
                                                                busy_retries=0))
    assert not other.skipped and other.bandwidth_gbps == first.bandwidth_gbps
    assert json.loads(out.read_text())["options"]["gen"] == 4


@pytest.mark.parametrize("others", [0.0, 5.0])
def test_only_a_clean_figure_is_kept_on_a_rerun(others, ladder, tmp_path, monkeypatch):
    """The machine's load as measured decides: quiet -> kept and skipped on a rerun; busy -> measured again."""
    from reamkit.evaluation import llamabench
    from reamkit.evaluation.cpuload import Load

    monkeypatch.setattr(llamabench.CpuWatch, "stop", lambda self, children_s=0.0: Load(1.0, others, 1.0, 2))
    opts = SpeedOptions(prompt=16, gen=4, repetitions=3, threads=1, busy_retries=1, busy_wait_s=0.01)
    first = measure_speed(ladder["Q2_K"], tmp_path, opts)
    assert first.busy == (others > 0) and len(first.batches) >= (2 if others else 1)
    again = measure_speed(ladder["Q2_K"], tmp_path, opts)
    assert again.skipped == (others == 0)


def test_cli_prints_the_figures(ladder, tmp_path, monkeypatch):
    from reamkit.evaluation import llamabench
    from reamkit.evaluation.cpuload import Load

    # the machine measured as quiet (a busy figure is measured again on a rerun, never "up to date")
    monkeypatch.setattr(llamabench.CpuWatch, "stop", lambda self, children_s=0.0: Load(1.0, 0.0, 1.0, 2))
    args = ["speed", str(ladder["Q2_K"]), "-o", str(tmp_path), "--threads", "1", "--prompt", "16", "--gen", "4",
            "--repetitions", "1"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "demo.Q2_K: pp16" in r.stdout and "of the" in r.stdout and "(up to date)" not in r.stdout
    assert (tmp_path / "speed" / "demo.Q2_K.json").is_file()
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and "(up to date)" in again.stdout


@pytest.mark.parametrize("case", ["missing", "not-gguf", "zero-tokens"])
def test_bad_input_is_one_line(case, ladder, tmp_path):
    gguf, opts, msg = ladder["Q2_K"], OPTS, ""
    if case == "missing":
        gguf, msg = tmp_path / "nope.gguf", "no such GGUF file"
    elif case == "not-gguf":
        gguf = tmp_path / "x.gguf"
        gguf.write_bytes(b"PK\x03\x04 not a gguf")
        msg = "is not a GGUF file"
    else:
        opts, msg = SpeedOptions(prompt=0), "at least 1"
    with pytest.raises(ReamkitError, match=msg):
        measure_speed(gguf, tmp_path / "run", opts)
    assert not (tmp_path / "run" / "speed").exists()
    r = CliRunner().invoke(app, ["speed", str(gguf), "-o", str(tmp_path / "run")] +
                           (["--prompt", "0"] if case == "zero-tokens" else []))
    assert r.exit_code == 2 and "Traceback" not in r.output


def _hogs(n: int, seconds: float = 120.0) -> list[subprocess.Popen]:
    """Busy loops in n child processes, each ending by itself after ``seconds`` (the test stops them first)."""
    code = f"import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    pass\n"
    return [subprocess.Popen([sys.executable, "-c", code]) for _ in range(n)]


def test_a_busy_machine_is_retried_then_marked(ladder, tmp_path, figure):
    """Every core taken by busy loops: the batches are retried and the figure is marked busy, never clean."""
    cores = os.cpu_count() or 1
    hogs = _hogs(cores)
    try:
        r = measure_speed(ladder["Q2_K"], tmp_path, SpeedOptions(prompt=16, gen=4, repetitions=2, threads=cores,
                                                                  busy_retries=1, busy_wait_s=0.2))
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    figure(f"{cores} busy loops on {cores} cores: tg {r.tg_tps:.0f} t/s, busy {r.busy}, others took "
           + ", ".join(f"{b['others_cores']:.2f}" for b in r.batches) + " cores per batch")
    assert r.busy
    assert len(r.batches) == 2 and all(b["busy"] for b in r.batches)          # tried, waited, tried again
    assert all(b["others_cores"] > 0.5 for b in r.batches)
    assert json.loads((tmp_path / "speed" / "demo.Q2_K.json").read_text())["busy"] is True
    from reamkit.report import compare

    comp = compare(tmp_path, plots=False)
    row = comp.row("demo.Q2_K")
    assert row["speed_busy"] is True and not any("fastest" in n for n in row["notes"])
    md = (tmp_path / "report" / "compare.md").read_text()
    assert "busy" in next(ln for ln in md.splitlines() if ln.startswith("| demo.Q2_K"))


def test_bandwidth_share_where_weights_come_from_memory(ladder, tmp_path, monkeypatch):
    """Where a token's bytes exceed the last-level cache, the share of the bandwidth bound is given."""
    monkeypatch.setattr(speed_mod, "last_level_cache_bytes", lambda: 4096)
    r = measure_speed(ladder["Q2_K"], tmp_path, SpeedOptions(prompt=16, gen=4, repetitions=1, threads=1,
                                                              busy_retries=0))
    assert r.bandwidth_share == pytest.approx(r.tg_tps / r.bound_tps) and r.bandwidth_share > 0


def test_threads_default_to_the_free_cores():
    """Busy loops on every core: the default thread count is what they leave free (one), not every core."""
    from reamkit.evaluation.cpuload import free_cores

    hogs = _hogs(os.cpu_count() or 1, seconds=30)
    try:
        free = free_cores(sample_s=1.0)
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    assert free == 1


def test_a_hog_beside_the_default_threads_is_busy(ladder, tmp_path):
    """Busy loops on every core and the thread count left to its default (the free cores, so one): the loops
    still want the core the benchmark runs on, so the figure is retried and marked busy, never clean."""
    cores = os.cpu_count() or 1
    hogs = _hogs(cores)
    try:
        r = measure_speed(ladder["Q2_K"], tmp_path, SpeedOptions(prompt=16, gen=4, repetitions=2,
                                                                  busy_retries=1, busy_wait_s=0.2))
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    assert r.busy and len(r.batches) == 2 and all(b["busy"] for b in r.batches)
    assert all(b["runnable"] > b["n_cpus"] for b in r.batches)


@pytest.mark.parametrize("others, runnable, threads, busy", [
    (0.05, 2.1, 2, False),      # quiet: our two threads are the run queue
    (1.10, 3.0, 1, True),       # a loop kept to the free core by CPU time, but our thread waited for its CPU
    (1.10, 2.1, 1, False),      # the other core's work, no waiting
    (0.05, None, 2, False),     # no run-queue samples: CPU time alone decides
    (0.90, None, 2, True),
])
def test_busy_counts_the_cpu_time_and_the_run_queue(others, runnable, threads, busy):
    assert Load(1.0, others, 1.0, 2, runnable).busy(threads) is busy
