"""reamkit quantize on the tiny models: both 11-type ladders, loadable, sized as predicted, overrides in effect."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from reamkit.quantization import LADDER, QuantizeOptions, predict_sizes, quantize_model
from reamkit.quantization.inventory import inventory_from_gguf
from reamkit.quantization.ladders import ALWAYS_ACTIVE
from reamkit.quantization.rules import choose_types, quantizable

from .quantize_support import eval_logits, metadata, reference, tensor_types  # noqa: F401 - fixture

IMATRIX = dict(imatrix_chunks=4, imatrix_ctx=256)


@pytest.fixture(scope="session")
def ladders(family, reference, tmp_path_factory):   # noqa: F811
    """Both ladders of one family: static with a computed imatrix, MoE-aware without one."""
    out = tmp_path_factory.mktemp(f"ladders-{family}")
    t0 = time.perf_counter()
    static = quantize_model(reference, out, QuantizeOptions(progress=False, **IMATRIX))
    t1 = time.perf_counter()
    moe = quantize_model(reference, out, QuantizeOptions(progress=False, ladder="moe-aware", imatrix="none"))
    return {"out": out, "static": static, "moe-aware": moe, "seconds": (t1 - t0, time.perf_counter() - t1)}


def test_all_types_produced_and_load_in_pinned_llama_cpp(ladders, family, figure):
    for ladder, suffix in (("static", ""), ("moe-aware", "-moe")):
        result = ladders[ladder]
        assert [v.type for v in result.variants] == [t + suffix for t in LADDER]
        for v in result.variants:
            assert v.path.name == f"{family}.{v.type}.gguf" and not v.skipped
            scores = eval_logits(v.path)
            assert np.isfinite(scores).all() and scores.std() > 0, v.path.name
    s, m = ladders["seconds"]
    figure(f"{family}: static ladder (with imatrix) {s:.1f} s, MoE-aware ladder {m:.1f} s for 11 types each")


def test_predictor_matches_every_file_within_one_percent(ladders, family, zoo_path, figure):
    worst = {}
    for ladder in ("static", "moe-aware"):
        result = ladders[ladder]
        has_imatrix = result.imatrix is not None
        rows = {r.type: r for r in predict_sizes(zoo_path, ladder=ladder, has_imatrix=has_imatrix)}  # config only
        errors = {}
        for v in result.variants:
            actual = v.path.stat().st_size
            errors[v.type] = rows[v.type].size_bytes / actual - 1
            assert abs(errors[v.type]) < 0.01, (v.type, rows[v.type].size_bytes, actual)
            assert v.type_mismatches == []
        worst[ladder] = max(errors.items(), key=lambda kv: abs(kv[1]))
    figure(f"{family}: predictor from config.json vs produced files, worst error: "
           + ", ".join(f"{lad} {t} {e:+.4%}" for lad, (t, e) in worst.items()))


def test_every_tensor_has_the_predicted_type(ladders, reference):   # noqa: F811
    inv = inventory_from_gguf(reference)
    for ladder in ("static", "moe-aware"):
        for v in ladders[ladder].variants:
            manifest = json.loads(v.path.with_name(v.path.name + ".manifest.json").read_text())
            expected = choose_types(inv.tensors, manifest["params"]["type"], inv.facts,
                                    overrides=[tuple(o) for o in manifest["params"]["overrides"]],
                                    has_imatrix=ladders[ladder].imatrix is not None)
            assert tensor_types(v.path) == expected, v.path.name


def test_moe_aware_overrides_take_effect(ladders, reference, family, figure):   # noqa: F811
    import re

    inv = inventory_from_gguf(reference)
    active = {t.name for t in inv.tensors if quantizable(t) and any(re.search(p, t.name) for p in ALWAYS_ACTIVE)}
    assert any("attn" in n for n in active) and "output.weight" in active
    if family == "qwen3_next":
        assert {"blk.0.attn_qkv.weight", "blk.0.attn_gate.weight", "blk.0.ssm_out.weight",
                "blk.0.ffn_down_shexp.weight"} <= active
    share = sum(t.n_elements for t in inv.tensors if t.name in active) / inv.n_elements
    growth = {}
    for s, m in zip(ladders["static"].variants, ladders["moe-aware"].variants):
        st, mt = tensor_types(s.path), tensor_types(m.path)
        assert all(mt[n] == "Q8_0" for n in active), m.path.name                  # read back from the file
        experts = [n for n in st if "_exps" in n]
        if s.type != "IQ4_XS":          # the static IQ4_XS mix changes with its imatrix
            assert all(mt[n] == st[n] for n in experts), m.path.name            # routed experts untouched
        if s.type != "Q8_0":
            assert m.bytes > s.bytes
        growth[s.type] = m.bytes / s.bytes - 1
    assert abs(growth["Q8_0"]) < 1e-4
    # the extra bytes are the always-active share lifted to 8.5 bits: largest at the bottom of the ladder
    assert growth["Q2_K"] > growth["Q4_K_M"] > growth["Q6_K"] > 0
    assert growth["Q2_K"] < share * 8.5 / 2.625
    figure(f"{family}: always-active tensors are {share:.1%} of the weights; MoE-aware files are larger by "
           + ", ".join(f"{t} {g:+.1%}" for t, g in growth.items() if t in ("Q2_K", "Q4_K_M", "Q6_K")))


def test_imatrix_recorded_in_metadata(ladders, family):
    static, moe = ladders["static"], ladders["moe-aware"]
    assert static.imatrix is not None and static.imatrix.source == "llama-imatrix"
    assert static.imatrix.coverage and static.imatrix.min_coverage == 1.0
    meta = metadata(static.variants[0].path)
    assert meta["reamkit.imatrix"] == f"llama-imatrix: {family}.imatrix.gguf"
    assert meta["reamkit.imatrix.sha256"] == static.imatrix.sha256
    assert meta["quantize.imatrix.file"] == f"{family}.imatrix.gguf"      # a name: no local path in a published file
    assert "code=0.7,math=0.3" in meta["quantize.imatrix.dataset"]
    meta = metadata(moe.variants[0].path)
    assert meta["reamkit.imatrix"] == "none" and "quantize.imatrix.file" not in meta
    assert meta["reamkit.ladder"] == "moe-aware"


def test_rerun_on_finished_folder_does_no_work(ladders, reference, monkeypatch):   # noqa: F811
    import reamkit.quantization.imatrix as im
    import reamkit.quantization.quantize as q

    def no_tool(*a, **k):
        raise AssertionError("a llama.cpp tool ran on a finished folder")

    monkeypatch.setattr(q, "run_tool", no_tool)
    monkeypatch.setattr(im, "compute_imatrix", no_tool)
    before = {p.name: p.stat().st_mtime_ns for p in ladders["out"].iterdir()}
    t0 = time.perf_counter()
    again = quantize_model(reference, ladders["out"], QuantizeOptions(progress=False, **IMATRIX))
    assert all(v.skipped for v in again.variants) and len(again.variants) == 11
    assert {p.name: p.stat().st_mtime_ns for p in ladders["out"].iterdir()} == before
    assert time.perf_counter() - t0 < 30
