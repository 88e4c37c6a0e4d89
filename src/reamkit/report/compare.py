"""``reamkit compare``: one row per variant of a run folder, written as ``report/compare.{md,csv,json}`` plus
two plots (size vs KLD with the Pareto front, size vs pass@1).

Columns: method, type, size (GB = 1e9 bytes), bits/weight (file bytes x 8 / parameters in the GGUF), KLD, same
top-1 %, perplexity per held-out set, HumanEval pass@1, prompt and generation tokens/s. **KLD** is the mean
of each evaluated set's mean KLD (code and math by default), so code and math weigh the same whatever their
token counts; top-1 % likewise. A measurement that is not in the run folder is "n/a", never estimated.

Every KLD, top-1 and pass@1 figure carries its standard error (``*_se``; pass@1 also its 95% Wilson interval
and n), speeds their error and a ``speed_busy`` mark; ``differences`` in ``compare.json`` holds, per type, the
paired difference between variants made by different methods (REAM - REAP, REAM - uncompressed, ...) on the
same chunks and tasks (:mod:`.evidence`). The notes come from these numbers and their errors only
(:mod:`.notes`): nothing is ranked on a difference smaller than its error.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

from ..fsutil import atomic_file, run_relative, write_json
from ..evaluation.stats import Z, sig
from .evidence import error_fields, private_fields, same_type_differences
from .notes import RECOMMEND_KLD_MARGIN, RECOMMEND_PASS_MARGIN, derive_notes, pareto
from .runinfo import VariantRecord, collect, gguf_facts, type_from_name

__all__ = ["RECOMMEND_KLD_MARGIN", "RECOMMEND_PASS_MARGIN", "Comparison", "compare", "comparison_rows",
           "derive_notes", "fmt", "pareto"]
NA = "n/a"


@dataclass
class Comparison:
    run_dir: Path
    rows: list[dict]                       # one per variant, sorted by size; see ROW_KEYS
    sets: list[str]                        # held-out sets in the fidelity results (code, math)
    files: dict[str, Path] = field(default_factory=dict)
    differences: list[dict] = field(default_factory=list)     # same type, different method: paired a - b

    def row(self, variant: str) -> dict:
        return next(r for r in self.rows if r["variant"] == variant)


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals and len(vals) == len(values) else None


def build_row(rec: VariantRecord) -> dict:
    fid, he, sp = (rec.results.get(k, {}) for k in ("fidelity", "humaneval", "speed"))
    facts = None
    if rec.path is not None and rec.path.is_file():
        facts = gguf_facts(rec.path)
    size = facts.file_bytes if facts else (fid.get("bytes") or sp.get("file_bytes"))
    n_params = facts.n_params if facts else sp.get("n_params")
    entry = rec.entry
    vtype = (entry.type if entry and entry.type else None) or type_from_name(rec.name) \
        or (facts.file_type if facts else None) or "unknown"
    sets = fid.get("sets", {})
    row = {
        "variant": rec.name, "method": entry.method if entry else "unknown", "type": vtype,
        "experts": entry.experts if entry else None, "model": entry.model if entry else None,
        "path": str(rec.path) if rec.path else None, "file": rec.path.name if rec.path else None,
        "size_bytes": size, "size_gb": size / 1e9 if size else None, "n_params": n_params,
        "bpw": size * 8 / n_params if size and n_params else None,
        "kld_mean": _mean([s.get("kld_mean") for s in sets.values()]) if sets else None,
        "kld_p99": _mean([s.get("kld_p99") for s in sets.values()]) if sets else None,
        "top1_pct": _mean([s.get("same_top1_pct") for s in sets.values()]) if sets else None,
        "kld_sets": sorted(sets),
        "pass_at_1": he.get("pass_at_1"), "humaneval_tasks": he.get("n_tasks"),
        "pp_tps": sp.get("pp_tps"), "tg_tps": sp.get("tg_tps"), "bandwidth_share": sp.get("bandwidth_share"),
        "load_s": sp.get("load_s"), "peak_rss_gb": sp["peak_rss_bytes"] / 1e9 if sp.get("peak_rss_bytes") else None,
        "threads": sp.get("threads"), "cpu": sp.get("cpu"),
    }
    for name, s in sets.items():
        row[f"kld_{name}"] = s.get("kld_mean")
        row[f"ppl_{name}"] = s.get("ppl")
    row.update(error_fields(fid, he, sp))
    row.update(private_fields(fid, he))
    return row


def public(row: dict) -> dict:
    """A row as written to compare.json (the per-chunk and per-task values stay in the stages' own files)."""
    return {k: v for k, v in row.items() if not k.startswith("_")}


def comparison_rows(run_dir: Path) -> Comparison:
    """The comparison without writing anything (``reamkit fit`` ranks a run's variants with it)."""
    run_dir = Path(run_dir)
    records, _ = collect(run_dir)
    rows = sorted((build_row(r) for r in records), key=lambda r: (r["size_bytes"] is None, r["size_bytes"] or 0,
                                                                  r["variant"]))
    notes = derive_notes(rows)
    for r in rows:
        r["notes"] = notes[r["variant"]]
        if r["path"]:
            r["path"] = run_relative(Path(r["path"]), run_dir)    # as the run folder records it
    return Comparison(run_dir=run_dir, rows=rows, sets=sorted({s for r in rows for s in r["kld_sets"]}),
                      differences=same_type_differences(rows))


def compare(run_dir: Path, *, plots: bool = True) -> Comparison:
    """Read every result in ``run_dir`` and write ``report/compare.{md,csv,json}`` (+ PNGs); returns the rows."""
    comp = comparison_rows(run_dir)
    rows, sets = comp.rows, comp.sets
    out = comp.run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "compare.json", {
        "rows": [public(r) for r in rows], "sets": sets, "differences": comp.differences,
        "kld_mean": "mean over sets of each set's mean KLD", "se": "standard error; *_se over evaluation chunks "
        "(pass@1: binomial, with its 95% Wilson interval)",
        "rules": {"recommend_kld_margin": RECOMMEND_KLD_MARGIN, "recommend_pass_margin": RECOMMEND_PASS_MARGIN,
                  "differs_beyond_standard_errors": Z}})
    with atomic_file(out / "compare.csv") as tmp:
        tmp.write_text(to_csv(comp))
    with atomic_file(out / "compare.md") as tmp:
        tmp.write_text(to_markdown(comp))
    comp.files = {"json": out / "compare.json", "csv": out / "compare.csv", "md": out / "compare.md"}
    if plots:
        from .plots import plot_pass_vs_size, plot_size_vs_kld

        comp.files["kld_png"] = plot_size_vs_kld(comp, out / "size_vs_kld.png")
        comp.files["pass_png"] = plot_pass_vs_size(comp, out / "size_vs_pass.png")
    return comp


# --- formatting: the one place numbers become text (the card uses it too) -------------------------------------

def fmt(key: str, v) -> str:
    if v is None:
        return NA
    if key == "size_gb":
        return f"{v:.1f}" if v >= 10 else f"{v:.2f}" if v >= 1 else f"{v:.3g}"
    if key in ("kld", "kld_p99") or key.startswith("kld_"):
        return f"{v:.4g}"
    if key in ("bpw", "pass_at_1", "bandwidth_share"):
        return f"{v:.2f}" if key != "pass_at_1" else f"{v:.3f}"
    if key in ("top1_pct",):
        return f"{v:.1f}"
    if key.startswith("ppl_") or key in ("pp_tps", "tg_tps"):
        return f"{v:.0f}" if v >= 1000 else f"{v:.1f}" if v >= 10 else f"{v:.2f}"
    return str(v)


def text(key: str, r: dict) -> str:
    """A table cell of row ``r``: ``fmt`` of the value, with its error written in the columns made for it."""
    if key == "notes":
        return ", ".join(r["notes"])
    if key.endswith("_se") and r.get(key.removesuffix("_se")) is not None:
        cell = f"± {sig(r.get(key))}"
        busy = key in ("tg_tps_se", "pp_tps_se") and r.get("speed_busy")
        return cell + (" busy" if busy else "")
    if key == "pass_at_1_ci95":
        ci, n = r.get(key), r.get("humaneval_tasks")
        return NA if not ci else f"{r.get('pass_at_1_passed')}/{n}, 95% {ci[0]:.2f}-{ci[1]:.2f}"
    return fmt(key, r.get(key))


def with_error(key: str, r: dict) -> str:
    """One cell holding a value and its error (the card): ``0.01234 ± 0.0021``, ``0.400 (40/100, 95% 0.31-0.50)``,
    ``112 ± 3.1 busy``."""
    v = fmt(key, r.get(key))
    if r.get(key) is None:
        return v
    if key == "pass_at_1":
        return f"{v} ({text('pass_at_1_ci95', r)})" if r.get("pass_at_1_ci95") else v
    if f"{key}_se" in r:
        return f"{v} {text(key + '_se', r)}"
    return v


def columns(comp: Comparison) -> list[tuple[str, str]]:
    """(key, header) of the table, per-set perplexities included; each measured figure followed by its error."""
    label = " + ".join(comp.sets) if comp.sets else "no sets"
    return ([("variant", "Variant"), ("method", "Method"), ("type", "Type"), ("size_gb", "Size/GB"),
             ("bpw", "bits/weight"), ("kld_mean", f"KLD (mean of {label})"), ("kld_mean_se", "KLD SE"),
             ("top1_pct", "same top-1 %"), ("top1_pct_se", "top-1 SE")]
            + [(f"ppl_{s}", f"PPL {s}") for s in comp.sets]
            + [("pass_at_1", "pass@1"), ("pass_at_1_ci95", "pass@1 passed, interval"), ("pp_tps", "pp t/s"),
               ("pp_tps_se", "pp SE"), ("tg_tps", "tg t/s"), ("tg_tps_se", "tg SE"), ("notes", "Notes")])


def to_markdown(comp: Comparison) -> str:
    cols = columns(comp)
    left = {"variant", "method", "type", "notes"}
    lines = ["| " + " | ".join(h for _, h in cols) + " |",
             "|" + "|".join(":-----" if k in left else "-----:" for k, _ in cols) + "|"]
    for r in comp.rows:
        lines.append("| " + " | ".join(text(k, r) for k, _ in cols) + " |")
    speed = next((r for r in comp.rows if r.get("threads")), None)
    lines += ["", f"KLD: mean over the held-out sets ({', '.join(comp.sets) or 'none'}) of each set's mean KLD "
              "against the reference; SE = standard error over the evaluation chunks; n/a = not measured in "
              "this run.",
              f"Notes rank two variants only where they differ by more than {Z:g} standard errors of the difference "
              "(paired on the same chunks and tasks); otherwise they are a tie.",
              f"Recommended: the smallest Pareto variant (size vs KLD) credibly within {RECOMMEND_KLD_MARGIN} of the "
              f"best KLD and, where measured, not credibly more than {RECOMMEND_PASS_MARGIN} below the best pass@1."]
    if speed:
        lines.append(f"Speed: llama-bench on {speed['cpu']}, {speed['threads']} threads; median of the samples, "
                     "SE of the median; busy = other processes took the cores the benchmark needed.")
    lines += difference_lines(comp)
    return "\n".join(lines) + "\n"


def difference_lines(comp: Comparison) -> list[str]:
    """The same-type, different-method differences (a - b) as a small table."""
    if not comp.differences:
        return []
    out = ["", "Paired differences between variants of the same type (a - b; SE over the same chunks/tasks):", "",
           "| Type | a - b | KLD | same top-1 % | pass@1 |", "|:-----|:-----|-----:|-----:|-----:|"]
    for d in comp.differences:
        cells = []
        for key in ("kld_mean", "top1_pct", "pass_at_1"):
            x = d[key]
            cells.append(NA if x is None else f"{x['diff']:+.4g} ± {sig(x['se'])} ({x['verdict']})")
        out.append(f"| {d['type']} | {d['label']} | " + " | ".join(cells) + " |")
    return out


def to_csv(comp: Comparison) -> str:
    keys = ["variant", "method", "type", "experts", "size_bytes", "size_gb", "n_params", "bpw", "kld_mean",
            "kld_mean_se", "kld_p99", "kld_p99_se", "top1_pct", "top1_pct_se", *[f"kld_{s}" for s in comp.sets],
            *[f"ppl_{s}" for s in comp.sets], "pass_at_1", "pass_at_1_se", "pass_at_1_passed", "humaneval_tasks",
            "pp_tps", "pp_tps_se", "tg_tps", "tg_tps_se", "speed_busy", "bandwidth_share", "load_s", "peak_rss_gb",
            "notes", "path"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(keys)
    for r in comp.rows:
        w.writerow(["; ".join(r["notes"]) if k == "notes" else (NA if r.get(k) is None else r.get(k)) for k in keys])
    return buf.getvalue()


def comparison_table(comp: Comparison):
    """A rich table of the markdown columns, for the terminal."""
    from rich.table import Table

    t = Table(title=f"variants in {comp.run_dir}")
    cols = columns(comp)
    for k, h in cols:
        t.add_column(h, justify="left" if k in ("variant", "method", "type", "notes") else "right",
                     no_wrap=k in ("variant", "type"))
    for r in comp.rows:
        t.add_row(*[text(k, r) for k, _ in cols])
    return t
