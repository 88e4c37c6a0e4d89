"""The compression hand-off end to end: prune a zoo model to half its experts, write it, reopen it, convert it,
and run the GGUF in the pinned llama.cpp; it computes what transformers computes on the pruned model."""

from __future__ import annotations

import torch

from reamkit.checkpoint import write_checkpoint
from reamkit.compression.layerwise import LayerwiseModel
from reamkit.gguf import convert_to_gguf
from reamkit.models import Experts, open_model

from .conftest import hf_logits, reference_ids
from .test_gguf import llama_logits


def prune(model, keep: list[int]):
    """Every MoE layer's tensors with only the experts in ``keep`` (router rows to match), one layer at a time."""
    ckpt, ad = model.checkpoint, model.adapter
    moe = set(ad.moe_layers(ckpt.config))
    for i in range(ckpt.num_layers):
        tensors = ckpt.load_layer(i)
        if i in moe:
            ex = ad.experts(tensors)
            router = tensors[ad.router_key(ad.expert_layout(tensors))]
            tensors = ad.replace_experts(tensors, Experts(ex.gate[keep], ex.up[keep], ex.down[keep]), router[keep])
        yield i, tensors


def test_pruned_model_writes_reopens_converts_and_runs_in_llama_cpp(zoo_path, family, tmp_path, figure):
    from gguf import GGUFReader

    model = open_model(zoo_path)
    ad = model.adapter
    n = ad.num_experts(model.config)
    keep = list(range(1, n, 2))                                   # 16 -> 8 (Mixtral: 8 -> 4)
    out = write_checkpoint(model.checkpoint, tmp_path / "pruned", config=ad.with_num_experts(model.config, len(keep)),
                           layers=prune(model, keep), max_shard_bytes=16 * 2**20)

    pruned = open_model(out)                                       # the adapter's checks pass at the new size
    assert ad.num_experts(pruned.config) == len(keep)
    assert all(ad.stored_experts(pruned.checkpoint.layer_infos(i)) == len(keep) for i in range(pruned.num_layers))
    assert len(pruned.checkpoint.shards) > 1

    gguf, _ = convert_to_gguf(out, tmp_path / "pruned-f32.gguf", dtype="f32")
    reader = GGUFReader(str(gguf))
    arch = reader.fields["general.architecture"].contents()
    assert reader.fields[f"{arch}.expert_count"].contents() == len(keep)
    assert {t.shape[-1] for t in reader.tensors if "ffn_gate_exps" in t.name} == {len(keep)}

    ids = reference_ids(zoo_path, 128)
    ref = hf_logits(out, ids).double()                             # transformers on the pruned folder
    got = torch.from_numpy(llama_logits(gguf, ids[0].tolist()))
    logp, logq = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    top1 = (ref.argmax(-1) == got.argmax(-1)).double().mean().item()
    layerwise = LayerwiseModel(pruned).forward(ids)[0].double()
    original = hf_logits(zoo_path, ids).double()
    figure(f"{family}: pruned {n}->{len(keep)} experts, F32 GGUF vs transformers: mean KL {kl.mean():.3g}, top-1 "
           f"{top1:.1%}; pruned vs original max |dlogit| {(ref - original).abs().max():.3g}")
    assert kl.mean().item() < 1e-6 and top1 == 1.0
    assert (layerwise - ref).abs().max().item() < 1e-4              # the layer-at-a-time model agrees on the pruned model
    assert (ref - original).abs().max().item() > 0.5                # and pruning really changed the model
