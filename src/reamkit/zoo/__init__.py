"""Tiny model zoo: deterministic, seconds-to-build checkpoints of every supported family.

Each is a normal Hugging Face model folder (fp32 safetensors, tokenizer, ChatML template) so every
reamkit command can be tried without downloading anything. Hidden and expert sizes are multiples of 256
so K-quants apply. Routers are scaled x8 so top-k choices have clear margins (no near-ties that would flip
an expert between two numerically-equal implementations) and ``lm_head`` x4 so logits are peaked; every
1-D parameter (norms, ``A_log``, ``dt_bias``) is perturbed so that conversion bugs show up.

Builds are cached under ``cache_root()/zoo`` keyed by the spec and library versions.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from ..cache import cache_root
from ..errors import ReamkitError
from ..fsutil import atomic_dir
from ..manifest import Manifest, existing_output_is_current, manifest_path_for, write_manifest

BUILDER_VERSION = 2
_COMMON = {
    "vocab_size": 4096, "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 64, "initializer_range": 0.05, "rms_norm_eps": 1e-6,
    "max_position_embeddings": 4096, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 0, "hidden_act": "silu",
}
FAMILIES: dict[str, dict] = {
    "qwen3_next": {
        **_COMMON, "model_type": "qwen3_next", "architectures": ["Qwen3NextForCausalLM"],
        "layer_types": ["linear_attention"] * 3 + ["full_attention"], "full_attention_interval": 4,
        "linear_num_key_heads": 2, "linear_key_head_dim": 64, "linear_num_value_heads": 4,
        "linear_value_head_dim": 64, "linear_conv_kernel_dim": 4, "partial_rotary_factor": 0.25,
        "num_experts": 16, "num_experts_per_tok": 4, "moe_intermediate_size": 256,
        "shared_expert_intermediate_size": 512, "intermediate_size": 512, "norm_topk_prob": True,
        "decoder_sparse_step": 1, "mlp_only_layers": [],
    },
    "qwen3_moe": {
        **_COMMON, "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"],
        "num_experts": 16, "num_experts_per_tok": 4, "moe_intermediate_size": 256,
        "intermediate_size": 512, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
    },
    "mixtral": {
        **_COMMON, "model_type": "mixtral", "architectures": ["MixtralForCausalLM"],
        "num_local_experts": 8, "num_experts_per_tok": 2, "intermediate_size": 512,
    },
    "qwen2_moe": {
        **_COMMON, "model_type": "qwen2_moe", "architectures": ["Qwen2MoeForCausalLM"],
        "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 256,
        "shared_expert_intermediate_size": 512, "intermediate_size": 512, "norm_topk_prob": False,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "qkv_bias": True, "use_sliding_window": False,
    },
}
ROUTER_SCALE, HEAD_SCALE, PERTURB = 8.0, 4.0, 0.1


def spec_for(family: str, **overrides) -> dict:
    if family not in FAMILIES:
        raise ReamkitError(f"unknown zoo family {family!r}; choose one of: {', '.join(FAMILIES)}")
    return {**FAMILIES[family], **overrides}


def _key(spec: dict, seed: int) -> str:
    from ..manifest import package_versions

    v = package_versions()
    blob = json.dumps({"spec": spec, "seed": seed, "builder": BUILDER_VERSION, "tokenizer": _tokenizer_key(),
                       "torch": v.get("torch"), "transformers": v.get("transformers")}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _tokenizer_key() -> str:
    """The tokenizer is trained on this Python's standard library, so its version is part of the key."""
    import platform

    return f"v{BUILDER_VERSION}-py{platform.python_version()}"


def tokenizer_dir() -> Path:
    """The zoo tokenizer, trained once and cached."""
    from .tokenizer import train_tokenizer

    out = cache_root() / "zoo" / f"tokenizer-{_tokenizer_key()}"
    if not (out / "tokenizer.json").is_file():
        if out.exists():
            shutil.rmtree(out)
        with atomic_dir(out) as tmp:
            train_tokenizer(tmp)
    return out


def _add_mtp(out: Path, spec: dict, seed: int) -> None:
    """Give a qwen3_next model a Hub-style multi-token-prediction block (``mtp.*``).

    Layout as in the Qwen3-Next checkpoints: ``mtp.fc`` [H, 2H], ``mtp.pre_fc_norm_embedding``,
    ``mtp.pre_fc_norm_hidden``, ``mtp.norm`` and one full-attention decoder layer with its own MoE under
    ``mtp.layers.0.``. transformers ignores these tensors; llama.cpp converts them to a NextN layer.
    """
    import torch
    from safetensors.torch import load_file, save_file

    weights = load_file(str(out / "model.safetensors"))
    last = spec["num_hidden_layers"] - 1
    assert spec["layer_types"][last] == "full_attention"
    gen = torch.Generator().manual_seed(seed + 2)
    h = spec["hidden_size"]
    prefix = f"model.layers.{last}."
    for name, t in list(weights.items()):
        if name.startswith(prefix):
            noise = torch.randn(t.shape, generator=gen) * (0.1 if t.ndim == 1 else 0.01)
            weights["mtp.layers.0." + name[len(prefix):]] = (t + noise).contiguous()
    weights["mtp.fc.weight"] = torch.randn(h, 2 * h, generator=gen) * spec["initializer_range"]
    for norm in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
        weights[f"mtp.{norm}.weight"] = torch.rand(h, generator=gen) * 0.2 - 0.1
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})


def _build(spec: dict, seed: int, out: Path, mtp: bool = False) -> None:
    import torch
    import transformers
    from transformers.utils import logging as hf_logging

    from ..models import get_adapter

    hf_logging.disable_progress_bar()
    adapter = get_adapter(spec)
    torch.manual_seed(seed)
    cfg = adapter.hf_config(spec)
    cfg.dtype = "float32"
    model = getattr(transformers, spec["architectures"][0])(cfg).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_((torch.rand(p.shape, generator=gen) * 2 - 1) * PERTURB)
            elif name.endswith(".gate.weight") and p.shape[0] == adapter.num_experts(spec):
                p.mul_(ROUTER_SCALE)
        model.lm_head.weight.mul_(HEAD_SCALE)
    model.generation_config.do_sample = False
    model.save_pretrained(str(out), safe_serialization=True)
    if mtp:
        _add_mtp(out, spec, seed)
    for f in tokenizer_dir().iterdir():
        shutil.copy2(f, out / f.name)


def build_cached(family: str, *, seed: int = 0, mtp: bool = False, **overrides) -> Path:
    """Build (once) and return the cached folder of a zoo model.

    ``mtp`` (qwen3_next only) adds a Hub-style ``mtp.*`` multi-token-prediction block.
    """
    spec = spec_for(family, **overrides)
    if mtp and family != "qwen3_next":
        raise ReamkitError(f"only qwen3_next models have an MTP block, not {family}")
    key = _key(spec, seed) + ("-mtp" if mtp else "")
    out = cache_root() / "zoo" / f"{family}-{key}"
    if not (out / "config.json").is_file():
        if out.exists():
            shutil.rmtree(out)
        with atomic_dir(out) as tmp:
            _build(spec, seed, tmp, mtp=mtp)
            write_manifest(manifest_path_for(tmp, folder=True), Manifest.new(
                "zoo", inputs={"family": family}, params={"spec": spec, "seed": seed, "mtp": mtp}))
    return out


def write_zoo_model(family: str, out_dir: Path, *, seed: int = 0, mtp: bool = False, **overrides) -> Path:
    """Write a zoo model as a Hugging Face model folder at ``out_dir`` (atomically).

    Rerunning with the same family writes nothing; an ``out_dir`` holding anything else is refused.
    """
    cached = build_cached(family, seed=seed, mtp=mtp, **overrides)
    manifest = Manifest.model_validate_json(manifest_path_for(cached, folder=True).read_text())
    out_dir = Path(out_dir)
    if existing_output_is_current(out_dir, manifest.key, "model", folder=True):
        return out_dir
    with atomic_dir(out_dir) as tmp:
        for f in cached.iterdir():
            shutil.copy2(f, tmp / f.name)
    return out_dir


DEMO_MODEL = Path(__file__).parent / "demo-coder"


def write_demo_model(out_dir: Path) -> Path:
    """Write the built-in trained demo model (``demo-coder``, shipped inside the package) to ``out_dir``.

    Rerunning writes nothing; an ``out_dir`` holding anything else is refused.
    """
    if not (DEMO_MODEL / "config.json").is_file():
        raise ReamkitError(f"the built-in demo model is missing from {DEMO_MODEL} (an incomplete installation)",
                           fix="reinstall reamkit")
    files = sorted(f for f in DEMO_MODEL.iterdir() if f.is_file())
    key = hashlib.sha256(b"".join(f.name.encode() + f.read_bytes() for f in files)).hexdigest()[:16]
    out_dir = Path(out_dir)
    if existing_output_is_current(out_dir, key, "model", folder=True):
        return out_dir
    with atomic_dir(out_dir) as tmp:
        for f in files:
            shutil.copy2(f, tmp / f.name)
        write_manifest(manifest_path_for(tmp, folder=True), Manifest(
            stage="zoo", key=key, inputs={"model": "demo-coder"}, params={}))
    return out_dir
