"""``reamkit card``: a model card (``RUN_DIR/report/README.md``) in the style of mradermacher's GGUF cards --
About, Usage, a ``| Link | Type | Size/GB | ... | Notes |`` table sorted by size -- with measured columns where
those cards have adjectives ("fast, recommended"). Every number comes from :func:`compare` (the same rows as
``report/compare.json``, formatted by the same function) with its error; nothing is typed in by hand. It opens
with the answer (:mod:`.answer`); a column that cannot tell any two variants apart is replaced by one line.

How the model was compressed is read from the compressed checkpoint a variant was made from (``config.json``
``merge_args`` and ``compression/report.json``, when ``variants.json`` names it), else from ``run.json``; when
neither says, the card says so.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from ..defaults import CONTEXT, HOST, PORT
from ..fsutil import atomic_file
from ..evaluation.stats import Z
from .compare import Comparison, compare, fmt, with_error
from .answer import answer_lines
from .evidence import indistinct
from .runinfo import read_run_info, read_variants

PLOTS = {"size_vs_kld.png": "size vs KLD, Pareto front drawn", "size_vs_pass.png": "size vs HumanEval pass@1"}
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
    from ..llamacpp.toolchain import pins

    return pins().llama_cpp_commit


def _model_name(comp: Comparison, given: str | None, run: dict) -> str:
    if given:
        return given
    if run.get("model_name"):
        return str(run["model_name"])
    stems = {r["variant"].rsplit(".", 1)[0] for r in comp.rows}
    return stems.pop() if len(stems) == 1 else Path(comp.run_dir).resolve().name


def _links(comp: Comparison, repo: str | None, beside: bool) -> Callable[[Path], str]:
    """Where the card's links point: the Hub, a file beside the card (a release folder), or the file in the run
    folder seen from ``report/``."""
    if repo:
        return lambda p: f"https://huggingface.co/{repo}/resolve/main/{p.name}"
    if beside:
        return lambda p: p.name
    here = (Path(comp.run_dir) / "report").resolve()
    return lambda p: os.path.relpath((Path(comp.run_dir) / p).resolve(), here)


def card_markdown(comp: Comparison, *, model_name: str | None = None, repo: str | None = None,
                  model: str | None = None, beside: bool = False) -> str:
    """The card of the run, or of one ``model`` of it (its variants only). Links point at the run's files
    (from ``report/``), at files beside the card (``beside``: a release folder) or at the Hub (``repo``)."""
    run = read_run_info(comp.run_dir)
    name = model_name or model or _model_name(comp, model_name, run)
    base = run.get("base_model", "unknown")
    shown = [r for r in comp.rows if model is None or r.get("model") == model]
    methods = sorted({r["method"] for r in shown if r["method"] not in ("none", "unknown")})
    commit = _llama_cpp_commit()
    rows = [r for r in shown if r.get("file")]
    link_to = _links(comp, repo, beside)
    facts = [f for f in compression_facts(comp.run_dir) if model is None or f.get("model") == model]
    uncompressed = model is not None and not facts and all(r["method"] == "none" for r in shown)
    speed = next((r for r in rows if r.get("threads")), None)
    cols, dropped = card_columns(rows)
    out = ["---", f"base_model: {base}", "library_name: gguf", "tags:", "- gguf", "- reamkit",
           *[f"- {m}" for m in methods], "quantized_by: reamkit", "---", "",
           f"# {name} GGUF", "", *answer_lines(comp), "## About", "",
           f"Quantized GGUF variants of **{name}** (base model: {base}), made and measured with reamkit.", "",
           *([str(run["description"]), ""] if run.get("description") else []),
           *(["- Compression: none (the original model's experts)."] if uncompressed else _compression_lines(facts)),
           f"- Quantized with llama.cpp commit `{commit}` (pinned by reamkit in `constraints.txt`).", "",
           "## Usage", "",
           "Any llama.cpp build that knows the model's architecture runs these files; reamkit serves them to "
           "coding agents with OpenAI and Anthropic endpoints (see below).", "",
           "## Provided Quants", "",
           "(sorted by size; every figure was measured in this run, n/a = not measured; KLD = mean of the "
           f"held-out {' and '.join(comp.sets) or 'evaluation'} sets' mean KL divergence from the reference; "
           "± = standard error; pass@1 with passed/n and its 95% interval; busy = measured while other processes "
           "took the cores)", "",
           "| Link | " + " | ".join(h for _, h in cols) + " | Notes |",
           "|:-----|:-----|:-----|" + "|".join("--------:" for _ in cols[2:]) + "|:------|"]
    for r in rows:
        link = link_to(Path(r["path"]))
        cells = [fmt(k, r.get(k)) if k in ("method", "type", "size_gb", "bpw") else with_error(k, r) for k, _ in cols]
        out.append(f"| [GGUF]({link}) | " + " | ".join(cells) + f" | {', '.join(r['notes'])} |")
    out += dropped
    out += _files_section(comp, {r["model"] for r in rows if r.get("model")}, link_to)
    out += ["", "## How to run each file", ""]
    for r in rows:
        out += [f"**{r['type']}** (`{r['file']}`):", "", "```bash", f"reamkit serve {r['file']}",
                f"llama-server -m {r['file']} --jinja --host {HOST} --port {PORT} -c {CONTEXT}", "```", ""]
    out += _layer_plan_lines(compression_facts(comp.run_dir))
    out += ["## How these were measured", "",
            "- KLD and same top-1 %: `reamkit evaluate` (llama-perplexity --kl-divergence against the unquantized "
            "reference on held-out code and math that no calibration saw).",
            "- pass@1: HumanEval, where the run has it." if any(r.get("pass_at_1") is not None for r in rows)
            else "- pass@1: not measured in this run.",
            (f"- Speed: `reamkit speed` (llama-bench, {speed['threads']} threads on {speed['cpu']}); tokens/s depend "
             "on the machine." if speed else "- Speed: not measured in this run."),
            f"- Notes are derived from the numbers and their errors: a note ranks two files only where they differ "
            f"by more than {Z:g} standard errors (paired on the same chunks and tasks), and ties are named as ties. "
            "Pareto = no other file is smaller without being credibly worse; recommended = the smallest Pareto file "
            "credibly within the run's KLD margin and not credibly below its pass@1 margin (see "
            "`report/compare.md`).", ""]
    return "\n".join(out)


def card_columns(rows: list[dict]) -> tuple[list[tuple[str, str]], list[str]]:
    """The table's columns, and one line for each measured column that cannot tell any two variants apart."""
    cols, lines = [], []
    for key, head in CARD_COLUMNS:
        have = [r for r in rows if r.get(key) is not None]
        if key in ("pass_at_1", "top1_pct", "pp_tps", "tg_tps") and len(have) >= 2 and indistinct(have, key):
            lines.append(_indistinct_line(key, head, have))
            continue
        cols.append((key, head))
    return cols, ([""] + lines if lines else [])


def _indistinct_line(key: str, head: str, rows: list[dict]) -> str:
    values = sorted({fmt(key, r[key]) for r in rows})
    span = values[0] if len(values) == 1 else f"{values[0]} to {values[-1]}"
    if key == "pass_at_1":
        ns = sorted({r.get("humaneval_tasks") for r in rows if r.get("humaneval_tasks")})
        passed = sorted({r.get("pass_at_1_passed") for r in rows if r.get("pass_at_1_passed") is not None})
        count = (f" ({passed[0]}/{ns[0]} each)" if len(passed) == 1 and len(ns) == 1 else
                 f" (n = {', '.join(map(str, ns))})" if ns else "")
        where = f"{span} for every variant" if len(values) == 1 else f"{span} across the variants"
        return (f"- {head}: {where}{count}; this measurement cannot tell the variants apart (no two differ by more "
                f"than {Z:g} standard errors), so it is not a column.")
    return (f"- {head}: {span}; no two variants differ by more than {Z:g} standard errors, so it is not a column.")


def card_files(run_dir: Path, models: set[str]) -> dict[str, list[Path]]:
    """What a card shows besides the GGUFs, relative to the run folder: the plots and each model's imatrix."""
    run_dir = Path(run_dir)
    plots = [Path("report") / n for n in PLOTS if (run_dir / "report" / n).is_file()]
    imatrix = [Path("gguf") / m / f"{m}.imatrix.gguf" for m in sorted(models)
               if (run_dir / "gguf" / m / f"{m}.imatrix.gguf").is_file()]
    return {"plots": plots, "imatrix": imatrix}


def _files_section(comp: Comparison, models: set[str], link_to: Callable[[Path], str]) -> list[str]:
    files = card_files(comp.run_dir, models)
    out = [""]
    for p in files["plots"]:
        out += [f"![{PLOTS[p.name]}]({link_to(p)})", ""]
    for p in files["imatrix"]:
        out.append(f"- Importance matrix used for quantizing: [{p.name}]({link_to(p)})")
    return out


def write_card(run_dir: Path, *, model_name: str | None = None, repo: str | None = None) -> Path:
    """Compare the run (refreshing ``report/compare.*``) and write ``report/README.md``."""
    comp = compare(Path(run_dir))
    path = Path(run_dir) / "report" / "README.md"
    with atomic_file(path) as tmp:
        tmp.write_text(card_markdown(comp, model_name=model_name, repo=repo))
    return path

