"""The importance matrix from a compression pass's per-expert statistics: converted, checked, covered, used."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from reamkit.errors import ReamkitError
from reamkit.quantization import QuantizeOptions, quantize_model
from reamkit.quantization.imatrix import find_observations, read_imatrix
from reamkit.zoo import build_cached

from .quantize_support import metadata, reference_gguf

FAMILY = "qwen3_moe"          # 4 MoE layers, 16 experts, hidden 256, expert width 256


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> Path:
    return reference_gguf(FAMILY, build_cached(FAMILY), tmp_path_factory.getbasetemp())


def observations(path: Path, n_expert: int = 16, unseen: tuple[int, ...] = (3, 7)) -> Path:
    """Statistics as the compression pass saves them; in layer 1 the ``unseen`` experts got no token."""
    gen = torch.Generator().manual_seed(0)
    obs = {}
    for i in range(4):
        tokens = torch.randint(50, 200, (n_expert,), generator=gen).float()
        if i == 1:
            tokens[list(unseen)] = 0
        obs[f"layers.{i}.expert_in_sumsq"] = torch.rand(n_expert, 256, generator=gen) * tokens[:, None]
        obs[f"layers.{i}.expert_mid_sumsq"] = torch.rand(n_expert, 256, generator=gen) * tokens[:, None]
        obs[f"layers.{i}.expert_tokens"] = tokens
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(obs, str(path))
    return path


def test_observations_become_the_imatrix_with_coverage_warning(ref, tmp_path):
    obs = observations(tmp_path / "observations" / "stats.safetensors")
    result = quantize_model(ref, tmp_path / "out", QuantizeOptions(types="Q2_K", imatrix=str(obs), progress=False))
    info = result.imatrix
    assert info.source == "compression observations"
    assert info.coverage == {0: 1.0, 1: 14 / 16, 2: 1.0, 3: 1.0}
    assert len(result.warnings) == 1 and "below 100%" in result.warnings[0] and "1: '88%'" in result.warnings[0]
    entries, datasets, _ = read_imatrix(info.path)
    assert set(entries) == {f"blk.{i}.ffn_{p}_exps.weight" for i in range(4) for p in ("gate", "up", "down")}
    assert entries["blk.1.ffn_down_exps.weight"][1].tolist().count(0) == 2
    meta = metadata(result.variants[0].path)
    assert meta["reamkit.imatrix"] == f"compression observations: {FAMILY}.imatrix.gguf"
    assert meta["quantize.imatrix.dataset"].startswith("reamkit compression observations")


def test_auto_finds_observations_next_to_the_model(ref, tmp_path):
    model_dir = tmp_path / "compressed"
    model_dir.mkdir()
    gguf = model_dir / ref.name
    gguf.symlink_to(ref)
    observations(tmp_path / "observations" / "stats.safetensors", unseen=())
    assert find_observations(gguf) == tmp_path / "observations" / "stats.safetensors"
    result = quantize_model(gguf, tmp_path / "out", QuantizeOptions(types="Q2_K", progress=False))
    assert result.imatrix.source == "compression observations" and result.warnings == []


def test_observations_of_another_model_are_refused_before_quantizing(ref, tmp_path):
    obs = observations(tmp_path / "stats.safetensors", n_expert=8, unseen=())
    out = tmp_path / "out"
    with pytest.raises(ReamkitError, match=r"for another model: layers\.0\.expert_in_sumsq is \[8, 256\]"):
        quantize_model(ref, out, QuantizeOptions(types="Q2_K", imatrix=str(obs), progress=False))
    assert not out.exists()                        # checked from the file's header, before any work


@pytest.fixture(scope="module")
def compressed(tmp_path_factory) -> Path:
    """What ``reamkit compress`` writes: 16 experts merged to 12 per layer by REAM."""
    from reamkit.compression import CompressOptions, compress

    out = tmp_path_factory.getbasetemp() / "imatrix-compressed" / "model-ream-12e"
    compress(build_cached(FAMILY), out, CompressOptions(method="ream", experts=12, samples=8, seq_len=64,
                                                          batch_size=4, device="cpu"))
    return out


def test_the_compression_statistics_describe_the_compressed_model(compressed):
    from safetensors.torch import load_file

    config = json.loads((compressed / "config.json").read_text())
    n_out = config.get("num_experts") or config["num_local_experts"]
    stats = load_file(str(compressed / "compression" / "output_observations.safetensors"))
    before = load_file(str(compressed / "compression" / "observations.safetensors"))
    tokens = json.loads((compressed / "compression" / "report.json").read_text())["layers"][0]["tokens"]
    for i in range(4):
        assert stats[f"layers.{i}.expert_tokens"].shape == (n_out,) == (12,)
        assert stats[f"layers.{i}.expert_in_sumsq"].shape == (12, 256)
        assert stats[f"layers.{i}.expert_mid_sumsq"].shape == (12, 256)
        assert before[f"layers.{i}.expert_tokens"].shape == (16,)      # the input model's experts, for reuse
        # every token is routed to top-k of the 12 output experts
        assert int(stats[f"layers.{i}.expert_tokens"].sum()) == tokens * config["num_experts_per_tok"]
    assert find_observations(compressed) == compressed / "compression" / "output_observations.safetensors"


def test_quantizing_a_compressed_model_uses_its_compression_statistics(compressed, tmp_path):
    result = quantize_model(compressed, tmp_path / "out", QuantizeOptions(types="Q4_K_M", progress=False))
    assert result.imatrix.source == "compression observations"
    entries, _, _ = read_imatrix(result.imatrix.path)
    assert entries["blk.0.ffn_down_exps.weight"][1].shape[0] == 12
    meta = metadata(result.variants[0].path)
    assert meta["reamkit.imatrix"] == "compression observations: model-ream-12e.imatrix.gguf"
    assert meta["quantize.imatrix.dataset"] == \
        "reamkit compression observations (compression/output_observations.safetensors)"
