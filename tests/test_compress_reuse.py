"""Planning from an earlier run's saved observations: same output as calibrating afresh, no calibration at all,
and a clear refusal when the observations cannot stand in for calibration."""

from __future__ import annotations

import pytest
import torch

from reamkit.checkpoint import Checkpoint
from reamkit.compression import CompressOptions, compress
from reamkit.errors import ReamkitError

TINY = dict(samples=8, seq_len=64, batch_size=4)


def weights(path):
    ckpt = Checkpoint.open(path)
    return {k: v.clone() for k, v in ckpt.load(list(ckpt.tensors)).items()}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """A non-sequential REAP run 16 -> 12 on the qwen3_moe zoo model: its observations are reused below."""
    from reamkit.zoo import build_cached

    src = build_cached("qwen3_moe")
    out = tmp_path_factory.mktemp("reuse") / "reap12"
    compress(src, out, CompressOptions(method="reap", experts=12, **TINY))
    return src, out


@pytest.mark.parametrize("method,experts", [("frequency", 10), ("reap", 8)])
def test_reuse_equals_a_fresh_run_without_calibrating(first_run, method, experts, tmp_path, monkeypatch):
    src, prev = first_run
    fresh = weights(compress(src, tmp_path / "fresh", CompressOptions(method=method, experts=experts, **TINY)).output)

    import reamkit.calibration.mixture as mixture
    from reamkit.compression.layerwise import LayerwiseModel

    def no_calibration(*a, **k):
        raise AssertionError("calibration ran")

    monkeypatch.setattr(mixture, "build_calibration", no_calibration)
    monkeypatch.setattr(LayerwiseModel, "run_layer", no_calibration)
    res = compress(src, tmp_path / "reused", CompressOptions(method=method, experts=experts,
                                                              observations=str(prev / "compression"), **TINY))
    reused = weights(res.output)
    assert reused.keys() == fresh.keys() and all(torch.equal(reused[k], fresh[k]) for k in fresh)
    assert all(lay.get("reused_observations") for lay in res.report["layers"])
    assert (res.output / "compression" / "observations.json").is_file()      # carried on for a third try


def test_reuse_is_refused_when_it_cannot_stand_in(first_run, tmp_path):
    from reamkit.zoo import build_cached

    src, prev = first_run
    obs = str(prev / "compression")
    other = build_cached("qwen3_moe", seed=1)                              # same shapes, other weights
    cases = [
        (other, dict(method="reap", experts=10), "another model"),
        (src, dict(method="ream", experts=10), "cannot plan from saved observations"),
        (src, dict(method="reap", experts=10, sequential=True), "sequential"),
        (src, dict(method="reap", experts=10, samples=16, seq_len=64, batch_size=4), "calibration"),
        (src, dict(method="reap", experts=10, calib="code=1.0"), "calibration"),
    ]
    for model, kw, message in cases:
        with pytest.raises(ReamkitError, match=message):
            compress(model, tmp_path / "x", CompressOptions(**{**TINY, **kw}, observations=obs))
    with pytest.raises(ReamkitError, match="no saved observations"):
        compress(src, tmp_path / "x", CompressOptions(method="reap", experts=10, observations=str(tmp_path), **TINY))


def test_observations_of_a_sequential_run_are_refused(tmp_path):
    from reamkit.zoo import build_cached

    src = build_cached("qwen3_moe")
    seq = compress(src, tmp_path / "seq", CompressOptions(method="reap", experts=12, sequential=True, **TINY)).output
    with pytest.raises(ReamkitError, match="sequential run"):
        compress(src, tmp_path / "x", CompressOptions(method="reap", experts=10, observations=str(seq), **TINY))
