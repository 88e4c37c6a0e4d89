#!/usr/bin/env python3
"""Train the built-in demo model: a small qwen3_next coding model with real, specialised experts.

Two steps, so that the GPU run needs nothing from the network:

    python tools/train_demo_model.py prepare -o demo-data          # here, on CPU (about a minute)
    python tools/train_demo_model.py train --data demo-data -o demo-coder --steps auto   # on one GPU

``prepare`` (needs reamkit installed) builds the corpus -- real Python source (the standard library of
this interpreter) and generated worked math solutions -- holds out a test split by document, trains the
zoo's byte-level BPE recipe with a ChatML template on the training split, and writes the token ids as one
``tokens.npz`` (uint16, <= 40 MB) beside the tokenizer files.

``train`` (needs only torch, transformers and numpy, so it runs on a bare GPU machine) builds a
``Qwen3NextForCausalLM`` (hybrid Gated-DeltaNet / gated full attention, MoE in every layer with a shared
expert), trains it on a 70 % code / 30 % math token mix with the router load-balancing loss, and writes a
Hugging Face model folder (bf16 shards <= 15 MB), ``training.json`` (curve, held-out losses, unigram
baseline, expert shares, greedy sample) and a model card. It is deterministic for a given ``--seed`` and
``--steps``; ``--steps auto`` first times a few steps, then restarts from the seed with the step count
that fits ``--time-budget`` (recorded in the JSON).
A CPU smoke run (``--preset smoke --steps 3``) takes seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

EOT = 0                    # <|endoftext|>, the document separator
TEST_EVERY = 20            # every 20th document goes to the held-out split
CODE_SHARE = 0.7

PRESETS = {
    # ~26M parameters, bf16 ~52 MB. Hidden and expert sizes are multiples of 256 (K-quants apply).
    "demo": dict(vocab_size=8192, hidden_size=256, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=64, linear_num_key_heads=2, linear_key_head_dim=64, linear_num_value_heads=4,
                 linear_value_head_dim=64, num_experts=16, num_experts_per_tok=4, moe_intermediate_size=256,
                 shared_expert_intermediate_size=256, seq_len=512, batch_size=64, lr=3e-3,
                 eval_windows=128, sample_tokens=96),
    # a few-second CPU check of the whole path
    "smoke": dict(vocab_size=8192, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=64, linear_num_key_heads=2, linear_key_head_dim=64, linear_num_value_heads=4,
                  linear_value_head_dim=64, num_experts=16, num_experts_per_tok=4, moe_intermediate_size=256,
                  shared_expert_intermediate_size=256, seq_len=128, batch_size=4, lr=3e-3,
                  eval_windows=2, sample_tokens=8),
}


# ============================================================================ data
def split(docs: list[str]) -> tuple[list[str], list[str]]:
    """(train, test): every TEST_EVERY-th document is held out, and at least the last one."""
    held = {i for i in range(len(docs)) if i % TEST_EVERY == TEST_EVERY - 1} or {len(docs) - 1}
    return [d for i, d in enumerate(docs) if i not in held], [d for i, d in enumerate(docs) if i in held]


def encode(tok, docs: list[str]) -> np.ndarray:
    ids: list[int] = []
    for enc in tok(docs, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(EOT)
    return np.asarray(ids, dtype=np.uint16)


def prepare(out: Path, *, vocab_size: int, code_bytes: int | None, math_docs: int, seed: int) -> dict:
    from reamkit.calibration.corpus import code_documents, math_documents
    from reamkit.zoo.tokenizer import train_tokenizer   # the zoo's BPE recipe (Qwen2 split, ChatML)

    out.mkdir(parents=True, exist_ok=True)
    code_train, code_test = split(code_documents(code_bytes))
    math_train, math_test = split(math_documents(math_docs, seed))
    tok = train_tokenizer(out, code_train + math_train, vocab_size)
    arrays = {"code_train": encode(tok, code_train), "code_test": encode(tok, code_test),
              "math_train": encode(tok, math_train), "math_test": encode(tok, math_test)}
    np.savez(out / "tokens.npz", **arrays)
    info = {"seed": seed, "vocab_size": len(tok), "python": sys.version.split()[0],
            "documents": {"code_train": len(code_train), "code_test": len(code_test),
                          "math_train": len(math_train), "math_test": len(math_test)},
            "tokens": {k: int(v.size) for k, v in arrays.items()},
            "bytes": (out / "tokens.npz").stat().st_size}
    (out / "data.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


# ============================================================================ model + training
def model_config(preset: dict, vocab_size: int) -> dict:
    n = preset["num_hidden_layers"]
    return {
        "architectures": ["Qwen3NextForCausalLM"], "model_type": "qwen3_next", "vocab_size": vocab_size,
        "hidden_size": preset["hidden_size"], "num_hidden_layers": n,
        "layer_types": ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(n)],
        "full_attention_interval": 4, "num_attention_heads": preset["num_attention_heads"],
        "num_key_value_heads": preset["num_key_value_heads"], "head_dim": preset["head_dim"],
        "linear_num_key_heads": preset["linear_num_key_heads"], "linear_key_head_dim": preset["linear_key_head_dim"],
        "linear_num_value_heads": preset["linear_num_value_heads"],
        "linear_value_head_dim": preset["linear_value_head_dim"], "linear_conv_kernel_dim": 4,
        "partial_rotary_factor": 0.25, "rope_theta": 10000.0, "max_position_embeddings": 4096,
        "num_experts": preset["num_experts"], "num_experts_per_tok": preset["num_experts_per_tok"],
        "moe_intermediate_size": preset["moe_intermediate_size"],
        "shared_expert_intermediate_size": preset["shared_expert_intermediate_size"],
        "intermediate_size": preset["shared_expert_intermediate_size"], "norm_topk_prob": True,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "router_aux_loss_coef": 0.02,
        "output_router_logits": False, "initializer_range": 0.02, "rms_norm_eps": 1e-6, "hidden_act": "silu",
        "tie_word_embeddings": False, "bos_token_id": EOT, "eos_token_id": 2, "pad_token_id": EOT,
    }


class Batches:
    """Random windows of ``seq_len`` tokens, 70 % of the rows from code and 30 % from math."""

    def __init__(self, code: np.ndarray, math_: np.ndarray, seq_len: int, batch: int, seed: int):
        import torch

        self.code, self.math, self.seq, self.batch = code, math_, seq_len, batch
        self.gen = torch.Generator().manual_seed(seed)
        self.n_code = round(batch * CODE_SHARE)

    def _rows(self, data: np.ndarray, n: int):
        import torch

        starts = torch.randint(0, len(data) - self.seq - 1, (n,), generator=self.gen).tolist()
        return [torch.from_numpy(data[s:s + self.seq + 1].astype(np.int64)) for s in starts]

    def next(self):
        import torch

        return torch.stack(self._rows(self.code, self.n_code) + self._rows(self.math, self.batch - self.n_code))


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def run_training(cfg: dict, preset: dict, data: dict, steps: int, seed: int, device: str, log_every: int = 10):
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.Qwen3NextConfig(**{k: v for k, v in cfg.items() if k != "architectures"})
    config.output_router_logits = True
    model = transformers.Qwen3NextForCausalLM(config).to(device).train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=preset["lr"], betas=(0.9, 0.95), eps=1e-8)
    batches = Batches(data["code_train"], data["math_train"], preset["seq_len"], preset["batch_size"], seed)
    warmup = max(1, min(100, steps // 10))
    curve, t0 = [], time.time()
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else torch.autocast("cpu", enabled=False)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, preset["lr"], warmup)
        batch = batches.next().to(device)
        with amp:
            out = model(input_ids=batch[:, :-1])      # output_router_logits: out.aux_loss is the balance loss
            lm = torch.nn.functional.cross_entropy(out.logits.float().flatten(0, 1), batch[:, 1:].flatten())
            loss = lm + config.router_aux_loss_coef * out.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % log_every == 0 or step == steps - 1:
            curve.append({"step": step, "loss": round(lm.item(), 4), "aux_loss": round(out.aux_loss.item(), 4),
                          "lr": opt.param_groups[0]["lr"], "seconds": round(time.time() - t0, 2)})
            print(f"step {step:5d}  loss {lm.item():.4f}  aux {out.aux_loss.item():.3f}  {time.time() - t0:.0f}s",
                  flush=True)
    model.config.output_router_logits = False
    return model, curve, time.time() - t0


# ============================================================================ evaluation
def windows(data: np.ndarray, seq_len: int, limit: int):
    import torch

    n = min(limit, (len(data) - 1) // seq_len)
    return [torch.from_numpy(data[i * seq_len:(i + 1) * seq_len + 1].astype(np.int64)) for i in range(n)]


def evaluate(model, data: dict, seq_len: int, device: str, max_windows: int = 128) -> dict:
    """Held-out loss per source and for the 70/30 mix, unigram baselines, per-layer expert token shares."""
    import torch

    model.eval()
    k, n_exp = model.config.num_experts_per_tok, model.config.num_experts
    hits = torch.zeros(model.config.num_hidden_layers, n_exp, dtype=torch.float64)
    tokens_seen = 0
    losses = {}
    for src in ("code", "math"):
        total, count = 0.0, 0
        for w in windows(data[f"{src}_test"], seq_len, max_windows):
            w = w.to(device)
            with torch.no_grad():
                out = model(input_ids=w[None, :-1], output_router_logits=True)
            total += torch.nn.functional.cross_entropy(out.logits[0].float(), w[1:], reduction="sum").item()
            count += seq_len
            for layer, logits in enumerate(out.router_logits):
                top = logits.float().topk(k, dim=-1).indices.flatten().cpu()
                hits[layer] += torch.bincount(top, minlength=n_exp).double()
            tokens_seen += seq_len
        losses[src] = total / count
    losses["mix"] = CODE_SHARE * losses["code"] + (1 - CODE_SHARE) * losses["math"]
    share = hits / tokens_seen                   # fraction of tokens routed to each expert (top-k includes it)
    return {"heldout_loss": losses, "unigram_loss": unigram_baseline(data),
            "expert_share_min_per_layer": [round(v, 4) for v in share.min(dim=1).values.tolist()],
            "expert_share": [[round(v, 4) for v in row] for row in share.tolist()], "eval_tokens": tokens_seen}


def unigram_baseline(data: dict) -> dict:
    """Cross-entropy (nats/token) of the held-out tokens under the training unigram distribution (add-one)."""
    vocab = int(max(int(v.max()) for v in data.values())) + 1
    counts = np.bincount(np.concatenate([data["code_train"], data["math_train"]]), minlength=vocab) + 1.0
    logp = np.log(counts / counts.sum())
    out = {src: float(-logp[data[f"{src}_test"]].mean()) for src in ("code", "math")}
    out["mix"] = CODE_SHARE * out["code"] + (1 - CODE_SHARE) * out["math"]
    return out


def greedy_sample(model, tok, prompt: str, device: str, new_tokens: int = 96) -> str:
    import torch

    ids = tok(prompt, return_tensors="pt")["input_ids"].to(device)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=EOT, eos_token_id=EOT)
    return tok.decode(out[0], skip_special_tokens=False)


# ============================================================================ output
CARD = """---
license: other
library_name: transformers
pipeline_tag: text-generation
tags: [qwen3_next, moe, reamkit, demo]
---
# reamkit demo-coder

A small `qwen3_next` Mixture-of-Experts coding model, trained from scratch by `tools/train_demo_model.py`
as reamkit's built-in demo and test model. It is a toy: it exists so that compression, quantization and
evaluation have real, specialised experts to work on, on a 2-core CPU.

## Architecture
{arch}

## Training
- Data: the Python {python} standard library source ({code_docs} files for training, every {every}th file held out)
  and generated worked math solutions ({math_docs} for training), mixed {code_pct}% code / {math_pct}% math by rows.
- Tokenizer: byte-level BPE ({vocab} tokens, Qwen2 pre-tokenizer split) trained on the training split; ChatML template.
- {steps} steps of {batch} x {seq} tokens ({tokens:,} tokens), AdamW (peak lr {lr}, cosine to 10%, weight decay 0.1),
  router load-balancing loss coefficient {aux}; seed {seed}; {seconds:.0f} s on {device}.

## Results (held-out split)
| | code | math | 70/30 mix |
|---|---|---|---|
| model loss (nats/token) | {lc:.3f} | {lm:.3f} | {lx:.3f} |
| unigram baseline | {uc:.3f} | {um:.3f} | {ux:.3f} |

Smallest share of held-out tokens routed to any expert, per layer: {shares}.

Greedy continuation of `{prompt!r}`:

```python
{sample}
```
"""


def write_card(out: Path, report: dict) -> None:
    cfg, ev, tr = report["config"], report["eval"], report["training"]
    arch = (f"{cfg['num_hidden_layers']} layers ({', '.join(cfg['layer_types'])}), hidden {cfg['hidden_size']}, "
            f"{cfg['num_experts']} routed experts (top-{cfg['num_experts_per_tok']}, intermediate "
            f"{cfg['moe_intermediate_size']}) + 1 shared expert ({cfg['shared_expert_intermediate_size']}) with its "
            f"sigmoid gate in every layer; {report['parameters']:,} parameters, bf16.")
    hl, ul = ev["heldout_loss"], ev["unigram_loss"]
    text = CARD.format(
        arch=arch, python=report["data"]["python"], code_docs=report["data"]["documents"]["code_train"],
        math_docs=report["data"]["documents"]["math_train"], every=TEST_EVERY, code_pct=round(CODE_SHARE * 100),
        math_pct=round((1 - CODE_SHARE) * 100), vocab=cfg["vocab_size"], steps=tr["steps"], batch=tr["batch_size"],
        seq=tr["seq_len"], tokens=tr["tokens"], lr=tr["lr"], aux=cfg["router_aux_loss_coef"], seed=tr["seed"],
        seconds=tr["seconds"], device=tr["device"], lc=hl["code"], lm=hl["math"], lx=hl["mix"], uc=ul["code"],
        um=ul["math"], ux=ul["mix"], shares=", ".join(f"{v:.1%}" for v in ev["expert_share_min_per_layer"]),
        prompt=report["sample"]["prompt"], sample=report["sample"]["text"])
    (out / "README.md").write_text(text)


def train(data_dir: Path, out: Path, *, preset_name: str, steps: int | str, seed: int, device: str,
          time_budget: float) -> dict:
    import shutil

    import torch
    from transformers import AutoTokenizer

    preset = PRESETS[preset_name]
    data = dict(np.load(data_dir / "tokens.npz"))
    info = json.loads((data_dir / "data.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(data_dir))
    cfg = model_config(preset, len(tok))
    if steps == "auto":
        probe = 15               # time steps 3..14: the first ones include kernel warm-up
        _, curve, _ = run_training(cfg, preset, data, probe, seed, device, log_every=1)
        per_step = (curve[-1]["seconds"] - curve[2]["seconds"]) / (probe - 3)
        steps = max(10, int(time_budget / per_step))
        print(f"measured {per_step * 1000:.0f} ms/step -> {steps} steps fit {time_budget:.0f} s", flush=True)
    model, curve, seconds = run_training(cfg, preset, data, int(steps), seed, device)
    ev = evaluate(model, data, preset["seq_len"], device, preset["eval_windows"])
    prompt = "def fibonacci(n):\n"
    report = {
        "config": cfg, "parameters": sum(p.numel() for p in model.parameters()), "data": info,
        "training": {"steps": int(steps), "batch_size": preset["batch_size"], "seq_len": preset["seq_len"],
                     "tokens": int(steps) * preset["batch_size"] * preset["seq_len"], "lr": preset["lr"],
                     "seed": seed, "seconds": round(seconds, 1), "device": torch.cuda.get_device_name()
                     if device.startswith("cuda") else "cpu", "preset": preset_name},
        "curve": curve, "eval": ev,
        "sample": {"prompt": prompt, "text": greedy_sample(model, tok, prompt, device, preset["sample_tokens"])},
    }
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(torch.bfloat16).save_pretrained(str(tmp), max_shard_size="15MB")
    tok.save_pretrained(str(tmp))
    (tmp / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    write_card(tmp, report)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    hl, ul = ev["heldout_loss"], ev["unigram_loss"]
    print(f"held-out loss {hl['mix']:.3f} vs unigram {ul['mix']:.3f} (code {hl['code']:.3f}/{ul['code']:.3f}, "
          f"math {hl['math']:.3f}/{ul['math']:.3f}); min expert share per layer "
          f"{ev['expert_share_min_per_layer']}", flush=True)
    return report


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="build corpus, tokenizer and tokens.npz (CPU)")
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--code-bytes", type=int, default=None, help="cap on code text (default: all of the stdlib)")
    p.add_argument("--math-docs", type=int, default=60000)
    p.add_argument("--seed", type=int, default=0)
    t = sub.add_parser("train", help="train and write the model folder")
    t.add_argument("--data", type=Path, required=True)
    t.add_argument("-o", "--output", type=Path, required=True)
    t.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    t.add_argument("--steps", default="auto", help="number of steps, or 'auto' to fit --time-budget")
    t.add_argument("--time-budget", type=float, default=330.0, help="seconds of training for --steps auto")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default=None)
    a = ap.parse_args(argv)
    if a.cmd == "prepare":
        print(json.dumps(prepare(a.output, vocab_size=a.vocab_size, code_bytes=a.code_bytes, math_docs=a.math_docs,
                                 seed=a.seed), indent=2))
    else:
        import torch

        device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
        steps = a.steps if a.steps == "auto" else int(a.steps)
        train(a.data, a.output, preset_name=a.preset, steps=steps, seed=a.seed, device=device,
              time_budget=a.time_budget)


if __name__ == "__main__":
    main()
