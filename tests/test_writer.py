"""CheckpointWriter streams tensors to disk: shards respect the size limit even when one call adds more than a
shard's worth (a 3 GB layer), the files are valid safetensors, and values and dtypes round-trip exactly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from reamkit.checkpoint.writer import CheckpointWriter


def test_shards_respect_the_limit_and_round_trip(tmp_path):
    gen = torch.Generator().manual_seed(0)
    layer = {f"model.layers.0.w{i}": torch.randn(64, 64, generator=gen) for i in range(10)}   # 16 KiB each
    layer["model.layers.0.b"] = torch.randn(64, generator=gen).bfloat16()
    layer["model.layers.0.mask"] = torch.tensor([True, False, True])
    layer["model.layers.0.count"] = torch.tensor(7)
    out = tmp_path / "m"
    limit = 40_000
    with CheckpointWriter(out, config={"model_type": "x"}, max_shard_bytes=limit) as w:
        w.add(layer)                                  # one call with ~4 shards' worth
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == 5                       # two 16 KiB tensors per 40 kB shard; the small ones fit the last
    got = {}
    for s in shards:
        tensors = load_file(str(out / s))
        assert sum(t.numel() * t.element_size() for t in tensors.values()) <= limit
        got.update(tensors)
    assert got.keys() == layer.keys()
    for k, v in layer.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    assert not list(out.glob("*.data"))


def test_a_failed_write_leaves_nothing(tmp_path):
    out = tmp_path / "m"
    with pytest.raises(RuntimeError):
        with CheckpointWriter(out, config={"model_type": "x"}) as w:
            w.add({"a": torch.ones(3)})
            raise RuntimeError("killed")
    assert not out.exists() and not list(tmp_path.iterdir())


def test_a_shard_larger_than_the_copy_chunk_is_copied_whole(tmp_path, monkeypatch):
    """A shard's data goes behind its header in chunks (a bounded buffer): every chunk arrives, in order."""
    import reamkit.checkpoint.writer as writer

    monkeypatch.setattr(writer, "COPY_CHUNK", 1000)
    gen = torch.Generator().manual_seed(1)
    tensors = {f"w{i}": torch.randn(37, 29, generator=gen) for i in range(6)}      # 4292 bytes each
    out = tmp_path / "m"
    with CheckpointWriter(out, config={"model_type": "x"}) as w:
        w.add(tensors)
    got = load_file(str(out / "model.safetensors"))
    assert got.keys() == tensors.keys() and all(torch.equal(got[k], v) for k, v in tensors.items())
