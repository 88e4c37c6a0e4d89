"""Each model family from its own file: a tiny model compressed by REAP and REAM, converted by the pinned
converter and quantized, with what the converter and quantizer wrote checked against what the family's file
states (GGUF architecture, tensor inventory, sizes, always-active tensors, memory model, active bytes)."""

from __future__ import annotations

import re

import pytest

from reamkit.compression import CompressOptions, compress
from reamkit.evaluation.speed import active_bytes_per_token
from reamkit.gguf import convert_to_gguf
from reamkit.models import ADAPTERS, gguf_family, open_model
from reamkit.quantization import QuantizeOptions, predict_sizes, quantize_model
from reamkit.quantization.inventory import inventory_from_config, inventory_from_gguf, open_gguf
from reamkit.quantization.rules import quantizable
from reamkit.report.fit import arch_from_config, arch_from_gguf
from reamkit.zoo import FAMILIES

from .quantize_support import tensor_types

TINY = dict(samples=8, seq_len=64, batch_size=4)
TYPE = "Q4_K_M"


def test_every_zoo_family_has_its_own_file_and_back():
    """The registry is discovered from the model files: every zoo family has an adapter, and each GGUF
    architecture name leads back to it."""
    assert set(FAMILIES) <= set(ADAPTERS)
    for model_type, cls in ADAPTERS.items():
        assert cls.__module__ == f"reamkit.models.{model_type}"
        assert type(gguf_family(cls.gguf_arch)) is cls


@pytest.mark.parametrize("method", ["reap", "ream"])
def test_compressed_model_converts_and_quantizes_as_its_family_predicts(family, zoo_path, method, tmp_path,
                                                                       figure):
    ad = open_model(zoo_path).adapter
    n = ad.num_experts(open_model(zoo_path).config)
    keep = n * 3 // 4                                              # 16 -> 12, 8 -> 6
    out = compress(zoo_path, tmp_path / "model", CompressOptions(method=method, experts=keep, **TINY)).output
    compressed = open_model(out)
    assert ad.num_experts(compressed.config) == keep

    gguf, _ = convert_to_gguf(out, tmp_path / "model.F16.gguf", dtype="f16")
    wrote, predicted = inventory_from_gguf(gguf), inventory_from_config(compressed.config)
    assert wrote.arch == predicted.arch == ad.gguf_arch
    assert {t.name: (t.shape, t.type) for t in wrote.tensors} == {t.name: (t.shape, t.type) for t in predicted.tensors}
    assert wrote.facts == predicted.facts

    reader = open_gguf(gguf)
    assert arch_from_gguf(reader) == arch_from_config(compressed.config)          # the memory model, both ways
    act = active_bytes_per_token(gguf)
    assert act["n_expert"] == keep and act["routed_experts_active"] > 0
    assert (act["shared_expert"] > 0) == bool(ad.shared_expert)

    result = quantize_model(gguf, tmp_path / "q", QuantizeOptions(types=[TYPE], ladder="moe-aware", imatrix="none",
                                                                  progress=False))
    (v,) = result.variants
    assert v.type_mismatches == []
    (row,) = predict_sizes(out, types=[TYPE], ladder="moe-aware")               # from config.json alone
    error = row.size_bytes / v.path.stat().st_size - 1
    assert abs(error) < 0.01, (row.size_bytes, v.path.stat().st_size)
    active = [t.name for t in wrote.tensors if quantizable(t) and any(re.search(p, t.name) for p in ad.always_active)]
    types = tensor_types(v.path)
    assert active and all(types[name] == "Q8_0" for name in active if "attn" in name)    # kept at the keep type
    assert any(types[t.name] == "Q4_K" for t in wrote.tensors if ad.gguf_routed(t.name))
    figure(f"{family} {method} {n}->{keep} experts: {len(wrote.tensors)} GGUF tensors as predicted; "
           f"{TYPE}-moe predicted {row.size_bytes} B vs {v.path.stat().st_size} B ({error:+.3%})")
