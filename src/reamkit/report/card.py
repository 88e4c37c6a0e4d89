"""``reamkit card``: a model card (``RUN_DIR/report/README.md``) in the style of mradermacher's GGUF cards --
About, Usage, a ``| Link | Type | Size/GB | ... | Notes |`` table sorted by size -- with measured columns where
those cards have adjectives ("fast, recommended"). Every number comes from :func:`compare` (the same rows as
``report/compare.json``, formatted by the same function); nothing is typed in by hand.

How the model was compressed is read from the compressed checkpoint a variant was made from (``config.json``
``merge_args`` and ``compression/report.json``, when ``variants.json`` names it), else from ``run.json``; when
neither says, the card says so.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..fsutil import atomic_file
from .compare import Comparison, compare, fmt
from .runinfo import read_run_info, read_variants

CARD_COLUMNS = (("method", "Method"), ("type", "Type"), ("size_gb", "Size/GB"), ("bpw", "bits/weight"), ("kld_mean", "KLD"),
                ("top1_pct", "same top-1 %"), ("pass_at_1", "pass@1"), ("pp_tps", "pp t/s"), ("tg_tps", "tg t/s"))


def compression_facts(run_dir: Path) -> list[dict]:
    """One entry per compressed model behind the variants: method, experts before/after, calibration mix."""
    facts: dict[str, dict] = {}
    for name, e in read_variants(run_dir).items():
        if not e.model or e.method == "none" or e.model in facts:
            continue
        folder = _model_folder(Path(run_dir), e.model)
        info: dict = {"model": folder.name, "method": e.method, "experts_after": e.experts}
        try:
            merge = json.loads((folder / "config.json").read_text()).get("merge_args") or {}
        except (OSError, ValueError):
            merge = {}
        try:
            rep = json.loads((folder / "compression" / "report.json").read_text())
        except (OSError, ValueError):
            rep = {}
        info["method"] = rep.get("method") or merge.get("method") or e.method
        info["experts_before"] = rep.get("experts_before") or merge.get("experts_before")
        info["experts_after"] = rep.get("experts_after") or e.experts
        calib = rep.get("calibration") or merge.get("calibration")
        info["calibration"] = calib
        info["source"] = ("compression/report.json" if rep else "config.json merge_args" if merge else None)
        info["layer_plans"] = [{"layer": lay["layer"], "auto": lay["auto"]} for lay in rep.get("layers", [])
                               if isinstance(lay, dict) and lay.get("auto")]
        facts[e.model] = info
    if not facts:
        run = read_run_info(run_dir)
        if run.get("method") or run.get("calibration"):
            facts["run.json"] = {"model": run.get("model_name"), "method": run.get("method"),
                                 "experts_before": run.get("experts_before"), "experts_after": run.get("experts_after"),
                                 "calibration": run.get("calibration"), "source": "run.json"}
    return list(facts.values())


def _model_folder(run_dir: Path, model: str) -> Path:
    """``variants.json``'s ``model``: a folder (absolute or relative to the run) or a name under ``models/``."""
    for cand in (Path(model), run_dir / model, run_dir / "models" / model):
        if cand.is_dir():
            return cand
    return Path(model)


def _calibration_text(c) -> str:
    if not c:
        return "calibration mix not recorded"
    if isinstance(c, dict):
        mix = c.get("mix", "?")
        extra = f", {c['samples']} x {c['seq_len']} tokens" if c.get("samples") and c.get("seq_len") else ""
        return f"calibration {mix}{extra}"
    return f"calibration {c}"


def _compression_lines(facts: list[dict]) -> list[str]:
    if not facts:
        return ["- Compression: **unknown** -- this run folder does not record how the model was compressed "
                "(no `variants.json` model folder with `merge_args`, no `run.json`)."]
    lines = []
    for f in facts:
        experts = (f"{f['experts_before']} -> {f['experts_after']} routed experts per layer"
                   if f.get("experts_before") and f.get("experts_after") else
                   f"{f['experts_after']} routed experts per layer" if f.get("experts_after") else "expert count not recorded")
        method = (f.get("method") or "unknown").upper()
        lines.append(f"- Compression of `{f.get('model') or 'the model'}`: {method}, {experts}, "
                     f"{_calibration_text(f.get('calibration'))} (from {f.get('source') or 'nowhere'}).")
    return lines


def _layer_plan_lines(facts: list[dict]) -> list[str]:
    """Per compressed model whose plans were chosen by measured error: each layer's plan and the error of
    every alternative (from its ``compression/report.json``)."""
    from ..compression.report import plan_choice_lines

    out = []
    for f in facts:
        table = plan_choice_lines({"layers": f.get("layer_plans") or []})
        if table:
            out += [f"## Compression plan per layer of `{f.get('model') or 'the model'}`", "", *table[2:]]
    return out


def _llama_cpp_commit() -> str:
    from ..toolchain import pins

    return pins().llama_cpp_commit


def _model_name(comp: Comparison, given: str | None, run: dict) -> str:
    if given:
        return given
    if run.get("model_name"):
        return str(run["model_name"])
    stems = {r["variant"].rsplit(".", 1)[0] for r in comp.rows}
    return stems.pop() if len(stems) == 1 else Path(comp.run_dir).resolve().name


def card_markdown(comp: Comparison, *, model_name: str | None = None, repo: str | None = None) -> str:
    run = read_run_info(comp.run_dir)
    name = _model_name(comp, model_name, run)
    base = run.get("base_model", "unknown")
    methods = sorted({r["method"] for r in comp.rows if r["method"] not in ("none", "unknown")})
    commit = _llama_cpp_commit()
    rows = [r for r in comp.rows if r.get("file")]
    speed = next((r for r in rows if r.get("threads")), None)
    out = ["---", f"base_model: {base}", "library_name: gguf", "tags:", "- gguf", "- reamkit",
           *[f"- {m}" for m in methods], "quantized_by: reamkit", "---", "",
           f"# {name} GGUF", "", "## About", "",
           f"Quantized GGUF variants of **{name}** (base model: {base}), made and measured with reamkit.", "",
           *([str(run["description"]), ""] if run.get("description") else []),
           *_compression_lines(compression_facts(comp.run_dir)),
           f"- Quantized with llama.cpp commit `{commit}` (pinned by reamkit in `constraints.txt`).", "",
           "## Usage", "",
           "Any llama.cpp build that knows the model's architecture runs these files; reamkit serves them to "
           "coding agents with OpenAI and Anthropic endpoints (see below).", "",
           "## Provided Quants", "",
           "(sorted by size; every figure was measured in this run, n/a = not measured; KLD = mean of the "
           f"held-out {' and '.join(comp.sets) or 'evaluation'} sets' mean KL divergence from the reference)", "",
           "| Link | " + " | ".join(h for _, h in CARD_COLUMNS) + " | Notes |",
           "|:-----|:-----|:-----|" + "|".join("--------:" for _ in CARD_COLUMNS[2:]) + "|:------|"]
    for r in rows:
        link = f"https://huggingface.co/{repo}/resolve/main/{r['file']}" if repo else r["file"]
        cells = [fmt(k, r.get(k)) for k, _ in CARD_COLUMNS]
        out.append(f"| [GGUF]({link}) | " + " | ".join(cells) + f" | {', '.join(r['notes'])} |")
    out += ["", "## How to run each file", ""]
    for r in rows:
        out += [f"**{r['type']}** (`{r['file']}`):", "", "```bash", f"reamkit serve {r['file']}",
                f"llama-server -m {r['file']} --jinja --host 127.0.0.1 --port 8080 -c 32768", "```", ""]
    out += _layer_plan_lines(compression_facts(comp.run_dir))
    out += ["## How these were measured", "",
            "- KLD and same top-1 %: `reamkit evaluate` (llama-perplexity --kl-divergence against the unquantized "
            "reference on held-out code and math that no calibration saw).",
            "- pass@1: HumanEval, where the run has it." if any(r.get("pass_at_1") is not None for r in rows)
            else "- pass@1: not measured in this run.",
            (f"- Speed: `reamkit speed` (llama-bench, {speed['threads']} threads on {speed['cpu']}); tokens/s depend "
             "on the machine." if speed else "- Speed: not measured in this run."),
            "- Notes are derived from the numbers: Pareto = no other file is both smaller and closer to the "
            "reference; recommended = the smallest Pareto file within the run's KLD and pass@1 margins "
            "(see `report/compare.md`).", ""]
    return "\n".join(out)


def write_card(run_dir: Path, *, model_name: str | None = None, repo: str | None = None) -> Path:
    """Compare the run (refreshing ``report/compare.*``) and write ``report/README.md``."""
    comp = compare(Path(run_dir))
    path = Path(run_dir) / "report" / "README.md"
    with atomic_file(path) as tmp:
        tmp.write_text(card_markdown(comp, model_name=model_name, repo=repo))
    return path

