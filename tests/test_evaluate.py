"""reamkit evaluate: KLD, same-top-1 and perplexity of GGUF variants against the reference, on held-out code and
math, with the reference logits stored once. The demo model's ladder is the test bed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from reamkit.cli import app
from reamkit.errors import ReamkitError
from reamkit.evaluation import FidelityOptions, evaluate_fidelity, parse_kld_output
from reamkit.gguf import convert_to_gguf
from reamkit.llamacpp.repack import load_llama

from .report_support import tiny_ladder

LADDER = ("Q8_0", "Q6_K", "Q4_K_M", "Q2_K")
OPTS = dict(tokens=1016, ctx=256, threads=2)      # 8 chunks of 127 scored tokens per set


@pytest.fixture(scope="module")
def ladder(tmp_path_factory) -> dict[str, Path]:
    return tiny_ladder(tmp_path_factory.getbasetemp() / "eval-ladder", LADDER)


@pytest.fixture(scope="module")
def run(ladder, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("eval-run")
    variants = [ladder["F16"], *(ladder[t] for t in LADDER)]
    results = evaluate_fidelity(variants, ladder["F16"], run_dir, FidelityOptions(**OPTS))
    return run_dir, {r.variant.split(".")[-1]: r for r in results}


def test_kld_rises_as_bits_fall(run, figure):
    _, res = run
    for s in ("code", "math"):
        klds = [res[t].sets[s]["kld_mean"] for t in LADDER]
        figure(f"demo model, held-out {s}: mean KLD " + ", ".join(f"{t} {k:.5f}" for t, k in zip(LADDER, klds))
               + "; same top-1 % " + ", ".join(f"{res[t].sets[s]['same_top1_pct']:.1f}" for t in LADDER))
        assert klds == sorted(klds) and klds[0] < klds[-1], klds
        assert res["Q2_K"].sets[s]["same_top1_pct"] < res["Q8_0"].sets[s]["same_top1_pct"]
        assert res["Q2_K"].sets[s]["tokens"] == 8 * 127
        assert res["Q2_K"].sets[s]["ppl_err"] > 0


def test_reference_against_itself_is_exact(run):
    _, res = run
    for s in ("code", "math"):
        figures = res["F16"].sets[s]
        assert abs(figures["kld_mean"]) < 1e-4 and figures["same_top1_pct"] == 100.0
        assert figures["ppl"] == pytest.approx(figures["ppl_base"], rel=1e-4)


def test_kld_matches_an_independent_computation(run, ladder, figure):
    """Recompute the Q2_K code KLD from the bindings' logits on the tokens the reference file holds."""
    run_dir, res = run
    raw = (run_dir / "reference" / "code.kld").read_bytes()
    assert raw[:8] == b"_logits_"
    n_ctx, n_vocab, n_chunk = np.frombuffer(raw[8:20], dtype=np.int32)
    tokens = np.frombuffer(raw[20:20 + 4 * n_chunk * n_ctx], dtype=np.int32).reshape(n_chunk, n_ctx)
    models = {k: load_llama(ladder[k], n_ctx=int(n_ctx), n_batch=int(n_ctx), n_threads=2, logits_all=True)
              for k in ("F16", "Q2_K")}
    add_bos = models["F16"].metadata.get("tokenizer.ggml.add_bos_token") == "true"
    klds = []
    for chunk in tokens:
        seq = [int(t) for t in chunk]
        if add_bos:
            seq[0] = models["F16"].token_bos()
        logp = {}
        for k, llm in models.items():
            llm.reset()
            llm.eval(seq)
            x = np.asarray(llm.scores[n_ctx // 2: n_ctx - 1], dtype=np.float64)
            logp[k] = x - x.max(1, keepdims=True) - np.log(np.exp(x - x.max(1, keepdims=True)).sum(1, keepdims=True))
        p = np.exp(logp["F16"])
        klds.append((p * (logp["F16"] - logp["Q2_K"])).sum(1))
    for llm in models.values():
        llm.close()
    ours = float(np.concatenate(klds).mean())
    tool = res["Q2_K"].sets["code"]["kld_mean"]
    figure(f"Q2_K code mean KLD: llama-perplexity {tool:.5f}, recomputed from the bindings {ours:.5f}")
    assert ours == pytest.approx(tool, rel=0.05)
    # each chunk's own KLD, recovered from the tool's running means, is the one recomputed for that chunk
    chunks = res["Q2_K"].sets["code"]["chunks"]["kld"]
    mine = [float(k.mean()) for k in klds]
    figure("Q2_K code KLD per chunk: tool " + " ".join(f"{c:.4f}" for c in chunks)
           + " | bindings " + " ".join(f"{c:.4f}" for c in mine))
    assert len(chunks) == len(mine) == 8
    assert chunks == pytest.approx(mine, rel=0.1, abs=5e-4)


def test_reference_logits_are_computed_once(run, ladder):
    run_dir, res = run
    kld = run_dir / "reference" / "code.kld"
    before = kld.stat().st_mtime_ns
    again = evaluate_fidelity([ladder["Q4_K_M"]], ladder["F16"], run_dir, FidelityOptions(**OPTS))
    assert kld.stat().st_mtime_ns == before
    assert again[0].sets["code"]["kld_mean"] == res["Q4_K_M"].sets["code"]["kld_mean"]
    stored = json.loads((run_dir / "fidelity" / "demo.Q4_K_M.json").read_text())
    assert stored["sets"]["math"]["kld_p99"] == res["Q4_K_M"].sets["math"]["kld_p99"]


def test_held_out_text_is_not_calibration_text(run):
    from reamkit.calibration.corpus import calibration_part, code_documents

    run_dir, _ = run
    text = (run_dir / "reference" / "code.txt").read_text()
    calib = calibration_part(code_documents(limit_bytes=3_000_000))
    assert not any(doc in text for doc in calib)


def test_cli_prints_the_table_and_json(run, ladder):
    run_dir, res = run
    r = CliRunner().invoke(app, ["evaluate", str(ladder["Q2_K"]), "--reference", str(ladder["F16"]), "-o",
                                 str(run_dir), "--tokens", "1016", "--ctx", "256", "--threads", "2", "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert rows[0]["sets"]["code"]["kld_mean"] == res["Q2_K"].sets["code"]["kld_mean"]


@pytest.mark.parametrize("case", ["missing", "not-gguf", "other-vocab", "empty-text", "over-budget",
                                  "too-few-tokens", "other-reference"])
def test_bad_input_is_one_line_before_any_work(case, ladder, run, tmp_path):
    ref, var = ladder["F16"], ladder["Q2_K"]
    args = dict(variants=[var], reference=ref, run_dir=tmp_path / "out", opts=FidelityOptions(**OPTS))
    if case == "missing":
        args["variants"] = [tmp_path / "nope.gguf"]
        msg = "no such GGUF file"
    elif case == "not-gguf":
        bad = tmp_path / "x.gguf"
        bad.write_bytes(b"PK\x03\x04 not a gguf")
        args["variants"] = [bad]
        msg = "is not a GGUF file"
    elif case == "other-vocab":
        from reamkit.zoo import build_cached

        args["variants"] = [convert_to_gguf(build_cached("qwen3_moe"), tmp_path / "other.F16.gguf")[0]]
        msg = "is not a variant of demo.F16.gguf: its vocabulary differs"
    elif case == "empty-text":
        empty = tmp_path / "empty.txt"
        empty.write_text("  \n")
        args["opts"] = FidelityOptions(**OPTS, text=empty)
        msg = "is empty"
    elif case == "too-few-tokens":       # llama-perplexity keeps its KLD statistics to itself below 100
        args["opts"] = FidelityOptions(tokens=64, ctx=256)
        msg = "too few: llama-perplexity computes KLD statistics on at least 100"
    elif case == "over-budget":
        args["opts"] = FidelityOptions(tokens=10_000_000, ctx=256)
        msg = "over the 4 GB disk budget"
    else:
        args["reference"], args["variants"], args["run_dir"] = ladder["Q8_0"], [var], run[0]
        msg = "holds results against another reference"
    with pytest.raises(ReamkitError, match=msg):
        evaluate_fidelity(args["variants"], args["reference"], args["run_dir"], args["opts"])
    if case != "other-reference":
        assert not (tmp_path / "out").exists()


def test_parser_tolerates_nan():
    text = ("Mean PPL(Q)                   :  -nan ±   5.25\nMean    KLD:   0.034184 ±   0.001255\n"
            "99.0%   KLD:   0.178584\nSame top p: 85.630 ± 1.101 %\n")
    got = parse_kld_output(text)
    assert got["ppl"] is None and got["kld_mean"] == 0.034184 and got["kld_p99"] == 0.178584
    assert got["same_top1_pct"] == 85.63 and got["same_top1_pct_err"] == 1.101
    with pytest.raises(ReamkitError):
        parse_kld_output("nothing")


def test_errors_are_over_chunks(run):
    """Per-chunk values recovered from the running means; the error of the mean over the 8 chunks of a set, never
    below the tool's own token-level error."""
    import statistics

    _, res = run
    for t in LADDER:
        for name, s in res[t].sets.items():
            chunks = s["chunks"]["kld"]
            assert len(chunks) == 8 and len(s["chunks"]["top1_pct"]) == 8
            assert statistics.fmean(chunks) == pytest.approx(s["kld_mean"], abs=2e-5)
            assert statistics.fmean(s["chunks"]["top1_pct"]) == pytest.approx(s["same_top1_pct"], abs=2e-3)
            over_chunks = statistics.stdev(chunks) / 8 ** 0.5
            # the printed rounding's share (5 decimals, amplified by the recovery) is taken out of the chunk spread
            assert s["kld_mean_se"] >= s["kld_mean_err"]
            assert s["kld_mean_se"] == pytest.approx(max(over_chunks, s["kld_mean_err"]), rel=0.1)
            assert s["kld_p99_se"] is not None and s["kld_p99_se"] >= 0 and s["same_top1_pct_se"] > 0


def test_chunk_table_parsing_and_quantile_error():
    from reamkit.evaluation.stats import chunk_table, mean_se, per_chunk, quantile_se, wilson

    values = [0.10, 0.30, 0.20, 0.40]
    running = [sum(values[:i]) / i for i in range(1, 5)]
    text = "\n".join(f"{i:4d}    {9.5:9.4f} ± {0.1:9.4f}    {0.01:10.5f} ± {0.001:10.5f}    {m:10.5f} ± {0.01:10.5f}"
                     f"    {3.0:6.3f} ± {0.1:6.3f} %    {90.0:6.3f} ± {1.0:6.3f} %" for i, m in enumerate(running, 1))
    got = chunk_table("chunk  PPL ...\n" + text + "\n")
    assert per_chunk(got["kld"]) == pytest.approx(values, abs=1e-4) and got["top1_pct"] == [90.0] * 4
    assert mean_se(values) == pytest.approx(0.1291 / 2, rel=1e-3)
    # an order statistic's band: n = 10000 tokens, p = 0.99 -> ranks 0.99 ± 0.000995
    qs = {0.95: 1.0, 0.99: 2.0, 0.999: 3.0}
    assert quantile_se(0.99, 10000, qs) == pytest.approx((2.0 + 0.000995 / 0.009 - (2.0 - 0.000995 / 0.04)) / 2,
                                                          rel=1e-2)
    assert quantile_se(0.99, 2500, qs, design_effect=4.0) == pytest.approx(quantile_se(0.99, 625, qs))
    lo, hi = wilson(0, 10)
    assert lo == 0 and hi == pytest.approx(0.2775, abs=1e-4)


def test_evaluation_works_at_a_context_above_llama_perplexity_default(ladder, tmp_path):
    """The variant pass runs at the reference's context (llama-perplexity's own default is 512)."""
    res = evaluate_fidelity([ladder["Q4_K_M"]], ladder["F16"], tmp_path,
                            FidelityOptions(tokens=511 * 2, ctx=1024, sets=("code",), threads=2))
    figures = res[0].sets["code"]
    assert figures["ctx"] == 1024 and figures["tokens"] == 2 * 511
    assert 0 < figures["kld_mean"] < 1 and figures["same_top1_pct"] > 50
