#!/usr/bin/env python3
"""Train the built-in demo model: a small qwen3_next coding model with real, specialised experts.

    python tools/train_demo_model.py prepare -o demo-data                       # corpus, tokenizer, tokens
    python tools/train_demo_model.py train --data demo-data -o demo-coder --preset cpu --steps 1800 --threads 2
    python tools/train_demo_model.py train --data demo-data -o demo-coder --preset demo --device cuda  # a GPU box

``prepare`` builds the corpus -- real Python source (the standard library of this interpreter) and generated
worked math solutions -- keeps the corpora's held-out part out of training (reamkit evaluates on it), trains
the zoo's byte-level BPE recipe with a ChatML template on the training part, and writes the token ids as one
``tokens.npz`` (uint16) beside the tokenizer files. On a GPU box, copy that folder there and run ``train``.

``train`` builds a ``Qwen3NextForCausalLM`` (hybrid Gated-DeltaNet / gated full attention, MoE in every layer
with a shared expert; hidden and expert widths multiples of 256 so K-quants apply), trains it on a 70 % code /
30 % math token mix with a per-layer router load-balancing loss, and writes a Hugging Face model folder (bf16
shards <= 15 MB), ``training.json`` (curve, held-out losses, unigram baseline, expert shares, code-vs-math
routing divergence, greedy sample) and a model card. The shipped model (``src/reamkit/zoo/demo-coder``) is the
``cpu`` preset, 1800 steps, about 55 minutes on 2 CPU cores.

The whole training state (model, optimizer, data sampler, RNG, step) is saved atomically every
``--checkpoint-minutes`` to ``OUTPUT.ckpt.pt``; rerunning the same command resumes from it, to the same weights
an uninterrupted run reaches (bitwise with one thread: multi-threaded CPU kernels sum in a varying order).
``--stop-after N`` saves and stops after N steps. ``--steps auto`` times a few steps first and picks the count
that fits ``--time-budget``. A CPU smoke run (``--preset smoke --steps 3``) takes seconds.
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
CODE_SHARE = 0.7

PRESETS = {
    # ~26M parameters, bf16 ~52 MB. Hidden and expert sizes are multiples of 256 (K-quants apply).
    "demo": dict(vocab_size=8192, hidden_size=256, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=64, linear_num_key_heads=2, linear_key_head_dim=64, linear_num_value_heads=4,
                 linear_value_head_dim=64, num_experts=16, num_experts_per_tok=4, moe_intermediate_size=256,
                 shared_expert_intermediate_size=256, seq_len=512, batch_size=64, lr=3e-3,
                 eval_windows=128, sample_tokens=96),
    # 2-core CPU, about an hour: hidden/expert widths stay at 256 (K-quants), top-2 keeps each step cheap.
    "cpu": dict(vocab_size=8192, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                head_dim=64, linear_num_key_heads=2, linear_key_head_dim=64, linear_num_value_heads=4,
                linear_value_head_dim=64, num_experts=16, num_experts_per_tok=2, moe_intermediate_size=256,
                shared_expert_intermediate_size=256, seq_len=256, batch_size=8, lr=3e-3, balance_coef=0.05,
                eval_windows=64, sample_tokens=96),
    # a few-second CPU check of the whole path
    "smoke": dict(vocab_size=8192, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=64, linear_num_key_heads=2, linear_key_head_dim=64, linear_num_value_heads=4,
                  linear_value_head_dim=64, num_experts=16, num_experts_per_tok=4, moe_intermediate_size=256,
                  shared_expert_intermediate_size=256, seq_len=128, batch_size=4, lr=3e-3,
                  eval_windows=2, sample_tokens=8),
}


# ============================================================================ data
def split(docs: list[str]) -> tuple[list[str], list[str]]:
    """(train, test): the corpus's own calibration and held-out parts (the held-out part is what reamkit
    evaluates on, so the demo model never trains on it); at least one document is held out."""
    from reamkit.calibration.corpus import calibration_part, heldout_part

    if not heldout_part(docs):
        return docs[:-1], docs[-1:]
    return calibration_part(docs), heldout_part(docs)


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
    """The zoo's ``qwen3_next`` layout (one source for the family's config) at the preset's sizes."""
    from reamkit.zoo import spec_for

    n = preset["num_hidden_layers"]
    sizes = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "linear_num_key_heads",
             "linear_key_head_dim", "linear_num_value_heads", "linear_value_head_dim", "num_experts",
             "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size")
    return spec_for(
        "qwen3_next", vocab_size=vocab_size, num_hidden_layers=n, **{k: preset[k] for k in sizes},
        layer_types=["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(n)],
        intermediate_size=preset["shared_expert_intermediate_size"], initializer_range=0.02,
        router_aux_loss_coef=preset.get("balance_coef", 0.02), output_router_logits=False,
        bos_token_id=EOT, pad_token_id=EOT)


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


class RouterTap:
    """Router logits of every MoE layer, recomputed from the router weight on the router's own input.

    Computed from ``gate.weight`` rather than read from the router's output, whose meaning (logits or
    probabilities) differs between transformers releases.
    """

    def __init__(self, model):
        import torch

        self.logits: list = []
        self.handles = [layer.mlp.gate.register_forward_hook(self._hook) for layer in model.model.layers]
        self._linear = torch.nn.functional.linear

    def _hook(self, module, args, _output):
        x = args[0]
        self.logits.append(self._linear(x.reshape(-1, x.shape[-1]), module.weight))

    def take(self) -> list:
        out, self.logits = self.logits, []
        return out

    def remove(self) -> None:
        """Detach the hooks (a tap left on would keep collecting during evaluation and generation)."""
        for h in self.handles:
            h.remove()
        self.logits = []


def balance_loss(logits: list, k: int):
    """Switch-style load-balancing loss per layer (E * sum_e f_e * P_e, 1.0 when uniform), averaged.

    Per layer, unlike transformers' loss, which pools all layers' tokens so that one layer's dead expert can
    hide behind another layer's busy one.
    """
    import torch

    total = 0.0
    for lg in logits:
        probs = torch.softmax(lg.float(), dim=-1)
        n_exp = probs.shape[-1]
        chosen = torch.zeros_like(probs).scatter_(1, probs.topk(k, dim=-1).indices, 1.0)
        total = total + n_exp * (chosen.mean(0) / k * probs.mean(0)).sum()
    return total / len(logits)


def _fingerprint(cfg: dict, preset: dict, steps: int, seed: int) -> str:
    import hashlib

    blob = json.dumps({"cfg": cfg, "preset": preset, "steps": steps, "seed": seed}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _save_state(path: Path, state: dict) -> None:
    import torch

    from reamkit.fsutil import atomic_file

    with atomic_file(path) as tmp:
        torch.save(state, tmp)


def run_training(cfg: dict, preset: dict, data: dict, steps: int, seed: int, device: str, log_every: int = 10,
                 checkpoint: Path | None = None, checkpoint_seconds: float = 180.0,
                 checkpoint_steps: int | None = None, stop_after: int | None = None):
    """Train for ``steps`` steps; returns (model, curve, seconds), or None when stopped by ``stop_after``.

    With ``checkpoint``, the whole training state (model, optimizer, data-sampler generator, RNG, step, curve)
    is saved there atomically every ``checkpoint_seconds`` (and every ``checkpoint_steps`` steps when given),
    and a run that finds a checkpoint of the same configuration resumes from it, reaching exactly the same
    weights as an uninterrupted run.
    """
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.Qwen3NextConfig(**{k: v for k, v in cfg.items() if k != "architectures"})
    model = transformers.Qwen3NextForCausalLM(config).to(device).train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=preset["lr"], betas=(0.9, 0.95), eps=1e-8)
    batches = Batches(data["code_train"], data["math_train"], preset["seq_len"], preset["batch_size"], seed)
    warmup = max(1, min(100, steps // 10))
    coef = preset.get("balance_coef", 0.02)
    k = config.num_experts_per_tok
    tap = RouterTap(model)
    fingerprint = _fingerprint(cfg, preset, steps, seed)
    start, curve, elapsed = 0, [], 0.0
    if checkpoint is not None and Path(checkpoint).is_file():
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        if state["fingerprint"] != fingerprint:
            raise SystemExit(f"{checkpoint} belongs to a run with another configuration, step count or seed; "
                             "remove it or pass another --checkpoint")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        batches.gen.set_state(state["sampler"])
        torch.set_rng_state(state["rng"])
        start, curve, elapsed = state["step"], state["curve"], state["seconds"]
        print(f"resumed from {checkpoint} at step {start} ({elapsed:.0f} s of training done)", flush=True)

    def save(step_done: int, seconds: float) -> None:
        _save_state(checkpoint, {"fingerprint": fingerprint, "model": model.state_dict(),
                                 "optimizer": opt.state_dict(), "sampler": batches.gen.get_state(),
                                 "rng": torch.get_rng_state(), "step": step_done, "curve": curve,
                                 "seconds": seconds})

    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else torch.autocast("cpu", enabled=False)
    t0 = time.time() - elapsed
    last_save = time.time()
    for step in range(start, steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, preset["lr"], warmup)
        batch = batches.next().to(device)
        with amp:
            out = model(input_ids=batch[:, :-1])
            lm = torch.nn.functional.cross_entropy(out.logits.float().flatten(0, 1), batch[:, 1:].flatten())
            bal = balance_loss(tap.take(), k)
            loss = lm + coef * bal
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % log_every == 0 or step == steps - 1:
            curve.append({"step": step, "loss": round(lm.item(), 4), "balance_loss": round(bal.item(), 4),
                          "lr": opt.param_groups[0]["lr"], "seconds": round(time.time() - t0, 2)})
            print(f"step {step:5d}/{steps}  loss {lm.item():.4f}  balance {bal.item():.3f}  "
                  f"{time.time() - t0:.0f}s", flush=True)
        done = step + 1
        if checkpoint is not None and done < steps and (
                done == stop_after or (checkpoint_steps and done % checkpoint_steps == 0)
                or time.time() - last_save >= checkpoint_seconds):
            save(done, time.time() - t0)
            last_save = time.time()
        if done == stop_after and done < steps:
            print(f"stopped after step {done}; rerun the same command to resume from {checkpoint}", flush=True)
            return None
    tap.remove()
    return model, curve, time.time() - t0


# ============================================================================ evaluation
def windows(data: np.ndarray, seq_len: int, limit: int):
    import torch

    n = min(limit, (len(data) - 1) // seq_len)
    return [torch.from_numpy(data[i * seq_len:(i + 1) * seq_len + 1].astype(np.int64)) for i in range(n)]


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence in bits (0 = same distribution, 1 = disjoint)."""
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(a, b):
        nz = a > 0
        return float((a[nz] * np.log2(a[nz] / b[nz])).sum())

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def evaluate(model, data: dict, seq_len: int, device: str, max_windows: int = 128) -> dict:
    """Held-out loss per source and for the 70/30 mix, unigram baselines, per-layer expert token shares,
    and per layer the Jensen-Shannon divergence between the routing on held-out code and on held-out math."""
    import torch

    model.eval()
    k, n_exp, n_layers = model.config.num_experts_per_tok, model.config.num_experts, model.config.num_hidden_layers
    tap = RouterTap(model)
    hits = {src: torch.zeros(n_layers, n_exp, dtype=torch.float64) for src in ("code", "math")}
    tokens = {"code": 0, "math": 0}
    losses = {}
    for src in ("code", "math"):
        total, count = 0.0, 0
        for w in windows(data[f"{src}_test"], seq_len, max_windows):
            w = w.to(device)
            with torch.no_grad():
                out = model(input_ids=w[None, :-1])
            total += torch.nn.functional.cross_entropy(out.logits[0].float(), w[1:], reduction="sum").item()
            count += seq_len
            for layer, logits in enumerate(tap.take()):
                top = logits.float().topk(k, dim=-1).indices.flatten().cpu()
                hits[src][layer] += torch.bincount(top, minlength=n_exp).double()
            tokens[src] += seq_len
        losses[src] = total / count
    tap.remove()
    losses["mix"] = CODE_SHARE * losses["code"] + (1 - CODE_SHARE) * losses["math"]
    # fraction of held-out tokens routed to each expert (an expert counts a token when it is in its top-k)
    share = (hits["code"] + hits["math"]) / (tokens["code"] + tokens["math"])
    js = [js_divergence(hits["code"][i].numpy(), hits["math"][i].numpy()) for i in range(n_layers)]
    return {"heldout_loss": losses, "unigram_loss": unigram_baseline(data),
            "expert_share_min_per_layer": [round(v, 4) for v in share.min(dim=1).values.tolist()],
            "expert_share": [[round(v, 4) for v in row] for row in share.tolist()],
            "routing_js_code_vs_math_bits": [round(v, 4) for v in js], "eval_tokens": tokens}


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
  per-layer router load-balancing loss coefficient {aux}; seed {seed}; {seconds:.0f} s on {device}.

## Results (held-out split)
| | code | math | 70/30 mix |
|---|---|---|---|
| model loss (nats/token) | {lc:.3f} | {lm:.3f} | {lx:.3f} |
| unigram baseline | {uc:.3f} | {um:.3f} | {ux:.3f} |

Held-out loss below the unigram baseline: code {dc:.2f} nats/token, math {dm:.2f} nats/token.

Smallest share of held-out tokens routed to any expert, per layer (uniform routing gives {uniform:.1%}): {shares}.

Jensen-Shannon divergence (bits) between the routing of held-out code and of held-out math, per layer: {js}.

Greedy continuation of `{prompt!r}`:

```python
{sample}
```
"""


def write_card(out: Path, report: dict) -> None:
    from reamkit.calibration.corpus import HELDOUT_EVERY

    cfg, ev, tr = report["config"], report["eval"], report["training"]
    arch = (f"{cfg['num_hidden_layers']} layers ({', '.join(cfg['layer_types'])}), hidden {cfg['hidden_size']}, "
            f"{cfg['num_experts']} routed experts (top-{cfg['num_experts_per_tok']}, intermediate "
            f"{cfg['moe_intermediate_size']}) + 1 shared expert ({cfg['shared_expert_intermediate_size']}) with its "
            f"sigmoid gate in every layer; {report['parameters']:,} parameters, bf16.")
    hl, ul = ev["heldout_loss"], ev["unigram_loss"]
    text = CARD.format(
        arch=arch, python=report["data"]["python"], code_docs=report["data"]["documents"]["code_train"],
        math_docs=report["data"]["documents"]["math_train"], every=HELDOUT_EVERY, code_pct=round(CODE_SHARE * 100),
        math_pct=round((1 - CODE_SHARE) * 100), vocab=cfg["vocab_size"], steps=tr["steps"], batch=tr["batch_size"],
        seq=tr["seq_len"], tokens=tr["tokens"], lr=tr["lr"], aux=cfg["router_aux_loss_coef"], seed=tr["seed"],
        seconds=tr["seconds"], device=tr["device"], lc=hl["code"], lm=hl["math"], lx=hl["mix"], uc=ul["code"],
        um=ul["math"], ux=ul["mix"], dc=ul["code"] - hl["code"], dm=ul["math"] - hl["math"],
        uniform=cfg["num_experts_per_tok"] / cfg["num_experts"],
        js=", ".join(f"{v:.3f}" for v in ev["routing_js_code_vs_math_bits"]), shares=", ".join(f"{v:.1%}" for v in ev["expert_share_min_per_layer"]),
        prompt=report["sample"]["prompt"], sample=report["sample"]["text"])
    (out / "README.md").write_text(text)


def _device_name(device: str) -> str:
    import platform

    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU ({cpu}, {torch.get_num_threads()} threads)"


def train(data_dir: Path, out: Path, *, preset_name: str, steps: int | str, seed: int, device: str,
          time_budget: float, checkpoint: Path | None = None, checkpoint_seconds: float = 180.0,
          checkpoint_steps: int | None = None, stop_after: int | None = None) -> dict | None:
    """Train and publish the model folder at ``out``; None when ``stop_after`` stopped the run early."""
    import torch
    from transformers import AutoTokenizer

    from reamkit.fsutil import atomic_replace_dir

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
    result = run_training(cfg, preset, data, int(steps), seed, device, checkpoint=checkpoint,
                          checkpoint_seconds=checkpoint_seconds, checkpoint_steps=checkpoint_steps,
                          stop_after=stop_after)
    if result is None:
        return None
    model, curve, seconds = result
    ev = evaluate(model, data, preset["seq_len"], device, preset["eval_windows"])
    prompt = "def fibonacci(n):\n"
    report = {
        "config": cfg, "parameters": sum(p.numel() for p in model.parameters()), "data": info,
        "training": {"steps": int(steps), "batch_size": preset["batch_size"], "seq_len": preset["seq_len"],
                     "tokens": int(steps) * preset["batch_size"] * preset["seq_len"], "lr": preset["lr"],
                     "seed": seed, "seconds": round(seconds, 1), "device": _device_name(device),
                     "preset": preset_name, "torch": torch.__version__},
        "curve": curve, "eval": ev,
        "sample": {"prompt": prompt, "text": greedy_sample(model, tok, prompt, device, preset["sample_tokens"])},
    }
    with atomic_replace_dir(out) as tmp:
        model.to(torch.bfloat16).save_pretrained(str(tmp), max_shard_size="15MB")
        tok.save_pretrained(str(tmp))
        (tmp / "training.json").write_text(json.dumps(report, indent=2) + "\n")
        write_card(tmp, report)
    if checkpoint is not None:
        Path(checkpoint).unlink(missing_ok=True)      # the published model supersedes it
    hl, ul = ev["heldout_loss"], ev["unigram_loss"]
    print(f"held-out loss {hl['mix']:.3f} vs unigram {ul['mix']:.3f} (code {hl['code']:.3f}/{ul['code']:.3f}, "
          f"math {hl['math']:.3f}/{ul['math']:.3f}); min expert share per layer "
          f"{ev['expert_share_min_per_layer']}; code/math routing JS {ev['routing_js_code_vs_math_bits']}",
          flush=True)
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
    t.add_argument("--checkpoint", type=Path, default=None,
                   help="training-state file (default: OUTPUT.ckpt.pt beside the output); a rerun resumes from it")
    t.add_argument("--checkpoint-minutes", type=float, default=3.0, help="save the training state this often")
    t.add_argument("--stop-after", type=int, default=None, help="save and stop after this many steps (resume later)")
    t.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    a = ap.parse_args(argv)
    if a.cmd == "prepare":
        print(json.dumps(prepare(a.output, vocab_size=a.vocab_size, code_bytes=a.code_bytes, math_docs=a.math_docs,
                                 seed=a.seed), indent=2))
    else:
        import torch

        if a.threads:
            torch.set_num_threads(a.threads)
        device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
        steps = a.steps if a.steps == "auto" else int(a.steps)
        ckpt = a.checkpoint or a.output.with_name(a.output.name + ".ckpt.pt")
        train(a.data, a.output, preset_name=a.preset, steps=steps, seed=a.seed, device=device,
              time_budget=a.time_budget, checkpoint=None if steps == "auto" else ckpt,
              checkpoint_seconds=a.checkpoint_minutes * 60, stop_after=a.stop_after)


if __name__ == "__main__":
    main()
