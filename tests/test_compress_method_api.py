"""The method interface: options validated once by each method's model (a bad one is one line), serialised into
the output's ``merge_args`` so that a rerun with the same options is current and a changed one is not, and a
new method -- a few lines implementing :class:`Method` -- runs through the streamed layer pass."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from reamkit.checkpoint import Checkpoint
from reamkit.compression import CompressOptions, compress
from reamkit.compression import driver as driver_mod
from reamkit.compression.methods import METHODS, Method, MethodOptions, get_method, method_options
from reamkit.compression.plan import prune_plan
from reamkit.errors import ReamkitError
from reamkit.models import open_model

TINY = dict(samples=8, seq_len=32, batch_size=4)


class Rotate(Method):
    """A toy method: keep ``keep`` consecutive experts starting at ``offset`` (no statistics used)."""

    name = "rotate"

    class Options(MethodOptions):
        offset: int = 0

    def plan_layer(self, inp):
        n = inp.stats.num_experts
        return prune_plan(n, [(inp.options.offset + j) % n for j in range(inp.keep)])


@pytest.fixture
def rotate(monkeypatch):
    monkeypatch.setitem(METHODS, "rotate", Rotate())


def weights(path) -> dict[str, torch.Tensor]:
    ckpt = Checkpoint.open(path)
    return {k: v.clone() for k, v in ckpt.load(list(ckpt.tensors)).items()}


@pytest.mark.parametrize("method,given,message", [
    ("ream", {"grup_size": 4}, r"^method ream has no option 'grup_size'; its options: .*group_size"),
    ("reap", {"merging": "avg"}, r"^method reap has no option 'merging'; its options: none$"),
    ("ream", {"pca_dim": "wide"}, r"^method ream option pca_dim='wide': .*integer"),
    ("ream", {"merging": "blend"}, r"^unknown REAM merging 'blend'; choose 'logits\+weights', "),
    ("ream", {"group_size": "-2"}, r"^REAM group size '-2' must be a whole number"),
    ("auto", {"holdout": 1.5}, r"^method auto option holdout=1.5: .*less than 1"),
])
def test_a_bad_option_is_one_clear_error_before_any_work(method, given, message, monkeypatch, tmp_path):
    from reamkit.zoo import build_cached

    with pytest.raises(ReamkitError, match=message) as e:
        method_options(method, given)
    assert "\n" not in str(e.value)
    monkeypatch.setattr(driver_mod, "_Pass", None)           # any work would crash on this
    with pytest.raises(ReamkitError, match=message):
        compress(build_cached("qwen3_moe"), tmp_path / "out", CompressOptions(method=method, ratio=0.25,
                                                                              method_options=given, **TINY))
    assert not (tmp_path / "out").exists()


def test_the_cli_passes_only_the_options_given_and_the_method_refuses_others(tmp_path):
    from reamkit.cli import app
    from reamkit.zoo import build_cached

    res = CliRunner().invoke(app, ["compress", str(build_cached("qwen3_moe")), "-o", str(tmp_path / "m"),
                                   "--method", "reap", "--ratio", "0.25", "--merging", "avg"])
    assert res.exit_code != 0 and "method reap has no option 'merging'" in res.output
    assert not (tmp_path / "m").exists()


def test_options_serialise_as_before():
    """The keys and values written into merge_args and the manifest: a run made before options were typed
    has the same manifest key, so it stays current."""
    ream = {"variant": "paper", "group_size": 16, "merging": "logits+weights", "gated_sim": True,
            "gate_output": True, "saliency": "reap", "pca_dim": 64, "seed": 0, "align": True}
    assert method_options("ream", {}).model_dump() == ream
    assert method_options("ream", {"group_size": "4"}).model_dump() == {**ream, "group_size": 4}
    assert method_options("ream", {"group_size": "auto"}).model_dump()["group_size"] == "auto"
    auto = {k: v for k, v in ream.items() if k != "group_size"}
    assert method_options("auto", {"variant": "reference"}).model_dump() == {
        **auto, "variant": "reference", "candidates": "reap,ream:2,ream:4,ream:8,ream:n/8,ream:16", "holdout": 0.25}
    for name in ("reap", "frequency", "hc-smoe", "m-smoe"):
        assert method_options(name, {}).model_dump() == {}
    for m in METHODS.values():                                 # what merge_args holds reads back the same
        opts = m.options()
        assert m.options(json.loads(json.dumps(opts.model_dump()))) == opts


def test_a_new_method_is_one_small_class_and_runs_through_the_pass(rotate, tmp_path):
    """The toy method above, registered, compresses every MoE layer of a zoo model through the streamed pass:
    its plan is applied, the compressed layer is propagated (output observations), its options reach
    merge_args; a rerun with the same options is current, one with a changed option is not."""
    from reamkit.zoo import build_cached

    src = build_cached("qwen3_moe")
    out = tmp_path / "rot"
    res = compress(src, out, CompressOptions(method="rotate", experts=12, method_options={"offset": 2}, **TINY))
    moe = [lay for lay in res.report["layers"] if lay["moe"]]
    assert moe and all(lay["kept"] == list(range(2, 14)) for lay in moe)
    assert all(lay["tokens"] == TINY["samples"] * TINY["seq_len"] for lay in moe)     # observed every batch
    model = open_model(out)
    assert model.adapter.num_experts(model.config) == 12
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["merge_args"]["method"] == "rotate"
    assert cfg["merge_args"]["method_options"] == {"offset": 2} and res.report["sequential"] is False
    assert get_method("rotate").options(cfg["merge_args"]["method_options"]) == Rotate.Options(offset=2)
    a, b = weights(src), weights(out)
    for i in (0, 5, 11):
        key = f"model.layers.1.mlp.experts.{i}.down_proj.weight"
        assert torch.equal(b[key], a[f"model.layers.1.mlp.experts.{i + 2}.down_proj.weight"])
    ostats = Checkpoint.open(out).path / "compression" / "output_observations.safetensors"
    assert ostats.is_file()                                    # the propagate step ran

    again = compress(src, out, CompressOptions(method="rotate", experts=12, method_options={"offset": "2"}, **TINY))
    assert again.skipped                                       # "2" validates to the same options
    with pytest.raises(ReamkitError, match="made from other inputs"):      # a changed option is not current
        compress(src, out, CompressOptions(method="rotate", experts=12, method_options={"offset": 3}, **TINY))
    changed = compress(src, tmp_path / "rot3", CompressOptions(method="rotate", experts=12,
                                                               method_options={"offset": 3}, **TINY))
    assert all(lay["kept"] == list(range(3, 15)) for lay in changed.report["layers"] if lay["moe"])
    merge_args = json.loads((tmp_path / "rot3" / "config.json").read_text())["merge_args"]
    assert merge_args["method_options"] == {"offset": 3}
    with pytest.raises(ReamkitError, match="method rotate has no option 'ofset'"):
        compress(src, out, CompressOptions(method="rotate", experts=12, method_options={"ofset": 3}, **TINY))


def test_a_sequential_method_that_overrides_the_composition(monkeypatch, tmp_path):
    """A method may compose the steps itself (here: recording each layer it observes); the pass is sequential,
    so every next layer's inputs come from its propagate step, and the walk completes."""
    from reamkit.zoo import build_cached

    calls = []

    class Twice(Rotate):
        name = "twice"
        sequential = True

        def compress_layer(self, steps, options):
            observed = steps.observe(self.needs, self.holdout(options))
            calls.append(steps.i)
            steps.propagate(steps.apply(self, steps.plan(self, options, observed)))

    monkeypatch.setitem(METHODS, "twice", Twice())
    res = compress(build_cached("qwen3_moe"), tmp_path / "t", CompressOptions(method="twice", experts=12, **TINY))
    moe = [lay["layer"] for lay in res.report["layers"] if lay["moe"]]
    assert calls == moe and res.report["sequential"] is True
