"""reamkit compare / card / fit: the comparison table and plots of a finished tiny run, the model card's numbers
parsed back against compare.json, the derived notes on constructed numbers, and fit's memory arithmetic on the
Qwen3-Coder-Next-REAM figures."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from reamkit.cli import app
from reamkit.errors import ReamkitError
from reamkit.evaluation import FidelityOptions, evaluate_fidelity
from reamkit.evaluation.speed import SpeedOptions, measure_speed
from reamkit.report import compare, derive_notes, fit, fit_lines, pareto, write_card, write_variants
from reamkit.evaluation.stats import Z, sig
from reamkit.report.compare import RECOMMEND_KLD_MARGIN, fmt
from reamkit.report.families import QWEN3_CODER_NEXT_REAM
from reamkit.report.fit import arch_from_config, kv_cache_bytes, recurrent_state_bytes
from reamkit.serving import ServeOptions
from reamkit.llamacpp.toolchain import pins
from reamkit.llamacpp.tools import run_tool

from .report_support import tiny_ladder

PASS_AT_1 = {"demo.F16": 0.40, "demo.Q8_0": 0.38, "demo.Q2_K": 0.20}
N_TASKS = 100
FIDELITY = FidelityOptions(tokens=635, ctx=256, threads=2)       # 5 chunks of 127 scored tokens per set


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished tiny run: real fidelity and speed results for three GGUFs of the demo model."""
    ladder = tiny_ladder(tmp_path_factory.getbasetemp() / "report-ladder")
    run_dir = tmp_path_factory.mktemp("report-run")
    variants = [ladder["F16"], ladder["Q8_0"], ladder["Q2_K"]]
    evaluate_fidelity(variants, ladder["F16"], run_dir, FIDELITY)
    for v in variants:
        measure_speed(v, run_dir, SpeedOptions(prompt=32, gen=8, repetitions=1, threads=1, busy_retries=0))
    # HumanEval on the demo model takes minutes of generation; its result file is written by hand here, in the
    # format reamkit humaneval writes, only for the pass@1 column.
    (run_dir / "humaneval").mkdir()
    for name, p in PASS_AT_1.items():
        (run_dir / "humaneval" / f"{name}.json").write_text(json.dumps({"pass_at_1": p, "n_tasks": N_TASKS}))
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
    quants = text.split("## Provided Quants", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in quants.splitlines() if ln.startswith("| ")]
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
            if col not in cells and key in ("pp_tps", "tg_tps"):   # speeds within each other's errors (a busy
                assert f"\n- {col}: " in text and "so it is not a column" in text, col   # machine): one line
                continue
            assert float(cells[col].split()[0]) == pytest.approx(r[key], rel=rel, abs=1e-9), (t, col)
            if key in ("kld_mean", "top1_pct", "pp_tps", "tg_tps"):           # each figure with its error
                assert cells[col].split()[1:3] == ["±", sig(r[f"{key}_se"])], (t, col)
        passed = round(r["pass_at_1"] * N_TASKS)
        assert f"({passed}/{N_TASKS}, 95% " in cells["pass@1"]
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


# --- uncertainty: errors on every figure, paired differences, notes that do not outrun their errors ----------

@pytest.fixture(scope="module")
def paired(run, tmp_path_factory) -> Path:
    """The finished run plus a second Q2_K made another way (``--pure``: every tensor Q2_K), standing in for a
    REAP file of the same type: scored on the same chunks against the same reference."""
    ladder = tiny_ladder(tmp_path_factory.getbasetemp() / "report-ladder")
    folder = tmp_path_factory.mktemp("paired-run")
    shutil.copytree(run, folder, dirs_exist_ok=True)
    other = ladder["F16"].parent / "demo-reap.Q2_K.gguf"
    if not other.is_file():
        run_tool("llama-quantize", ["--pure", ladder["F16"], other, "Q2_K", "2"])
    evaluate_fidelity([other], ladder["F16"], folder, FIDELITY)
    (folder / "humaneval" / "demo-reap.Q2_K.json").write_text(json.dumps({"pass_at_1": 0.19, "n_tasks": N_TASKS}))
    variants = json.loads((folder / "variants.json").read_text())
    variants["demo-reap.Q2_K"] = {"path": str(other), "model": "demo-reap", "method": "reap", "experts": 12,
                                  "type": "Q2_K"}
    write_variants(folder, variants)
    return folder


def test_compare_json_carries_errors_and_paired_differences(paired, figure):
    compare(paired, plots=False)
    data = json.loads((paired / "report" / "compare.json").read_text())
    for r in data["rows"]:
        for key in ("kld_mean", "kld_p99", "top1_pct", "pass_at_1"):
            assert r[key] is not None and r[f"{key}_se"] is not None and r[f"{key}_se"] >= 0, (r["variant"], key)
        lo, hi = r["pass_at_1_ci95"]
        assert lo <= r["pass_at_1"] <= hi and r["humaneval_tasks"] == N_TASKS
        assert not any(k.startswith("_") for k in r)                 # per-chunk values stay in fidelity/
    q2 = next(r for r in data["rows"] if r["variant"] == "demo.Q2_K")
    assert q2["kld_mean_se"] > 0 and q2["kld_p99_se"] > 0
    diff = next(d for d in data["differences"] if d["type"] == "Q2_K")
    assert (diff["a"], diff["b"], diff["label"]) == ("demo.Q2_K", "demo-reap.Q2_K", "ream - reap")
    rows = {r["variant"]: r for r in data["rows"]}
    k = diff["kld_mean"]
    assert k["diff"] == pytest.approx(rows["demo.Q2_K"]["kld_mean"] - rows["demo-reap.Q2_K"]["kld_mean"])
    # the paired error, recomputed by hand from the per-chunk values the fidelity stage kept
    import statistics

    per_set = []
    for s in data["sets"]:
        a = json.loads((paired / "fidelity" / "demo.Q2_K.json").read_text())["sets"][s]["chunks"]["kld"]
        b = json.loads((paired / "fidelity" / "demo-reap.Q2_K.json").read_text())["sets"][s]["chunks"]["kld"]
        assert len(a) == len(b) == 5
        per_set.append(statistics.variance([x - y for x, y in zip(a, b)]) / len(a))
    assert k["paired"] and k["se"] == pytest.approx(sum(per_set) ** 0.5 / len(per_set))
    assert k["verdict"] == ("tie" if abs(k["diff"]) <= Z * k["se"] else "a better" if k["diff"] < 0 else "b better")
    assert diff["pass_at_1"]["se"] > 0 and diff["pass_at_1"]["verdict"] == "tie"     # 0.20 vs 0.19 of 100
    unpaired = (rows["demo.Q2_K"]["kld_mean_se"] ** 2 + rows["demo-reap.Q2_K"]["kld_mean_se"] ** 2) ** 0.5
    figure(f"demo Q2_K vs --pure Q2_K: KLD difference {k['diff']:+.4f} ± {k['se']:.4f} (paired, {k['verdict']}); "
           f"unpaired ± {unpaired:.4f}")


def _chunked(name, method, size, base, noise, seed, experts=None):
    """A row as compare builds it, with per-chunk KLDs: ``base`` per chunk plus its own noise."""
    import random
    import statistics

    rnd = random.Random(seed)
    chunks = [b + rnd.gauss(0, noise) for b in base]
    mean = statistics.fmean(chunks)
    se = statistics.stdev(chunks) / len(chunks) ** 0.5
    return {"variant": name, "method": method, "type": name.rsplit(".", 1)[-1], "experts": experts,
            "size_gb": size, "kld_mean": mean, "kld_mean_se": se, "tg_tps": None, "pp_tps": None,
            "pass_at_1": 0.0, "pass_at_1_se": 0.09, "_chunks": {"code": {"kld": chunks}}}


def test_a_difference_within_its_error_ranks_nobody():
    """REAM and REAP files of one size whose KLDs differ by less than the error of their difference: no note puts
    one above the other, and the card's answer says it cannot tell."""
    base = [0.05 + 0.04 * (i % 3) for i in range(12)]          # chunks of varying difficulty, shared by both
    ream = _chunked("m-ream.Q4_K_M", "ream", 3.00, base, 0.01, 1, 96)
    reap = _chunked("m-reap.Q4_K_M", "reap", 3.01, base, 0.01, 2, 96)
    plain = _chunked("m.Q3_K_M", "none", 3.05, base, 0.01, 3, 128)
    big = _chunked("m.Q8_0", "none", 8.0, [0.001] * 12, 0.0002, 4, 128)
    rows = [ream, reap, plain, big]
    from reamkit.report.evidence import difference

    d = difference(ream, reap, "kld_mean")
    assert d["diff"] != 0 and abs(d["diff"]) < Z * d["se"] and d["verdict"] == "tie"        # the premise
    notes = derive_notes(rows)
    ranked = {"best KLD", "best KLD drop per GB (vs Q4_K_M)", "recommended", "Pareto"}
    assert set(notes[ream["variant"]]) & ranked == set(notes[reap["variant"]]) & ranked == {"Pareto"}, notes
    assert "Pareto" not in notes["m.Q3_K_M"]           # larger beyond the size tie and not credibly better
    assert "best KLD" in notes["m.Q8_0"] and not any("best KLD" == n for r in rows[:3] for n in notes[r["variant"]])
    assert not any("pass@1" in n for ns in notes.values() for n in ns)          # all 0.0: nobody is best
    from reamkit.report.answer import class_answer

    ans = class_answer([ream, reap, plain])
    assert ans["verdict"] == "cannot tell" and ans["tied"]
    worse = _chunked("m.Q3_K_S", "none", 2.9, [2 * b for b in base], 0.01, 5, 128)       # twice the KLD
    ans = class_answer([ream, reap, worse])
    assert ans["verdict"] == "drop experts" and ans["diff"]["diff"] < -Z * ans["diff"]["se"]


_NOTE = re.compile(r"^(tied )?(best KLD|smallest|fastest tg|fastest pp|best pass@1)$")


def _value_and_se(cell: str) -> tuple[float, float | None]:
    parts = cell.split()
    return float(parts[0]), (float(parts[2]) if len(parts) > 2 and parts[1] == "±" else None)


def test_no_note_in_the_card_contradicts_its_error_bars(paired):
    """Read the produced card: every note checked against the table's own figures and error bars."""
    text = write_card(paired, model_name="Demo").read_text()
    quants = text.split("## Provided Quants", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in quants.splitlines() if ln.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    table = [dict(zip(header, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[1:]]
    assert len(table) == 4

    def fig(row, col):
        return _value_and_se(row[col]) if row.get(col, "n/a") != "n/a" else (None, None)

    def credibly(a, b, col, lower):         # a credibly better than b, judged by the bars shown
        (va, sa), (vb, sb) = fig(a, col), fig(b, col)
        if va is None or vb is None:
            return False
        gap = (vb - va) if lower else (va - vb)
        return gap > Z * ((sa or 0) ** 2 + (sb or 0) ** 2) ** 0.5 * 0.95      # 2-digit rounding of the bars

    cols = {"best KLD": ("KLD", True), "fastest tg": ("tg t/s", False), "fastest pp": ("pp t/s", False),
            "smallest": ("Size/GB", True)}
    checked = 0
    for row in table:
        for note in filter(None, (n.strip() for n in row["Notes"].split(","))):
            m = _NOTE.match(note)
            if m and m.group(2) in cols:
                col, lower = cols[m.group(2)]
                assert col in row and "busy" not in row[col], (note, row)
                others = [o for o in table if o is not row and fig(o, col)[0] is not None]
                if m.group(1):          # tied best: not credibly behind anyone
                    assert not any(credibly(o, row, col, lower) for o in others), (note, row)
                else:                   # best: credibly ahead of everyone
                    assert all(credibly(row, o, col, lower) or col == "Size/GB" for o in others), (note, row)
                    assert all((fig(row, col)[0] <= fig(o, col)[0]) == lower or fig(row, col)[0] == fig(o, col)[0]
                               for o in others), (note, row)
                checked += 1
            elif note == "Pareto":      # nobody smaller is credibly better or tied in KLD
                size = fig(row, "Size/GB")[0]
                assert not any(fig(o, "Size/GB")[0] < size * 0.99 and not credibly(row, o, "KLD", True)
                               for o in table if o is not row), (note, row)
                checked += 1
            elif note.startswith("recommended"):
                best = min(table, key=lambda o: fig(o, "KLD")[0])
                v, se = fig(row, "KLD")
                bv, bse = fig(best, "KLD")
                assert v - bv + (Z * ((se or 0) ** 2 + (bse or 0) ** 2) ** 0.5 if row is not best else 0) \
                    <= RECOMMEND_KLD_MARGIN * 1.01, (note, row)
                checked += 1
    assert checked >= 4
    # the answer at the top: each verdict agrees with the difference and error it shows
    answer = text.split("## The answer", 1)[1].split("## About", 1)[0]
    assert "drop experts or quantize harder?" in answer
    for ln in answer.splitlines()[1:]:
        if not ln.startswith("| ") or "Answer" in ln:
            continue
        cells = [c.strip() for c in ln.strip("|").split("|")]
        if cells[-1] in ("drop experts", "quantize harder", "cannot tell"):
            diff, se = _value_and_se(cells[-2])
            beyond = abs(diff) > Z * se * 0.95
            assert cells[-1] == "cannot tell" or beyond, ln
            assert cells[-1] != "cannot tell" or abs(diff) <= Z * se * 1.05, ln
            assert cells[-1] != "drop experts" or diff < 0, ln


def test_a_column_that_tells_nobody_apart_is_one_line(run, tmp_path):
    """Every pass@1 0/10: the card says so in one line, not a column of zeros."""
    folder = tmp_path / "zeros"
    shutil.copytree(run, folder)
    for f in (folder / "humaneval").glob("*.json"):
        f.write_text(json.dumps({"pass_at_1": 0.0, "n_tasks": 10}))
    text = write_card(folder).read_text()
    assert "pass@1" not in _card_table(text)["Q2_K"]
    line = next(ln for ln in text.splitlines() if ln.startswith("- pass@1:"))
    assert "0.000 for every variant (0/10 each)" in line and "cannot tell the variants apart" in line
