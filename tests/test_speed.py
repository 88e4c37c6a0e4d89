"""reamkit speed: llama-bench pp/tg tokens/s, load time, peak memory and the share of the memory-bandwidth bound,
on the demo model's quantized GGUFs (tiny test sizes; real figures come from bench runs, not from assertions)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from reamkit.cli import app
from reamkit.errors import ReamkitError
from reamkit.evaluation import speed as speed_mod
from reamkit.evaluation.speed import SpeedOptions, active_bytes_per_token, measure_speed
from reamkit.toolchain import repack_decision

from .report_support import tiny_ladder

OPTS = SpeedOptions(prompt=32, gen=8, repetitions=2, threads=1)


@pytest.fixture(scope="module")
def ladder(tmp_path_factory) -> dict[str, Path]:
    return tiny_ladder(tmp_path_factory.getbasetemp() / "report-ladder")


@pytest.fixture(scope="module")
def measured(ladder, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("speed-run")
    return run_dir, measure_speed(ladder["Q2_K"], run_dir, OPTS)


def test_speed_writes_measured_figures(measured, figure):
    run_dir, r = measured
    figure(f"demo Q2_K, 1 thread: pp32 {r.pp_tps:.0f} t/s, tg8 {r.tg_tps:.0f} t/s, load {r.load_s * 1000:.0f} ms, "
           f"peak RSS {r.peak_rss_bytes / 1e6:.0f} MB, bandwidth {r.bandwidth_gbps:.1f} GB/s, "
           f"{r.bytes_per_token / 1e6:.2f} MB/token -> {r.bandwidth_share:.0%} of the bound")
    assert r.pp_tps > 0 and r.tg_tps > 0
    assert r.threads == 1 and r.cpu.strip()
    assert 0 < r.bandwidth_share <= 1.5
    assert r.bound_tps == pytest.approx(r.bandwidth_gbps * 1e9 / r.bytes_per_token)
    assert 0 < r.load_s < 60
    assert r.peak_rss_bytes > r.bytes_per_token          # the weights a token reads were resident
    assert r.repack == repack_decision().on                # the quantized file ran under the repack decision
    stored = json.loads((run_dir / "speed" / "demo.Q2_K.json").read_text())
    assert stored["tg_tps"] == r.tg_tps and stored["pp_tps"] == r.pp_tps
    assert stored["bandwidth_share"] == r.bandwidth_share and stored["threads"] == 1
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
    assert again.skipped and again.tg_tps == first.tg_tps
    assert out.stat().st_mtime_ns == before

    def no_second_measurement(*a, **k):
        raise AssertionError("bandwidth measured twice in one run folder")

    monkeypatch.setattr(speed_mod, "measure_bandwidth", no_second_measurement)
    other = measure_speed(ladder["Q2_K"], run_dir, SpeedOptions(prompt=16, gen=4, repetitions=1, threads=1))
    assert not other.skipped and other.bandwidth_gbps == first.bandwidth_gbps
    assert json.loads(out.read_text())["options"]["gen"] == 4


def test_cli_prints_the_figures(ladder, tmp_path):
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
