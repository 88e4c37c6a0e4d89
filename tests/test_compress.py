"""The streamed compression pass on the tiny zoo models: what it writes, that it loads, converts and runs,
that streaming gives the same result as the whole model in memory, resume, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from reamkit.checkpoint import Checkpoint
from reamkit.checkpoint.writer import write_checkpoint
from reamkit.compression import CompressOptions, compress
from reamkit.compression import driver as driver_mod
from reamkit.compression.layerwise import LayerwiseModel
from reamkit.errors import ReamkitError
from reamkit.models import open_model
from reamkit.models.moe import MoEBlock

from .conftest import hf_logits, reference_ids

TINY = dict(samples=8, seq_len=64, batch_size=4)


def opts(**kw) -> CompressOptions:
    return CompressOptions(**{**TINY, **kw})


def weights(path: Path) -> dict[str, torch.Tensor]:
    ckpt = Checkpoint.open(path)
    return {k: v.clone() for k, v in ckpt.load(list(ckpt.tensors)).items()}


def test_moe_block_matches_the_transformers_module(zoo_path, family):
    """The explicit MoE breakdown the methods use computes what transformers' fused block computes."""
    model = open_model(zoo_path)
    lw = LayerwiseModel(model)
    x = torch.randn(1, 48, model.config["hidden_size"], generator=torch.Generator().manual_seed(0))
    for i in model.adapter.moe_layers(model.config)[:2]:
        tensors = model.checkpoint.load_layer(i)
        layer = lw.layer(i, tensors)
        with torch.no_grad():
            ref = layer.get_submodule(model.adapter.moe)(x)
        ref = ref[0] if isinstance(ref, tuple) else ref
        block = MoEBlock.from_tensors(model.adapter, model.config, tensors)
        assert torch.allclose(block.forward(x[0]), ref[0], atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def fused_copy(zoo_path, tmp_path_factory):
    """The zoo model stored in transformers 5's fused expert layout."""
    src = open_model(zoo_path)
    out = tmp_path_factory.mktemp("fused") / "model"
    layers = ((i, src.adapter.convert_layout(src.checkpoint.load_layer(i), "fused"))
              for i in range(src.num_layers))
    write_checkpoint(src.checkpoint, out, layers=layers)
    return out


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_compressed_model_loads_converts_and_runs(zoo_path, family, layout, fused_copy, tmp_path, figure):
    """REAM 16 -> 12: the output loads in transformers with 12 experts (top-k unchanged), converts to an F32
    GGUF, and llama.cpp computes what transformers computes on it."""
    from reamkit.gguf import convert_to_gguf

    from .test_gguf import llama_logits

    src = fused_copy if layout == "fused" else zoo_path
    out = tmp_path / "small"
    result = compress(src, out, opts(method="ream", ratio=0.25))
    cfg = json.loads((out / "config.json").read_text())
    before = json.loads((zoo_path / "config.json").read_text())
    model = open_model(out)
    n = model.adapter.num_experts(before)
    assert model.adapter.num_experts(cfg) == n - n // 4 and cfg["num_experts_per_tok"] == before["num_experts_per_tok"]
    assert cfg["merge_args"]["method"] == "ream"
    for name in ("report.json", "report.md", "saliency.png", "observations.safetensors"):
        assert (out / "compression" / name).is_file()
    assert result.report["layers"][0]["groups"], "REAM merged nothing"
    obs = load_file(str(out / "compression" / "observations.safetensors"))
    assert obs["layers.0.expert_in_sumsq"].shape == (n, before["hidden_size"])

    ids = reference_ids(out, 96)
    ref = hf_logits(out, ids).double()
    gguf, _ = convert_to_gguf(out, tmp_path / "small.gguf", dtype="f32")
    got = torch.from_numpy(llama_logits(gguf, ids[0].tolist()))
    logp, logq = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
    kl = (logp.exp() * (logp - logq)).sum(-1).mean().item()
    figure(f"{family}/{layout}: REAM {n}->{n - n // 4} F32 GGUF vs transformers: mean KL {kl:.3g}")
    assert kl < 1e-6 and bool((ref.argmax(-1) == got.argmax(-1)).all())


def test_shared_expert_and_attention_are_untouched(tmp_path):
    from reamkit.zoo import build_cached

    src = build_cached("qwen3_next")
    out = tmp_path / "small"
    compress(src, out, opts(method="ream", ratio=0.25))
    a, b = weights(src), weights(out)
    untouched = [k for k in a if "experts" not in k and not k.endswith("mlp.gate.weight")]
    assert any("shared_expert" in k for k in untouched)
    for k in untouched:
        assert torch.equal(a[k], b[k]), k


def hf_in_memory_reference(src: Path, o: CompressOptions) -> dict[str, torch.Tensor]:
    """The same method on the whole model held in memory by transformers: for each layer in turn, run the full
    model (earlier layers already compressed) with a hook on that layer's MoE block, compress it in place."""
    from transformers import AutoModelForCausalLM

    from reamkit.calibration.mixture import build_calibration
    from reamkit.compression.methods import MethodInput, get_method, method_options
    from reamkit.compression.observe import ExpertStats, ObserveOptions
    from reamkit.compression.plan import apply_plan

    m = open_model(src)
    adapter, config = m.adapter, m.config
    hf = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    ids = build_calibration(src, o.calib, samples=o.samples, seq_len=o.seq_len, seed=o.seed)
    batches = [ids[i:i + o.batch_size] for i in range(0, len(ids), o.batch_size)]
    method = get_method(o.method)
    keep = 12
    out = {}
    for i in range(m.num_layers):
        tensors = m.checkpoint.load_layer(i)
        block = MoEBlock.from_tensors(adapter, config, tensors)
        needs = set(method.needs)
        st = ExpertStats(16, block.experts.gate.shape[2], block.experts.gate.shape[1], len(batches),
                         ObserveOptions(activation_samples=o.activation_samples if "activations" in needs else 0,
                                        keep_logits="logits" in needs, seed=o.seed + i))
        seen = []
        mlp = hf.model.layers[i].get_submodule(adapter.moe)
        handle = mlp.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
        with torch.no_grad():
            for b in batches:
                hf(b)
                x = seen.pop()
                st.observe(block, x.reshape(-1, x.shape[-1]))
        handle.remove()
        plan = method.plan_layer(MethodInput(st, block, keep, method_options(o.method, o.method_options),
                                             sequences=len(ids)))
        experts, router = apply_plan(plan, adapter.experts(tensors), tensors[adapter.router_key("per_expert")])
        new = adapter.replace_experts(tensors, experts, router, "per_expert")
        out.update({f"model.layers.{i}.{k}": v for k, v in new.items()})
        # put the compressed layer into the in-memory model (a sequential method's next layer sees it)
        small_cfg = adapter.hf_config(adapter.with_num_experts(config, keep))
        layer = adapter.build_layer(small_cfg, i, new, dtype=torch.float32)
        hf.model.layers[i] = layer
    return out


def test_streamed_pass_equals_whole_model_in_memory(tmp_path):
    """Streaming one layer at a time gives what the same method gives on the whole transformers model."""
    from reamkit.zoo import build_cached

    src = build_cached("qwen3_moe")
    o = opts(method="ream", ratio=0.25)
    out = tmp_path / "small"
    compress(src, out, o)
    streamed = weights(out)
    ref = hf_in_memory_reference(src, o)
    assert ref.keys() <= streamed.keys()
    for k, v in ref.items():
        assert torch.allclose(streamed[k], v, atol=1e-5), k


def test_sequential_and_non_sequential_differ_and_runs_are_deterministic(tmp_path):
    from reamkit.zoo import build_cached

    src = build_cached("qwen3_moe")
    seq = weights(compress(src, tmp_path / "a", opts(method="ream", ratio=0.25)).output)
    again = weights(compress(src, tmp_path / "b", opts(method="ream", ratio=0.25)).output)
    nonseq = weights(compress(src, tmp_path / "c", opts(method="ream", ratio=0.25, sequential=False)).output)
    assert all(torch.equal(seq[k], again[k]) for k in seq)
    first = "model.layers.0.mlp.experts.0.down_proj.weight"
    assert torch.equal(seq[first], nonseq[first])          # layer 0 sees the same inputs either way
    later = [k for k in seq if k.startswith("model.layers.3.mlp.experts.")]
    assert any(not torch.equal(seq[k], nonseq[k]) for k in later)


def test_rerun_skips_and_a_killed_run_resumes(tmp_path, monkeypatch):
    from reamkit.zoo import build_cached

    src = build_cached("qwen3_moe")
    o = opts(method="ream", ratio=0.25)
    whole = weights(compress(src, tmp_path / "whole", o).output)

    out = tmp_path / "resumed"
    real = driver_mod._Pass._layer
    observed: list[int] = []

    def crash_at_2(self, i, *a):
        observed.append(i)
        if i == 2 and observed.count(2) == 1:
            raise KeyboardInterrupt("killed")
        return real(self, i, *a)

    monkeypatch.setattr(driver_mod._Pass, "_layer", crash_at_2)
    with pytest.raises(KeyboardInterrupt):
        compress(src, out, o)
    assert not out.exists() and (tmp_path / ".resumed.work" / "layer-00001.safetensors").is_file()
    result = compress(src, out, o)
    assert observed == [0, 1, 2, 2, 3]                      # layers 0 and 1 were replayed, not observed again
    assert [lay.get("resumed", False) for lay in result.report["layers"]] == [True, True, False, False]
    resumed = weights(out)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert not (tmp_path / ".resumed.work").exists()
    assert compress(src, out, o).skipped


@pytest.mark.parametrize("kw,message", [
    (dict(method="magic", ratio=0.25), "unknown method"),
    (dict(method="ream", experts=16), "must be fewer than"),
    (dict(method="ream", experts=3), "fewer than top-k"),
    (dict(method="ream", experts=12, ratio=0.25), "exactly one target"),
    (dict(method="ream", ratio=0.25, calib="no-such-corpus"), "not a built-in corpus"),
    (dict(method="ream", ratio=0.25, calib="the-stack-smol"), "needs the Hugging Face Hub"),
    (dict(method="ream", ratio=0.25, calib=""), "empty calibration mix"),
    (dict(method="ream", ratio=0.25, samples=0), "too small"),
    (dict(method="ream", ratio=0.25, method_options={"merging": "blend"}), "unknown REAM merging"),
])
def test_bad_input_is_one_clear_error_before_any_work(kw, message, monkeypatch, tmp_path):
    from reamkit.zoo import build_cached

    monkeypatch.setattr(driver_mod, "_Pass", None)           # any work would crash on this
    with pytest.raises(ReamkitError, match=message):
        compress(build_cached("qwen3_moe"), tmp_path / "out", opts(**kw))


def test_a_model_without_moe_layers_is_refused(tmp_path):
    from reamkit.zoo import build_cached

    dense = build_cached("qwen3_moe", mlp_only_layers=[0, 1, 2, 3])
    with pytest.raises(ReamkitError, match="no MoE layers"):
        compress(dense, tmp_path / "out", opts(method="reap", ratio=0.25))


def test_a_calibration_source_too_small_is_refused(tmp_path):
    from reamkit.zoo import build_cached

    small = tmp_path / "notes.txt"
    small.write_text("def f(x):\n    return x + 1\n")
    with pytest.raises(ReamkitError, match="has only"):
        compress(build_cached("qwen3_moe"), tmp_path / "out", opts(method="reap", ratio=0.25, calib=str(small)))


def test_cli_compress(tmp_path):
    from typer.testing import CliRunner

    from reamkit.cli import app
    from reamkit.zoo import build_cached

    src = build_cached("mixtral")
    runner = CliRunner()
    res = runner.invoke(app, ["compress", str(src), "-o", str(tmp_path / "m"), "--method", "reap",
                              "--experts", "6", "--samples", "8", "--seq-len", "64", "--batch-size", "4"])
    assert res.exit_code == 0, res.output
    assert "8 -> 6 experts" in res.output
    res = runner.invoke(app, ["compress", str(src), "-o", str(tmp_path / "n"), "--method", "ream",
                              "--experts", "9"])
    assert res.exit_code != 0 and "must be fewer than" in res.output and "Traceback" not in res.output
