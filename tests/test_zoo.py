"""The tiny model zoo: deterministic, K-quant friendly, decisive routers, usable tokenizer."""

from __future__ import annotations

import hashlib
import json

import torch

from reamkit.checkpoint import Checkpoint
from reamkit.zoo import build_cached

from .conftest import reference_ids


def test_sizes_are_kquant_friendly(zoo_path):
    cfg = json.loads((zoo_path / "config.json").read_text())
    for key in ("hidden_size", "intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size"):
        if key in cfg:
            assert cfg[key] % 256 == 0, key


def test_config_special_ids_are_the_tokenizers(zoo_path):
    """Generation stops on the config's eos id: it must be the id the tokenizer gives its eos token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(zoo_path))
    cfg = json.loads((zoo_path / "config.json").read_text())
    gen = json.loads((zoo_path / "generation_config.json").read_text())
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token == "<|im_end|>"
    assert cfg["eos_token_id"] == eos and gen["eos_token_id"] == eos
    assert cfg["pad_token_id"] == tok.pad_token_id


def test_routers_have_no_near_ties(zoo_path, family, figure):
    """On real text the router-logit gap between the k-th and (k+1)-th expert stays far above float noise,
    so two correct implementations never pick different experts."""
    from reamkit.compression.layerwise import LayerwiseModel
    from reamkit.models import open_model

    opened = open_model(zoo_path)
    ckpt = opened.checkpoint
    model = LayerwiseModel(opened)
    k = opened.adapter.routing(ckpt.config).top_k
    gaps: list[float] = []

    def record_margin(module, args, out):
        # router logits computed here from the router's own weight (what a router returns varies by version)
        logits = args[0].reshape(-1, module.weight.shape[1]).double() @ module.weight.double().T
        top = logits.topk(k + 1, dim=-1).values                  # best k+1 per token
        gaps.append((top[:, k - 1] - top[:, k]).min().item())

    hidden = model.embed(reference_ids(zoo_path, 128))
    ctx = model.context(hidden)
    for i in range(ckpt.num_layers):
        layer = model.layer(i)
        hook = layer.mlp.gate.register_forward_hook(record_margin)
        hidden = model.run_layer(layer, i, hidden, ctx)
        hook.remove()
    assert len(gaps) == ckpt.num_layers
    figure(f"{family}: smallest top-k router-logit margin per layer: {[f'{g:.1e}' for g in gaps]}")
    # F32 implementations differ in router logits by ~1e-6; a margin 100x that cannot flip an expert.
    assert min(gaps) > 1e-4


def test_tokenizer_and_chat_template(zoo_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(zoo_path))
    assert len(tok) == 4096
    text = "def add(a, b):\n    return a + b\n"
    assert tok.decode(tok(text)["input_ids"]) == text           # byte-level BPE is lossless
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token == "<|im_end|>"


def _digest(folder) -> str:
    h = hashlib.sha256()
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        h.update((folder / name).read_bytes())
    return h.hexdigest()


def test_builds_are_deterministic(tmp_path, monkeypatch):
    first = build_cached("qwen3_moe")
    monkeypatch.setenv("REAMKIT_CACHE_DIR", str(tmp_path / "cache"))
    second = build_cached("qwen3_moe")
    assert second != first and second.is_relative_to(tmp_path)
    assert _digest(first) == _digest(second)
    other_seed = build_cached("qwen3_moe", seed=1)
    assert _digest(other_seed) != _digest(second)


def test_zoo_command_writes_a_loadable_model(tmp_path):
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from reamkit.cli import app

    res = CliRunner().invoke(app, ["zoo", "mixtral", "-o", str(tmp_path / "mx")])
    assert res.exit_code == 0, res.output
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "mx"))
    assert type(model).__name__ == "MixtralForCausalLM"
    assert (tmp_path / "mx" / "chat_template.jinja").is_file()
