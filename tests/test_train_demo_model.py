"""tools/train_demo_model.py: the CPU smoke path of the demo-model trainer (the real run needs a GPU)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from reamkit.calibration.corpus import math_documents
from reamkit.checkpoint import Checkpoint

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


def test_prepare_splits_by_document(tool, data_dir):
    info = json.loads((data_dir / "data.json").read_text())
    tokens = dict(np.load(data_dir / "tokens.npz"))
    assert set(tokens) == {"code_train", "code_test", "math_train", "math_test"}
    assert all(v.dtype == np.uint16 and v.size == info["tokens"][k] for k, v in tokens.items())
    assert info["documents"]["math_test"] == 600 // tool.TEST_EVERY
    assert info["vocab_size"] == 2048 and (data_dir / "chat_template.jinja").is_file()
    # held-out documents are not in the training split
    train, test = tool.split(math_documents(600))
    assert len(test) == 30 and not set(train) & set(test)


def test_smoke_training_writes_a_usable_model(tool, data_dir, tmp_path):
    out = tmp_path / "demo-coder"
    report = tool.train(data_dir, out, preset_name="smoke", steps=3, seed=0, device="cpu", time_budget=0)
    again = tool.train(data_dir, tmp_path / "again", preset_name="smoke", steps=3, seed=0, device="cpu",
                       time_budget=0)
    assert [c["loss"] for c in report["curve"]] == [c["loss"] for c in again["curve"]]   # seed-deterministic

    ckpt = Checkpoint.open(out)                 # reamkit reads it: adapter checks pass
    assert ckpt.model_type == "qwen3_next" and ckpt.adapter.num_experts(ckpt.config) == 16
    assert {ckpt.adapter.layer_type(ckpt.config, i) for i in range(ckpt.num_layers)} == {"linear_attention",
                                                                                         "full_attention"}
    assert all(t.dtype == "BF16" for t in ckpt.tensors.values())
    assert all((out / s).stat().st_size <= 15_000_000 for s in ckpt.shards)
    saved = json.loads((out / "training.json").read_text())
    assert saved["training"]["steps"] == 3 and saved["curve"][-1]["step"] == 2
    assert len(saved["eval"]["expert_share_min_per_layer"]) == ckpt.num_layers
    assert saved["eval"]["unigram_loss"]["mix"] > 0 and saved["sample"]["text"].startswith("def fibonacci(n):")
    assert "Results (held-out split)" in (out / "README.md").read_text()
