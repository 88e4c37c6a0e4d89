"""tools/train_demo_model.py: the CPU smoke path of the demo-model trainer (the real run needs a GPU)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from reamkit.models import open_model

TOOL = Path(__file__).resolve().parents[1] / "tools" / "train_demo_model.py"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("train_demo_model", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def data_dir(tool, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo-data")
    tool.prepare(out, vocab_size=2048, code_bytes=400_000, math_docs=600, seed=0)
    return out


def documents_of(tokens: np.ndarray, eot: int) -> set[tuple[int, ...]]:
    """The token sequences between document separators."""
    cuts = np.flatnonzero(tokens == eot)
    starts = np.concatenate([[0], cuts[:-1] + 1])
    return {tuple(tokens[a:b].tolist()) for a, b in zip(starts, cuts)}


def test_prepare_splits_by_document(tool, data_dir):
    info = json.loads((data_dir / "data.json").read_text())
    tokens = dict(np.load(data_dir / "tokens.npz"))
    assert set(tokens) == {"code_train", "code_test", "math_train", "math_test"}
    assert all(v.dtype == np.uint16 and v.size == info["tokens"][k] for k, v in tokens.items())
    assert info["vocab_size"] == 2048 and (data_dir / "chat_template.jinja").is_file()
    for src in ("code", "math"):                     # what was written: held-out documents are not trained on
        train, test = documents_of(tokens[f"{src}_train"], tool.EOT), documents_of(tokens[f"{src}_test"], tool.EOT)
        assert len(test) == info["documents"][f"{src}_test"] > 0
        assert not train & test
    assert info["documents"]["math_test"] == 600 // 20


def test_smoke_training_writes_a_usable_model(tool, data_dir, tmp_path):
    out = tmp_path / "demo-coder"
    report = tool.train(data_dir, out, preset_name="smoke", steps=3, seed=0, device="cpu", time_budget=0)
    again = tool.train(data_dir, tmp_path / "again", preset_name="smoke", steps=3, seed=0, device="cpu",
                       time_budget=0)
    assert [c["loss"] for c in report["curve"]] == [c["loss"] for c in again["curve"]]   # seed-deterministic

    model = open_model(out)                     # reamkit reads it: adapter checks pass
    ckpt, adapter = model.checkpoint, model.adapter
    assert ckpt.model_type == "qwen3_next" and adapter.num_experts(ckpt.config) == 16
    assert {adapter.layer_type(ckpt.config, i) for i in range(ckpt.num_layers)} == {"linear_attention",
                                                                                    "full_attention"}
    assert all(t.dtype == "BF16" for t in ckpt.tensors.values())
    assert all((out / s).stat().st_size <= 15_000_000 for s in ckpt.shards)
    saved = json.loads((out / "training.json").read_text())
    assert saved["training"]["steps"] == 3 and saved["curve"][-1]["step"] == 2
    assert len(saved["eval"]["expert_share_min_per_layer"]) == ckpt.num_layers
    assert saved["eval"]["unigram_loss"]["mix"] > 0
    assert len(saved["eval"]["routing_js_code_vs_math_bits"]) == ckpt.num_layers
    prompt, text = saved["sample"]["prompt"], saved["sample"]["text"]
    assert text.startswith(prompt) and len(text) > len(prompt)          # something was generated
    assert "Results (held-out split)" in (out / "README.md").read_text()


@pytest.fixture
def reproducible_torch():
    """One thread and deterministic kernels: multi-threaded CPU training sums gradients in a varying order, so
    two identical runs differ in the last bits (seen: 4e-3 on embeddings after 4 steps); with this, they don't."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)
    torch.set_num_threads(threads)


def test_training_resumes_to_the_same_result(tool, data_dir, tmp_path, reproducible_torch):
    """Stopped after 3 of 6 steps and resumed from its checkpoint, a run ends with exactly the weights and
    curve of an uninterrupted 6-step run."""
    from safetensors.torch import load_file

    kw = dict(preset_name="smoke", steps=6, seed=0, device="cpu", time_budget=0)
    whole = tool.train(data_dir, tmp_path / "whole", checkpoint=tmp_path / "whole.ckpt", **kw)
    ckpt = tmp_path / "resumed.ckpt"
    assert tool.train(data_dir, tmp_path / "resumed", checkpoint=ckpt, stop_after=3, **kw) is None
    assert ckpt.is_file() and not (tmp_path / "resumed").exists()
    resumed = tool.train(data_dir, tmp_path / "resumed", checkpoint=ckpt, **kw)
    assert not ckpt.exists()                           # superseded by the published model
    assert [c["loss"] for c in resumed["curve"]] == [c["loss"] for c in whole["curve"]]
    a = {k: v for f in sorted((tmp_path / "whole").glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    b = {k: v for f in sorted((tmp_path / "resumed").glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a checkpoint of another configuration is refused, not silently resumed
    tool.train(data_dir, tmp_path / "x", checkpoint=ckpt, stop_after=2, **kw)
    with pytest.raises(SystemExit, match="another configuration"):
        tool.train(data_dir, tmp_path / "x", checkpoint=ckpt, **{**kw, "steps": 5})
