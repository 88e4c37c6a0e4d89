"""Fidelity of GGUF variants against the reference GGUF: KLD (mean, 99th and 99.9th percentile), same-top-1 %,
and perplexity with its error bar, on held-out code and held-out math.

The pinned ``llama-perplexity`` does the work: one run over the reference stores its log-probabilities
(``--kl-divergence-base``, about ``4 * V / 2`` bytes per scored token), then each variant is scored against that
file (``--kl-divergence``) on exactly the same tokens. Only the second half of each ``ctx`` window is scored
(``ctx / 2 - 1`` tokens), so ``tokens`` scored tokens take ``tokens / (ctx / 2 - 1)`` chunks. The reference file is computed once per reference,
text and settings, and kept within a disk budget. Each figure carries its standard error over the evaluation
chunks, and each chunk's own KLD and same-top-1 are kept for paired comparisons (:mod:`.stats`).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .. import defaults
from ..errors import OutputExistsError, ReamkitError
from ..fsutil import atomic_file, run_relative, write_json
from ..identity import file_hash
from ..llamacpp.gguf_file import check_gguf, open_gguf
from ..manifest import Manifest, manifest_path_for, read_manifest, stage_key, write_manifest
from ..llamacpp.tools import run_tool
from .cpuload import free_cores
from .stats import kld_uncertainty, sig

SETS = defaults.EVAL_SETS         # the built-in held-out sets
MIN_TOKENS = 100                  # llama-perplexity prints no KLD statistics below 100 scored tokens


@dataclass
class FidelityOptions:
    sets: tuple[str, ...] = SETS
    tokens: int = defaults.EVAL_TOKENS     # scored tokens per set
    ctx: int = defaults.EVAL_CTX
    text: Path | None = None       # a user's evaluation file instead of the built-in held-out sets
    disk_budget_gb: float = defaults.DISK_BUDGET_GB    # reference logits on disk, all sets together
    threads: int | None = None


@dataclass
class Fidelity:
    variant: str
    path: Path
    sets: dict[str, dict] = field(default_factory=dict)     # set -> figures

    def as_dict(self) -> dict:
        return {"variant": self.variant, "path": str(self.path), "sets": self.sets}


def vocabulary(path: Path) -> tuple[int, str]:
    """(size, hash) of a GGUF's token list; refuses what is not a GGUF in one line."""
    reader = open_gguf(path)
    try:
        tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    except KeyError:
        raise ReamkitError(f"{path} has no tokenizer (tokenizer.ggml.tokens)") from None
    return len(tokens), hashlib.sha256("\x00".join(tokens).encode()).hexdigest()[:16]


def heldout_text(kind: str, n_chars: int) -> str:
    """The built-in evaluation split: documents never used for calibration or training."""
    from ..calibration.corpus import code_documents, heldout_part, math_documents

    if kind == "code":
        docs = heldout_part(code_documents(limit_bytes=n_chars * 40 + 2_000_000))
    elif kind == "math":
        docs = heldout_part(math_documents(max(400, n_chars // 10)))
    else:
        raise ReamkitError(f"unknown evaluation set {kind!r}; choose from {', '.join(SETS)}")
    text, out = 0, []
    for d in docs:
        out.append(d)
        text += len(d) + 2
        if text >= n_chars:
            break
    return "\n\n".join(out)


def kld_bytes(n_vocab: int, tokens: int) -> int:
    return tokens * (2 * math.ceil(n_vocab / 2) + 4) * 2


_NUM = r"(-?nan|-?inf|[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?)"


def _f(s: str) -> float | None:
    v = float(s)
    return None if math.isnan(v) or math.isinf(v) else v


def parse_kld_output(text: str) -> dict:
    """The statistics block of ``llama-perplexity --kl-divergence`` (tolerates ``-nan`` and ``±``)."""
    pats = {
        "ppl": rf"Mean PPL\(Q\)\s*:\s*{_NUM}\s*±\s*{_NUM}",
        "ppl_base": rf"Mean PPL\(base\)\s*:\s*{_NUM}\s*±\s*{_NUM}",
        "ln_ppl_ratio": rf"Mean ln\(PPL\(Q\)/PPL\(base\)\)\s*:\s*{_NUM}\s*±\s*{_NUM}",
        "kld_mean": rf"Mean\s+KLD:\s*{_NUM}\s*±\s*{_NUM}",
        "kld_max": rf"Maximum KLD:\s*{_NUM}",
        "kld_p999": rf"99\.9%\s+KLD:\s*{_NUM}",
        "kld_p99": rf"99\.0%\s+KLD:\s*{_NUM}",
        "kld_median": rf"Median\s+KLD:\s*{_NUM}",
        "rms_dp_pct": rf"RMS Δp\s*:\s*{_NUM}\s*±\s*{_NUM}\s*%",
        "same_top1_pct": rf"Same top p:\s*{_NUM}\s*±\s*{_NUM}\s*%",
    }
    out: dict = {}
    for key, pat in pats.items():
        m = re.search(pat, text)
        if not m:
            continue
        out[key] = _f(m.group(1))
        if m.lastindex and m.lastindex > 1:
            out[key + "_err"] = _f(m.group(2))
    if "kld_mean" not in out:
        raise ReamkitError("llama-perplexity printed no KL-divergence statistics")
    return out


def parse_base_ppl(text: str) -> dict:
    m = re.search(rf"Final estimate: PPL = {_NUM} \+/- {_NUM}", text)
    return {"ppl": _f(m.group(1)), "ppl_err": _f(m.group(2))} if m else {}


def _threads(opts: FidelityOptions) -> list[str]:
    """The given threads, else the cores other processes leave free (llama.cpp's spinning workers slow down
    sharply when one of them has to wait for a core)."""
    return ["-t", str(opts.threads or free_cores())]


def evaluate_fidelity(variants: list[Path], reference: Path, run_dir: Path, opts: FidelityOptions,
                      progress: Callable[[str], None] | None = None) -> list[Fidelity]:
    """Score each variant against the reference; results land in ``run_dir/fidelity/<variant>.json``."""
    reference = Path(reference)
    paths = [Path(v) for v in variants]
    for p in [reference, *paths]:
        check_gguf(p)
    if opts.tokens < MIN_TOKENS:
        raise ReamkitError(f"--tokens {opts.tokens} is too few: llama-perplexity computes KLD statistics on at least "
                           f"{MIN_TOKENS} scored tokens")
    if opts.ctx < 32 or opts.ctx % 2:
        raise ReamkitError(f"--ctx {opts.ctx} must be an even number of at least 32")
    n_vocab, vhash = vocabulary(reference)
    for p in paths:
        v = vocabulary(p)
        if v != (n_vocab, vhash):
            raise ReamkitError(f"{p.name} is not a variant of {reference.name}: its vocabulary differs "
                               f"({v[0]} tokens vs {n_vocab})")
    need = kld_bytes(n_vocab, opts.tokens) * (1 if opts.text is not None else len(opts.sets))
    if need > opts.disk_budget_gb * 1e9:
        raise ReamkitError(f"the reference logits would take {need / 1e9:.1f} GB for {opts.tokens} tokens per set "
                           f"(vocabulary {n_vocab}), over the {opts.disk_budget_gb:g} GB disk budget",
                           fix="lower --tokens or raise --disk-budget-gb")
    sets: dict[str, str] = {}
    if opts.text is not None:
        if not Path(opts.text).is_file():
            raise ReamkitError(f"no such evaluation file: {opts.text}")
        sets[Path(opts.text).stem] = Path(opts.text).read_text(encoding="utf-8", errors="replace")
    else:
        for kind in opts.sets:
            sets[kind] = heldout_text(kind, opts.tokens * 8 + opts.ctx * 16)
    for name, text in sets.items():
        if not text.strip():
            raise ReamkitError(f"the evaluation set {name!r} is empty")

    chunks = math.ceil(opts.tokens / (opts.ctx // 2 - 1))
    ref_dir = run_dir / "reference"
    out_dir = run_dir / "fidelity"
    ref_dir.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    ref_fp = file_hash(reference)
    owner = ref_dir / "reference.json"
    if owner.is_file():
        previous = json.loads(owner.read_text())
        if previous.get("fingerprint") != ref_fp:
            raise OutputExistsError(f"{run_dir} holds results against another reference ({previous.get('path')})",
                               fix="choose another --output folder")
    else:
        write_json(owner, {"path": str(reference.resolve()), "fingerprint": ref_fp, "n_vocab": n_vocab})
    bases: dict[str, tuple[Path, dict]] = {}
    for name, text in sets.items():
        txt = ref_dir / f"{name}.txt"
        if not txt.is_file() or txt.read_text(encoding="utf-8") != text:
            with atomic_file(txt) as tmp:
                tmp.write_text(text, encoding="utf-8")
        kld = ref_dir / f"{name}.kld"
        inputs = {"reference": ref_fp, "text": hashlib.sha256(text.encode()).hexdigest()[:16]}
        params = {"ctx": opts.ctx, "chunks": chunks}
        key = stage_key("reference-logits", inputs, params)
        info_file = ref_dir / f"{name}.json"
        current = read_manifest(kld, folder=False)
        if not (kld.is_file() and current and current.key == key and info_file.is_file()):
            if progress:
                progress(f"reference logits: {name}")
            with atomic_file(kld) as tmp:
                args = ["-m", reference, "-f", txt, "-c", opts.ctx, "--chunks", chunks, "--kl-divergence-base", tmp,
                        *_threads(opts)]
                text = _perplexity(args, lambda t: bool(parse_base_ppl(t)))
                base = parse_base_ppl(text)
                lines = text.splitlines()
                scored = _scored_tokens("\n".join(lines), opts.ctx)
                if not base or scored < MIN_TOKENS:
                    raise ReamkitError(f"the evaluation set {name!r} is too short for --ctx {opts.ctx}: "
                                       f"{scored} scored tokens, at least {MIN_TOKENS} needed")
                write_json(info_file, {**base, "tokens": scored, "chunks": scored // (opts.ctx // 2 - 1),
                                       "ctx": opts.ctx, "reference": str(reference)})
                write_manifest(manifest_path_for(kld, folder=False), Manifest.new(
                    "reference-logits", inputs=inputs, params=params, info={"reference": str(reference)},
                    outputs={"file": kld.name}))
        bases[name] = (kld, json.loads(info_file.read_text()))

    results = []
    for p in paths:
        res = Fidelity(variant=p.name.removesuffix(".gguf"), path=p)
        for name, (kld, base) in bases.items():
            if progress:
                progress(f"{res.variant}: {name}")
            args = ["-m", p, "-c", opts.ctx, "--kl-divergence-base", kld, "--kl-divergence", *_threads(opts)]
            log = _perplexity(args, lambda t: "Same top p:" in t)
            figures = parse_kld_output(log)
            res.sets[name] = {**figures, **kld_uncertainty(log, figures, base["tokens"]), "tokens": base["tokens"],
                              "ctx": opts.ctx}
        write_json(out_dir / f"{res.variant}.json", {
            **res.as_dict(), "path": run_relative(p, run_dir), "reference": run_relative(reference, run_dir), "reference_fingerprint": ref_fp,
            "variant_fingerprint": file_hash(p), "bytes": p.stat().st_size})
        results.append(res)
    return results


def _perplexity(args: list, complete: Callable[[str], bool], attempts: int = 8) -> str:
    """Run llama-perplexity until its log is complete.

    The tools run with a short grace at exit for their log thread (:mod:`reamkit.llamacpp.process`); where that
    is not enough (or no C compiler built it), the summary we parse can still be lost. The computation itself is
    complete and deterministic, so running it again is correct, only slower.
    """
    return run_tool("llama-perplexity", args, complete=complete, attempts=attempts).text


def _scored_tokens(text: str, ctx: int) -> int:
    m = re.search(r"calculating perplexity over (\d+) chunks", text)
    return int(m.group(1)) * (ctx // 2 - 1) if m else 0   # positions ctx/2 .. ctx-2 predict the next token


def fidelity_table(results: list[Fidelity]):
    """A rich table: one row per variant and set, each figure with its standard error."""
    from rich.table import Table

    def num(v, fmt):
        return "n/a" if v is None else format(v, fmt)

    t = Table(title="fidelity against the reference")
    for col in ("variant", "set", "tokens", "mean KLD", "99% KLD", "same top-1 %", "PPL"):
        t.add_column(col, justify="left" if col in ("variant", "set") else "right", no_wrap=True)
    for r in results:
        for name, s in r.sets.items():
            t.add_row(r.variant, name, str(s["tokens"]),
                      f"{num(s.get('kld_mean'), '.5f')} ± {sig(s.get('kld_mean_se'))}",
                      f"{num(s.get('kld_p99'), '.5f')} ± {sig(s.get('kld_p99_se'))}",
                      f"{num(s.get('same_top1_pct'), '.2f')} ± {sig(s.get('same_top1_pct_se'))}",
                      f"{num(s.get('ppl'), '.3f')} ± {num(s.get('ppl_err'), '.3f')}")
    return t
