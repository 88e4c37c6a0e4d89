"""Qwen3-Next's multi-token-prediction block (``mtp.*``) is read, checked, carried through and converted."""

from __future__ import annotations

import pytest
import torch

from reamkit.checkpoint import Checkpoint, write_checkpoint
from reamkit.errors import CheckpointError
from reamkit.gguf import convert_to_gguf
from reamkit.manifest import read_manifest
from reamkit.models import open_model
from reamkit.zoo import build_cached

from .test_gguf import llama_logits
from .conftest import reference_ids


@pytest.fixture(scope="module")
def mtp_model():
    return build_cached("qwen3_next", mtp=True)


def test_mtp_block_is_a_moe_group(mtp_model):
    model = open_model(mtp_model)
    ckpt, ad = model.checkpoint, model.adapter
    assert ad.mtp_layers(ckpt) == ["mtp.layers.0."]
    groups = ad.moe_groups(ckpt)
    assert groups == [f"model.layers.{i}." for i in range(4)] + ["mtp.layers.0."]
    mtp = ckpt.load_group("mtp.layers.0.")
    experts = ad.experts(mtp)
    assert experts.num_experts == 16 and experts.gate.shape == (16, 256, 256)
    assert "mlp.shared_expert_gate.weight" in mtp


def test_mtp_survives_a_roundtrip(mtp_model, tmp_path):
    src = Checkpoint.open(mtp_model)
    out = Checkpoint.open(write_checkpoint(src, tmp_path / "copy", max_shard_bytes=16 * 2**20))
    mtp_names = [n for n in src.tensors if n.startswith("mtp.")]
    assert len(mtp_names) > 50
    for name in mtp_names:
        assert torch.equal(src.load([name])[name], out.load([name])[name])


def test_mtp_expert_count_is_checked(mtp_model, tmp_path):
    src = Checkpoint.open(mtp_model)
    # drop expert 15 from the MTP layer only
    keep = [n for n in src.tensors if not n.startswith("mtp.layers.0.mlp.experts.15.")]
    from reamkit.checkpoint import CheckpointWriter

    with CheckpointWriter(tmp_path / "bad", config=src.config, aux_from=src.path) as w:
        w.add(src.load(keep))
    with pytest.raises(CheckpointError, match="MTP layer mtp.layers.0. holds 15 experts"):
        open_model(tmp_path / "bad")


def test_mtp_is_converted_as_nextn_layer(mtp_model, tmp_path):
    from gguf import GGUFReader

    gguf, _ = convert_to_gguf(mtp_model, tmp_path / "mtp.gguf", dtype="f32")
    reader = GGUFReader(str(gguf))
    fields = {k: f.contents() for k, f in reader.fields.items() if k.startswith("qwen3next.")}
    assert fields["qwen3next.block_count"] == 5
    assert fields["qwen3next.nextn_predict_layers"] == 1
    assert any(t.name.startswith("blk.4.ffn_gate_exps") for t in reader.tensors)

    # the main model's logits are unaffected by the MTP layer
    plain, _ = convert_to_gguf(build_cached("qwen3_next"), tmp_path / "plain.gguf", dtype="f32")
    ids = reference_ids(mtp_model, 64)[0].tolist()
    a, b = llama_logits(gguf, ids), llama_logits(plain, ids)
    assert abs(a - b).max() < 1e-4
    # the adapter asks for --no-mtp exactly when there is no MTP block to convert
    assert read_manifest(gguf, folder=False).params["converter_args"] == []
    assert read_manifest(plain, folder=False).params["converter_args"] == ["--no-mtp"]
