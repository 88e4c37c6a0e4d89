"""The built-in trained demo model (``reamkit zoo demo``): what its card promises holds for the shipped weights,
it converts exactly to GGUF, and every type of the quantization ladder loads in the pinned llama.cpp."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from reamkit.zoo import DEMO_MODEL, write_demo_model

from .conftest import hf_logits, reference_ids

LADDER = ["Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "IQ4_XS", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_model(tmp_path_factory.mktemp("demo") / "demo-coder")


def test_cli_writes_the_demo_model(tmp_path):
    from typer.testing import CliRunner

    from reamkit.cli import app
    from reamkit.models import open_model

    res = CliRunner().invoke(app, ["zoo", "demo", "-o", str(tmp_path / "d")])
    assert res.exit_code == 0, res.output
    model = open_model(tmp_path / "d")
    cfg = model.config
    assert cfg["model_type"] == "qwen3_next" and cfg["num_experts"] >= 16 and cfg["num_experts_per_tok"] >= 2
    assert cfg["hidden_size"] % 256 == 0 and cfg["moe_intermediate_size"] % 256 == 0
    assert {"linear_attention", "full_attention"} <= set(cfg["layer_types"])
    assert cfg["shared_expert_intermediate_size"] > 0
    assert all((tmp_path / "d" / s).stat().st_size <= 15_000_000 for s in model.checkpoint.shards)
    assert all(t.dtype == "BF16" for t in model.checkpoint.tensors.values())


def test_the_card_reports_what_training_measured(demo):
    """Held-out loss >= 3.5 nats below unigram for code and for math; every expert of every layer gets >= 1 %
    of held-out tokens; code and math route differently; the card prints these figures and a sample."""
    report = json.loads((demo / "training.json").read_text())
    ev = report["eval"]
    for src in ("code", "math"):
        assert ev["unigram_loss"][src] - ev["heldout_loss"][src] >= 3.5, src
    assert min(ev["expert_share_min_per_layer"]) >= 0.01
    assert len(ev["expert_share_min_per_layer"]) == report["config"]["num_hidden_layers"]
    assert all(js > 0.01 for js in ev["routing_js_code_vs_math_bits"])
    card = (demo / "README.md").read_text()
    assert f"{ev['heldout_loss']['code']:.3f}" in card and f"{ev['unigram_loss']['math']:.3f}" in card
    assert "def fibonacci(n):" in card and re.search(r"\n\s+(return|if|for|def|self)\b", report["sample"]["text"])


def test_the_shipped_weights_reproduce_the_reported_loss(demo):
    """Re-measure held-out code loss on the shipped bf16 weights (a few windows): close to what the card says."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from reamkit.calibration import corpus

    tok = AutoTokenizer.from_pretrained(str(demo))
    text = "\n".join(corpus.heldout_part(corpus.code_documents())[:3])
    ids = torch.tensor([tok(text)["input_ids"][:1024]])
    model = AutoModelForCausalLM.from_pretrained(str(demo), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = torch.cat([model(ids[:, i:i + 256]).logits for i in range(0, 1024, 256)], dim=1)
    targets = torch.cat([ids[:, i + 1:i + 256] for i in range(0, 1024, 256)], dim=1)
    pred = torch.cat([logits[:, i:i + 255] for i in range(0, 1024, 256)], dim=1)
    loss = torch.nn.functional.cross_entropy(pred[0], targets[0]).item()
    reported = json.loads((demo / "training.json").read_text())["eval"]["heldout_loss"]["code"]
    assert loss < reported + 0.6                           # few windows: noisy, but far below unigram (7.5)


@pytest.fixture(scope="module")
def demo_f32(demo, tmp_path_factory):
    from reamkit.gguf import convert_to_gguf

    path, _ = convert_to_gguf(demo, tmp_path_factory.mktemp("demo-gguf") / "demo-f32.gguf", dtype="f32")
    return path


def test_f32_gguf_matches_transformers(demo, demo_f32, figure):
    from .test_gguf import llama_logits

    ids = reference_ids(demo, 128)
    ref = hf_logits(demo, ids).double()
    got = torch.from_numpy(llama_logits(demo_f32, ids[0].tolist()))
    logp, logq = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    top1 = (ref.argmax(-1) == got.argmax(-1)).double().mean().item()
    figure(f"demo-coder: F32 GGUF vs transformers over 128 positions: mean KL {kl.mean():.3g}, top-1 {top1:.1%}")
    assert kl.mean().item() < 1e-6 and top1 == 1.0


def test_every_ladder_type_loads_in_llama_cpp(demo_f32, tmp_path, figure):
    """Each of the 11 types is produced with its own tensor types (no silent fallback for 256-wide rows) and
    runs in the pinned llama.cpp, predicting the F32 model's next token most of the time."""
    from reamkit.llamacpp.tools import run_tool

    from .quantize_support import eval_logits, tensor_types

    ref = eval_logits(demo_f32)
    sizes = []
    for t in LADDER:
        out = tmp_path / f"demo.{t}.gguf"
        run_tool("llama-quantize", [demo_f32, out, t, "2"])
        expert_type = tensor_types(out)["blk.0.ffn_gate_exps.weight"]
        assert expert_type.startswith(t.split("_")[0]), (t, expert_type)
        scores = eval_logits(out)
        assert np.isfinite(scores).all()
        agree = (scores.argmax(-1) == ref.argmax(-1)).mean()
        assert agree >= (0.5 if t.startswith(("Q2", "Q3")) else 0.75), (t, agree)
        sizes.append(f"{t} {out.stat().st_size / 2**20:.1f}")
        out.unlink()
    figure("demo-coder ladder sizes (MiB): " + ", ".join(sizes))
