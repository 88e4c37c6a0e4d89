"""Checkpoint I/O: layer-by-layer read + sharded write reproduces the model exactly."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import torch

from reamkit.checkpoint import Checkpoint, CheckpointWriter, write_checkpoint
from reamkit.checkpoint.reader import INDEX
from reamkit.checkpoint.writer import AUX_FILES
from reamkit.models import get_adapter

from .conftest import hf_logits, reference_ids


def assert_same_tensors(a: Checkpoint, b: Checkpoint) -> None:
    assert set(a.tensors) == set(b.tensors)
    for name in a.tensors:
        ta, tb = a.load([name])[name], b.load([name])[name]
        assert ta.dtype == tb.dtype and ta.shape == tb.shape, name
        assert torch.equal(ta.view(torch.uint8), tb.view(torch.uint8)), name   # bit-exact


def test_roundtrip_is_bit_exact_and_loads_in_transformers(zoo_path, tmp_path, family):
    src = Checkpoint.open(zoo_path)
    out = write_checkpoint(src, tmp_path / "copy", max_shard_bytes=8 * 2**20)   # force several shards
    dst = Checkpoint.open(out)

    assert_same_tensors(src, dst)
    index = json.loads((out / INDEX).read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert index["metadata"]["total_size"] == src.total_nbytes
    assert set(index["weight_map"]) == set(src.tensors)
    for name in AUX_FILES:
        if (zoo_path / name).exists():
            assert (out / name).read_bytes() == (zoo_path / name).read_bytes(), name
    assert json.loads((out / "config.json").read_text()) == src.config

    ids = reference_ids(zoo_path, 96)
    assert torch.equal(hf_logits(out, ids), hf_logits(zoo_path, ids))


def test_fused_expert_layout_roundtrip(zoo_path, tmp_path):
    """Per-expert -> fused/stacked on disk -> per-expert again is lossless, and transformers reads both."""
    src = Checkpoint.open(zoo_path)
    ad = get_adapter(src.config)
    fused_dir = write_checkpoint(src, tmp_path / "fused",
                                 layers=((i, ad.convert_layout(src.load_layer(i), "fused")) for i in range(src.num_layers)))
    fused = Checkpoint.open(fused_dir)
    assert all(ad.expert_layout(fused.layer_infos(i)) == "fused" for i in range(fused.num_layers))
    assert not any(".experts.0." in n for n in fused.tensors)

    ids = reference_ids(zoo_path, 64)
    assert torch.equal(hf_logits(fused_dir, ids), hf_logits(zoo_path, ids))

    back = write_checkpoint(fused, tmp_path / "back",
                            layers=((i, ad.convert_layout(fused.load_layer(i), "per_expert")) for i in range(fused.num_layers)))
    assert_same_tensors(src, Checkpoint.open(back))


def test_writer_failure_leaves_nothing(tmp_path, zoo_path):
    src = Checkpoint.open(zoo_path)
    target = tmp_path / "out"
    try:
        with CheckpointWriter(target, config=src.config, max_shard_bytes=1) as w:
            w.add(src.load(src.other_names))     # writes a shard
            raise RuntimeError("killed mid-write")
    except RuntimeError:
        pass
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


BIG_LAYER_SCRIPT = textwrap.dedent("""
    import sys, json
    import torch
    from reamkit.checkpoint import Checkpoint
    def peak():  # VmHWM: this process's peak RSS (ru_maxrss would include the forking parent's)
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    ckpt = Checkpoint.open(sys.argv[1])
    layer = int(sys.argv[2])
    before = peak()
    tensors = ckpt.load_layer(layer)
    checksum = sum(float(t.double().sum()) if t.numel() < 1e6 else float(t.sum()) for t in tensors.values())
    after = peak()
    print(json.dumps({"rise": after - before, "layer_bytes": sum(t.nbytes for t in ckpt.layer_infos(layer).values()),
                      "total_bytes": ckpt.total_nbytes, "checksum": checksum}))
""")


def test_reading_one_layer_of_a_big_checkpoint_is_streamed(tmp_path, figure):
    """One layer of a >= 1 GB checkpoint raises peak RSS by less than twice that layer's size."""
    from reamkit.zoo import spec_for

    spec = spec_for("qwen3_moe", hidden_size=1024, num_hidden_layers=3, num_experts=32, moe_intermediate_size=1024,
                    num_attention_heads=8, num_key_value_heads=4, head_dim=128, vocab_size=4096)
    gen = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=gen) * 0.02  # noqa: E731
    h, d, e = 1024, 1024, 32
    out = tmp_path / "big"
    with CheckpointWriter(out, config=spec, max_shard_bytes=256 * 2**20) as w:
        w.add({"model.embed_tokens.weight": rnd(4096, h), "model.norm.weight": torch.ones(h)})
        for i in range(3):
            p = f"model.layers.{i}."
            layer = {p + "input_layernorm.weight": torch.ones(h), p + "post_attention_layernorm.weight": torch.ones(h),
                     p + "self_attn.q_proj.weight": rnd(1024, h), p + "self_attn.k_proj.weight": rnd(512, h),
                     p + "self_attn.v_proj.weight": rnd(512, h), p + "self_attn.o_proj.weight": rnd(h, 1024),
                     p + "self_attn.q_norm.weight": torch.ones(128), p + "self_attn.k_norm.weight": torch.ones(128),
                     p + "mlp.gate.weight": rnd(e, h)}
            for j in range(e):
                layer |= {f"{p}mlp.experts.{j}.gate_proj.weight": rnd(d, h), f"{p}mlp.experts.{j}.up_proj.weight": rnd(d, h),
                          f"{p}mlp.experts.{j}.down_proj.weight": rnd(h, d)}
            w.add(layer)
            del layer
        w.add({"lm_head.weight": rnd(4096, h)})

    res = subprocess.run([sys.executable, "-c", BIG_LAYER_SCRIPT, str(out), "1"], capture_output=True, text=True,
                         check=True)
    fig = json.loads(res.stdout.strip().splitlines()[-1])
    ratio = fig["rise"] / fig["layer_bytes"]
    figure(f"reading layer 1 of a {fig['total_bytes'] / 1e9:.2f} GB checkpoint (layer {fig['layer_bytes'] / 1e6:.0f} MB): "
           f"peak RSS rise {fig['rise'] / 1e6:.0f} MB = {ratio:.2f}x the layer")
    assert fig["total_bytes"] >= 1e9
    assert ratio < 2.0
