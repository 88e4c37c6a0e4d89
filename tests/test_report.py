"""reamkit compare / card / fit: the comparison table and plots of a finished tiny run, the model card's numbers
parsed back against compare.json, the derived notes on constructed numbers, and fit's memory arithmetic on the
Qwen3-Coder-Next-REAM figures."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from reamkit.cli import app
from reamkit.errors import ReamkitError
from reamkit.evaluation import FidelityOptions, evaluate_fidelity
from reamkit.evaluation.speed import SpeedOptions, measure_speed
from reamkit.report import compare, derive_notes, fit, fit_lines, pareto, write_card, write_variants
from reamkit.report.compare import RECOMMEND_KLD_MARGIN, fmt
from reamkit.report.families import QWEN3_CODER_NEXT_REAM
from reamkit.report.fit import arch_from_config, kv_cache_bytes, recurrent_state_bytes
from reamkit.serving import ServeOptions
from reamkit.toolchain import pins

from .report_support import tiny_ladder

PASS_AT_1 = {"demo.F16": 0.40, "demo.Q8_0": 0.38, "demo.Q2_K": 0.20}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished tiny run: real fidelity and speed results for three GGUFs of the demo model."""
    ladder = tiny_ladder(tmp_path_factory.getbasetemp() / "report-ladder")
    run_dir = tmp_path_factory.mktemp("report-run")
    variants = [ladder["F16"], ladder["Q8_0"], ladder["Q2_K"]]
    evaluate_fidelity(variants, ladder["F16"], run_dir, FidelityOptions(tokens=254, ctx=256, threads=2))
    for v in variants:
        measure_speed(v, run_dir, SpeedOptions(prompt=32, gen=8, repetitions=1, threads=1))
    # HumanEval on the demo model takes minutes of generation; its result file is written by hand here, in the
    # format reamkit humaneval writes, only for the pass@1 column.
    (run_dir / "humaneval").mkdir()
    for name, p in PASS_AT_1.items():
        (run_dir / "humaneval" / f"{name}.json").write_text(json.dumps({"pass_at_1": p, "n_tasks": 10}))
    # How the variants were made: the compressed checkpoint's config and report (as reamkit compress writes them).
    model = run_dir / "models" / "demo-ream-12e"
    (model / "compression").mkdir(parents=True)
    calib = {"mix": "code=0.7,math=0.3", "samples": 8, "seq_len": 64, "seed": 0}
    (model / "config.json").write_text(json.dumps({"model_type": "qwen3_next", "num_experts": 12, "merge_args": {
        "tool": "reamkit", "method": "ream", "experts_before": 16, "calibration": calib}}))
    (model / "compression" / "report.json").write_text(json.dumps(
        {"method": "ream", "experts_before": 16, "experts_after": 12, "calibration": calib}))
    write_variants(run_dir, {
        "demo.F16": {"path": str(ladder["F16"]), "model": "demo", "method": "none", "experts": 16, "type": "F16"},
        "demo.Q8_0": {"path": str(ladder["Q8_0"]), "model": "demo-ream-12e", "method": "ream", "experts": 12},
        "demo.Q2_K": {"path": str(ladder["Q2_K"]), "model": "demo-ream-12e", "method": "ream", "experts": 12}})
    return run_dir


def test_compare_writes_table_and_plots(run):
    comp = compare(run)
    rep = run / "report"
    for name in ("compare.md", "compare.csv", "compare.json", "size_vs_kld.png", "size_vs_pass.png"):
        assert (rep / name).is_file() and (rep / name).stat().st_size > 0, name
    assert (rep / "size_vs_kld.png").read_bytes()[:4] == b"\x89PNG"
    rows = {r["variant"]: r for r in json.loads((rep / "compare.json").read_text())["rows"]}
    assert set(rows) == set(PASS_AT_1)
    assert [r["variant"] for r in comp.rows] == ["demo.Q2_K", "demo.Q8_0", "demo.F16"]     # by size
    fid = json.loads((run / "fidelity" / "demo.Q2_K.json").read_text())["sets"]
    q2 = rows["demo.Q2_K"]
    assert q2["kld_mean"] == pytest.approx((fid["code"]["kld_mean"] + fid["math"]["kld_mean"]) / 2)
    assert q2["ppl_code"] == fid["code"]["ppl"]
    gguf = Path(q2["path"])
    from gguf import GGUFReader

    n_params = sum(int(t.n_elements) for t in GGUFReader(str(gguf)).tensors)
    assert q2["bpw"] == pytest.approx(gguf.stat().st_size * 8 / n_params)
    assert 2.5 < q2["bpw"] < 4.5 and 15 < rows["demo.F16"]["bpw"] < 17
    assert q2["tg_tps"] == json.loads((run / "speed" / "demo.Q2_K.json").read_text())["tg_tps"]
    assert (q2["method"], q2["type"], q2["pass_at_1"]) == ("ream", "Q2_K", 0.20)
    assert rows["demo.F16"]["method"] == "none"
    assert q2["kld_mean"] > rows["demo.Q8_0"]["kld_mean"]
    assert "Pareto" in q2["notes"] and "smallest" in q2["notes"] and "best KLD" in rows["demo.F16"]["notes"]
    with open(rep / "compare.csv") as f:
        table = {r["variant"]: r for r in csv.DictReader(f)}
    assert float(table["demo.Q2_K"]["kld_mean"]) == q2["kld_mean"]
    md = (rep / "compare.md").read_text()
    assert "KLD (mean of code + math)" in md and f"| {fmt('kld_mean', q2['kld_mean'])} |" in md


def test_missing_measurements_show_as_na(run, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(run / "fidelity", partial / "fidelity")
    comp = compare(partial, plots=False)
    row = comp.row("demo.Q8_0")
    assert row["pass_at_1"] is None and row["tg_tps"] is None and row["method"] == "unknown"
    assert row["type"] == "Q8_0"                                     # from the file name
    lines = [ln for ln in (partial / "report" / "compare.md").read_text().splitlines() if ln.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    cells = dict(zip(header, (c.strip() for c in next(ln for ln in lines if "demo.Q8_0" in ln).strip("|").split("|"))))
    assert [cells[c] for c in ("pass@1", "pp t/s", "tg t/s")] == ["n/a"] * 3
    assert float(cells["KLD (mean of code + math)"]) == pytest.approx(row["kld_mean"], rel=1e-3)
    assert "recommended" in " ".join(n for r in comp.rows for n in r["notes"])


def _card_table(text: str) -> dict[str, dict[str, str]]:
    lines = [ln for ln in text.splitlines() if ln.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for ln in lines[1:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        row = dict(zip(header, cells))
        rows[row["Type"]] = row
    return rows


def test_card_numbers_are_the_measured_ones(run):
    text = write_card(run, model_name="Demo-Coder-REAM").read_text()
    rows = {r["type"]: r for r in json.loads((run / "report" / "compare.json").read_text())["rows"]}
    table = _card_table(text)
    assert set(table) == {"F16", "Q8_0", "Q2_K"}
    for t, cells in table.items():
        r = rows[t]
        link = os.path.relpath(run / r["path"], run / "report")         # the run's file, seen from the card
        assert cells["Link"] == f"[GGUF]({link})" and (run / "report" / link).is_file()
        for col, key, rel in (("Size/GB", "size_gb", 5e-3), ("bits/weight", "bpw", 5e-3), ("KLD", "kld_mean", 1e-3),
                              ("same top-1 %", "top1_pct", 1e-3), ("pass@1", "pass_at_1", 1e-3),
                              ("pp t/s", "pp_tps", 5e-3), ("tg t/s", "tg_tps", 5e-3)):
            assert float(cells[col]) == pytest.approx(r[key], rel=rel, abs=1e-9), (t, col)
        assert cells["Notes"] == ", ".join(r["notes"])
    assert "# Demo-Coder-REAM GGUF" in text and "| Link | Method | Type | Size/GB |" in text
    assert "REAM, 16 -> 12 routed experts per layer, calibration code=0.7,math=0.3, 8 x 64 tokens" in text
    assert f"llama.cpp commit `{pins().llama_cpp_commit}`" in text
    for r in rows.values():
        assert f"reamkit serve {r['file']}" in text and f"llama-server -m {r['file']}" in text


def test_card_says_when_compression_is_unknown(run, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(run / "fidelity", bare / "fidelity")
    text = write_card(bare, repo="org/Demo-GGUF").read_text()
    assert "Compression: **unknown**" in text
    assert "https://huggingface.co/org/Demo-GGUF/resolve/main/demo.Q2_K.gguf" in text
    (bare / "run.json").write_text(json.dumps({"method": "reap", "calibration": "code=1.0"}))
    assert "REAP" in write_card(bare).read_text() and "calibration code=1.0" in write_card(bare).read_text()


def _row(name, size, kld, tg=None, pp=None, p1=None):
    return {"variant": f"m.{name}", "size_gb": size, "kld_mean": kld, "tg_tps": tg, "pp_tps": pp, "pass_at_1": p1}


def test_notes_follow_the_numbers():
    rows = [_row("Q2_K", 22.2, 0.30, tg=30), _row("Q3_K_M", 29.0, 0.10, tg=25), _row("Q3_K_L", 31.4, 0.12, tg=24),
            _row("Q4_K_M", 36.7, 0.03, tg=20), _row("Q6_K", 49.7, 0.006, tg=15), _row("Q8_0", 64.3, 0.001, tg=12)]
    notes = derive_notes(rows)
    assert pareto({r["variant"]: (r["size_gb"], r["kld_mean"]) for r in rows}) == [
        "m.Q2_K", "m.Q3_K_M", "m.Q4_K_M", "m.Q6_K", "m.Q8_0"]
    assert "Pareto" not in notes["m.Q3_K_L"]                       # larger and worse than Q3_K_M
    # steps along the front: (0.30-0.10)/6.8 = 0.0294 per GB is the steepest
    assert notes["m.Q3_K_M"][1] == "best KLD drop per GB (vs Q2_K)"
    assert "recommended" in notes["m.Q4_K_M"]                       # smallest within 0.05 of 0.001
    assert sum("recommended" in n for n in notes.values()) == 1
    assert "fastest tg" in notes["m.Q2_K"] and "best KLD" in notes["m.Q8_0"]
    # pass@1 far below the best disqualifies the KLD choice: the next Pareto variant is recommended
    rows[3]["pass_at_1"], rows[4]["pass_at_1"], rows[5]["pass_at_1"] = 0.50, 0.61, 0.62
    notes = derive_notes(rows)
    assert "recommended" in notes["m.Q6_K"] and "best pass@1" in notes["m.Q8_0"]
    # a wider gap between best and the rest moves the recommendation up the front
    rows = [_row("a", 1, 0.001 + RECOMMEND_KLD_MARGIN + 0.01), _row("b", 2, 0.001)]
    assert derive_notes(rows)["m.b"] == ["Pareto", "best KLD drop per GB (vs m.a)", "best KLD", "recommended"]


def test_kv_and_state_arithmetic_by_hand():
    arch = arch_from_config(QWEN3_CODER_NEXT_REAM.config)
    assert (arch.n_layers, arch.n_full_attn, arch.n_linear) == (48, 12, 36)
    # 2 (K and V) x 12 full-attention layers x 2 KV heads x 256 head dim x 32768 tokens x 2 bytes (f16)
    assert kv_cache_bytes(arch, 32768) == 2 * 12 * 2 * 256 * 32768 * 2 == 805_306_368
    # 36 linear layers x (conv (4-1) x (2*16*128 + 32*128) + ssm 32 heads x 128 x 128) x 4 bytes (F32)
    assert recurrent_state_bytes(arch) == 36 * (3 * 8192 + 32 * 128 * 128) * 4 == 79_036_416
    assert recurrent_state_bytes(arch, 4) == 4 * 79_036_416                          # one state per slot
    assert kv_cache_bytes(arch, 32768, 34 / 32) == 2 * 12 * 2 * 256 * 32768 * 34 // 32     # q8_0 cache


def test_fit_picks_by_memory_and_refuses_when_nothing_fits():
    model = "Qwen3-Coder-Next-REAM"
    small = fit(model, "32GB", gpu_memory="8GB", context="32k")   # 8 GB GPU: experts of most layers in RAM
    mid = fit(model, "24GB", context="32k")
    big = fit(model, "64GB", context="32k")
    picks = [r.choice.candidate.type for r in (small, mid, big)]
    assert picks == ["Q4_K_M", "Q2_K", "Q6_K"] and len(set(picks)) == 3
    need = mid.choice
    # reamkit serve's 4 slots (unified KV cache over the whole context) each hold a recurrent state
    assert mid.parallel == ServeOptions().parallel == 4
    assert need.total == int(22.2e9) + 805_306_368 + 4 * 79_036_416 + need.overhead <= 24e9
    assert not next(n for n in big.needs if n.candidate.type == "Q8_0").fits      # 64.3 GB of weights alone
    assert small.choice.n_cpu_moe and 0 < small.choice.n_cpu_moe < 48
    lines = fit_lines(mid)
    assert any("12 attention layers x 2 KV heads x (256 + 256) x 32768 tokens" in ln for ln in lines)
    assert lines[-1].startswith("pick: Q2_K") and " -c 32768 -np 4 --kv-unified" in lines[-1]
    assert any("recurrent state (36 layers x 4 slots) 0.32 GB" in ln for ln in lines)
    one = fit(model, "24GB", context="32k", parallel=1)
    assert one.choice.total == need.total - 3 * 79_036_416 and " -np 1 " in fit_lines(one)[-1]
    with pytest.raises(ReamkitError, match=r"nothing fits in 8 GB of RAM: the smallest variant, Q2_K, needs 23\.\d GB"):
        fit(model, "8GB")
    r = CliRunner().invoke(app, ["fit", model, "--memory", "8GB"])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1


def test_fit_on_a_run_folder_prefers_measured_fidelity(run):
    res = fit(run, "16GB", context="4k")
    assert res.choice.candidate.name == "demo.F16"                 # the lowest KLD, and it fits
    r = CliRunner().invoke(app, ["fit", str(run), "--memory", "16GB", "--context", "4k"])
    assert r.exit_code == 0 and "pick: demo.F16" in r.stdout


def test_cli_compare_and_card(run):
    r = CliRunner().invoke(app, ["compare", str(run)])
    assert r.exit_code == 0, r.output
    assert "demo.Q2_K" in r.stdout and "compare.md" in r.stdout
    r = CliRunner().invoke(app, ["card", str(run), "--model-name", "X"])
    assert r.exit_code == 0 and (run / "report" / "README.md").is_file()


@pytest.mark.parametrize("case", ["missing-folder", "no-results", "missing-gguf", "bad-variants", "bad-memory",
                                  "unknown-model"])
def test_bad_input_is_one_line(case, run, tmp_path):
    if case == "missing-folder":
        call, msg = (lambda: compare(tmp_path / "nope")), "no such run folder"
    elif case == "no-results":
        (tmp_path / "empty" / "fidelity").mkdir(parents=True)
        call, msg = (lambda: write_card(tmp_path / "empty")), "holds no results"
    elif case == "missing-gguf":
        gone = tmp_path / "gone"
        shutil.copytree(run / "speed", gone / "speed")
        for f in (gone / "speed").glob("demo.*.json"):
            f.write_text(json.dumps({**json.loads(f.read_text()), "path": str(tmp_path / f.name)}))
        comp = compare(gone, plots=False)                         # sizes still come from the results
        assert comp.row("demo.Q2_K")["size_gb"] and comp.row("demo.Q2_K")["tg_tps"]
        call, msg = (lambda: fit(gone, "16GB")), "none of the GGUF files"
    elif case == "bad-variants":
        (tmp_path / "bv").mkdir()
        (tmp_path / "bv" / "variants.json").write_text(json.dumps({"x": {"method": "ream"}}))
        call, msg = (lambda: compare(tmp_path / "bv")), "not a valid variants file"
    elif case == "bad-memory":
        call, msg = (lambda: fit("Qwen3-Coder-Next-REAM", "lots")), "cannot read the memory size"
    else:
        call, msg = (lambda: fit("Llama-9000", "24GB")), "neither a run folder nor a built-in model"
    with pytest.raises(ReamkitError, match=msg):
        call()
    if case in ("missing-folder", "no-results"):
        folder = tmp_path / ("nope" if case == "missing-folder" else "empty")
        r = CliRunner().invoke(app, ["compare", str(folder)])
        assert r.exit_code == 2 and msg in r.output and len(r.output.strip().splitlines()) == 1


def test_a_tie_everywhere_crowns_nobody():
    rows = [_row("Q2_K", 22.2, 0.30, p1=0.0), _row("Q4_K_M", 40.0, 0.05, p1=0.0)]
    notes = derive_notes(rows)
    assert not any("best pass@1" in n for n in notes.values())
    assert "smallest" in notes["m.Q2_K"]
