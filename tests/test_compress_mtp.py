"""Qwen3-Next's multi-token-prediction block is compressed with the decoder layers (same method, same target),
calibrated on its real inputs, and converts to GGUF; ``drop_mtp`` removes it instead."""

from __future__ import annotations

import json

import pytest
import torch

from reamkit.checkpoint import Checkpoint
from reamkit.compression import CompressOptions, compress

TINY = dict(samples=8, seq_len=64, batch_size=4)


@pytest.fixture(scope="module")
def mtp_model():
    from reamkit.zoo import build_cached

    return build_cached("qwen3_next", mtp=True)


@pytest.fixture(scope="module")
def compressed(mtp_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("mtp") / "small"
    return out, compress(mtp_model, out, CompressOptions(method="ream", ratio=0.25, **TINY))


def test_mtp_block_is_compressed_like_the_decoder_layers(mtp_model, compressed):
    out, result = compressed
    src, dst = Checkpoint.open(mtp_model), Checkpoint.open(out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_experts"] == 12 and cfg["merge_args"]["compressed_mtp"] == ["mtp.layers.0."]
    mtp = {k[len("mtp.layers.0."):]: v for k, v in dst.tensors.items() if k.startswith("mtp.layers.0.")}
    last = dst.layer_infos(3)                                    # a full-attention decoder layer, like the MTP's
    assert mtp.keys() == last.keys()
    for k, info in mtp.items():
        assert info.shape == last[k].shape, k                    # 12 experts, router [12, H]: as the decoder layers
    assert mtp["mlp.gate.weight"].shape[0] == 12 and not any("experts.12." in k for k in mtp)
    # the MTP block's own tensors and non-expert weights are untouched
    same = [k for k in src.tensors if k.startswith("mtp.") and "experts" not in k and not k.endswith("mlp.gate.weight")]
    a, b = src.load(same), dst.load(same)
    assert same and all(torch.equal(a[k], b[k]) for k in same)
    # calibrated on its real inputs: every sequence gives seq_len - 1 MTP positions, and REAM merged some of it
    rep = result.report["layers"][-1]
    assert rep["layer"] == "mtp.layers.0." and rep["tokens"] == TINY["samples"] * (TINY["seq_len"] - 1)
    assert sum(rep["frequency"]) == rep["tokens"] * cfg["num_experts_per_tok"] and rep["groups"]
    from safetensors.torch import load_file

    obs = load_file(str(out / "compression" / "observations.safetensors"))
    assert obs["mtp.layers.0.expert_tokens"].shape == (16,)


def test_mtp_input_is_the_last_hidden_state_and_the_next_token(mtp_model):
    """The calibration input of the MTP layer: fc(concat(enorm(embed(t+1)), hnorm(norm(h_t)))), as llama.cpp
    and vLLM compute it (checked against a direct computation with the 1 + w RMSNorm of Qwen3-Next)."""
    from reamkit.compression.layerwise import LayerwiseModel
    from reamkit.compression.mtp import MTPInput
    from reamkit.models import open_model

    model = open_model(mtp_model)
    lw = LayerwiseModel(model)
    ids = torch.randint(0, 4096, (2, 16), generator=torch.Generator().manual_seed(0))
    h = torch.randn(2, 16, 256, generator=torch.Generator().manual_seed(1))
    got = MTPInput(lw, torch.float32, torch.device("cpu"))(h, ids)
    w = model.checkpoint.load_other()
    eps = model.config["rms_norm_eps"]

    def rms(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (1 + weight)

    final = rms(h, w["model.norm.weight"])[:, :-1]
    emb = w["model.embed_tokens.weight"][ids[:, 1:]]
    want = torch.cat([rms(emb, w["mtp.pre_fc_norm_embedding.weight"]),
                      rms(final, w["mtp.pre_fc_norm_hidden.weight"])], -1) @ w["mtp.fc.weight"].T
    assert got.shape == (2, 15, 256) and torch.allclose(got, want, atol=1e-5)


def test_compressed_mtp_model_loads_in_transformers_and_converts_to_gguf(compressed, tmp_path):
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM

    from reamkit.gguf import convert_to_gguf

    out, _ = compressed
    hf = AutoModelForCausalLM.from_pretrained(str(out))               # ignores mtp.*, as for Hub checkpoints
    assert hf.config.num_experts == 12
    gguf, _ = convert_to_gguf(out, tmp_path / "small.gguf", dtype="f32")
    reader = GGUFReader(str(gguf))
    shapes = {t.name: [int(x) for x in t.shape] for t in reader.tensors}
    # the converter appends the MTP block as layer 4 (NextN) with the same 12 experts as the decoder layers
    assert shapes["blk.4.ffn_gate_inp.weight"] == shapes["blk.3.ffn_gate_inp.weight"] == [256, 12]
    assert shapes["blk.4.ffn_down_exps.weight"] == shapes["blk.3.ffn_down_exps.weight"]
    assert "blk.4.nextn.eh_proj.weight" in shapes
    fields = {f.name: f for f in reader.fields.values()}
    assert int(fields["qwen3next.expert_count"].parts[-1][0]) == 12
    assert int(fields["qwen3next.nextn_predict_layers"].parts[-1][0]) == 1


def test_drop_mtp_removes_the_whole_block(mtp_model, tmp_path):
    out = compress(mtp_model, tmp_path / "y", CompressOptions(method="reap", ratio=0.25, drop_mtp=True, **TINY)).output
    names = Checkpoint.open(out).tensors
    assert not any(k.startswith("mtp.") for k in names)
    args = json.loads((out / "config.json").read_text())["merge_args"]
    assert args["dropped"] == ["mtp.layers.0."] and args["compressed_mtp"] == []
