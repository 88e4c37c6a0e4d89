"""``reamkit compare``: one row per variant of a run folder, written as ``report/compare.{md,csv,json}`` plus
two plots (size vs KLD with the Pareto front, size vs pass@1).

Columns: method, type, size (GB = 1e9 bytes), bits/weight (file bytes x 8 / parameters in the GGUF), KLD, same
top-1 %, perplexity per held-out set, HumanEval pass@1, prompt and generation tokens/s. **KLD** is the mean
of each evaluated set's mean KLD (code and math by default), so code and math weigh the same whatever their
token counts; top-1 % likewise. A measurement that is not in the run folder is "n/a", never estimated.

The notes come from these numbers only (:func:`derive_notes`):

* ``Pareto``: no other variant is both at most as large and at most as far from the reference (KLD);
* ``best KLD`` / ``smallest`` / ``fastest tg`` / ``fastest pp`` / ``best pass@1``: the extremes of a column
  (only when at least two variants have it and they differ);
* ``best KLD drop per GB``: the Pareto step that buys the most fidelity per added gigabyte, against the next
  smaller Pareto variant;
* ``recommended``: the smallest Pareto variant whose KLD is within :data:`RECOMMEND_KLD_MARGIN` of the lowest
  KLD in the run and, where pass@1 was measured for it and for the best variant, within
  :data:`RECOMMEND_PASS_MARGIN` of the best pass@1.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ReamkitError
from ..fsutil import atomic_file, run_relative, write_json
from .runinfo import VariantRecord, collect, gguf_facts, type_from_name

RECOMMEND_KLD_MARGIN = 0.05      # nats of mean KLD above the run's best
RECOMMEND_PASS_MARGIN = 0.05     # pass@1 (a fraction) below the run's best
NA = "n/a"


@dataclass
class Comparison:
    run_dir: Path
    rows: list[dict]                       # one per variant, sorted by size; see ROW_KEYS
    sets: list[str]                        # held-out sets in the fidelity results (code, math)
    files: dict[str, Path] = field(default_factory=dict)

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
    return row


def pareto(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names of the points no other point dominates (both coordinates lower is better), sorted by the first."""
    front = [n for n, (x, y) in points.items()
             if not any((x2 <= x and y2 <= y) and (x2 < x or y2 < y) for m, (x2, y2) in points.items() if m != n)]
    return sorted(front, key=lambda n: points[n])


def derive_notes(rows: list[dict]) -> dict[str, list[str]]:
    """The notes column, from the numbers alone (rules in the module docstring)."""
    notes: dict[str, list[str]] = {r["variant"]: [] for r in rows}

    def have(key):
        return [r for r in rows if r.get(key) is not None]

    pts = {r["variant"]: (r["size_gb"], r["kld_mean"]) for r in rows if r.get("size_gb") and r.get("kld_mean") is not None}
    front = pareto(pts) if len(pts) >= 2 else []
    for n in front:
        notes[n].append("Pareto")
    gains = [((pts[a][1] - pts[b][1]) / (pts[b][0] - pts[a][0]), b, a) for a, b in zip(front, front[1:])
             if pts[b][0] > pts[a][0]]
    if gains and max(gains)[0] > 0:
        _, best_step, prev = max(gains)
        notes[best_step].append(f"best KLD drop per GB (vs {_short(prev)})")
    for key, label, lowest in (("kld_mean", "best KLD", True), ("size_gb", "smallest", True),
                               ("tg_tps", "fastest tg", False), ("pp_tps", "fastest pp", False),
                               ("pass_at_1", "best pass@1", False)):
        rs = have(key)
        if len(rs) >= 2 and len({r[key] for r in rs}) > 1:      # a tie everywhere (all pass@1 0) crowns nobody
            pick = (min if lowest else max)(rs, key=lambda r: r[key])
            notes[pick["variant"]].append(label)
    rec = recommended(rows, front)
    if rec:
        notes[rec].append("recommended")
    return notes


def recommended(rows: list[dict], front: list[str]) -> str | None:
    if not front:
        return None
    by = {r["variant"]: r for r in rows}
    best_kld = min(r["kld_mean"] for r in rows if r.get("kld_mean") is not None)
    passes = [r["pass_at_1"] for r in rows if r.get("pass_at_1") is not None]
    best_pass = max(passes) if passes else None
    for n in front:                                   # smallest first
        r = by[n]
        if r["kld_mean"] > best_kld + RECOMMEND_KLD_MARGIN:
            continue
        if best_pass is not None and r.get("pass_at_1") is not None and r["pass_at_1"] < best_pass - RECOMMEND_PASS_MARGIN:
            continue
        return n
    return None


def _short(variant: str) -> str:
    return type_from_name(variant) or variant


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
    return Comparison(run_dir=run_dir, rows=rows, sets=sorted({s for r in rows for s in r["kld_sets"]}))


def compare(run_dir: Path, *, plots: bool = True) -> Comparison:
    """Read every result in ``run_dir`` and write ``report/compare.{md,csv,json}`` (+ PNGs); returns the rows."""
    comp = comparison_rows(run_dir)
    rows, sets = comp.rows, comp.sets
    out = comp.run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "compare.json", {"rows": rows, "sets": sets, "kld_mean": "mean over sets of each set's mean KLD",
                                      "rules": {"recommend_kld_margin": RECOMMEND_KLD_MARGIN,
                                                "recommend_pass_margin": RECOMMEND_PASS_MARGIN}})
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


def columns(comp: Comparison) -> list[tuple[str, str]]:
    """(key, header) of the table, per-set perplexities included."""
    label = " + ".join(comp.sets) if comp.sets else "no sets"
    return ([("variant", "Variant"), ("method", "Method"), ("type", "Type"), ("size_gb", "Size/GB"),
             ("bpw", "bits/weight"), ("kld_mean", f"KLD (mean of {label})"), ("top1_pct", "same top-1 %")]
            + [(f"ppl_{s}", f"PPL {s}") for s in comp.sets]
            + [("pass_at_1", "pass@1"), ("pp_tps", "pp t/s"), ("tg_tps", "tg t/s"), ("notes", "Notes")])


def to_markdown(comp: Comparison) -> str:
    cols = columns(comp)
    right = {"size_gb", "bpw", "kld_mean", "top1_pct", "pass_at_1", "pp_tps", "tg_tps"} | {f"ppl_{s}" for s in comp.sets}
    lines = ["| " + " | ".join(h for _, h in cols) + " |",
             "|" + "|".join("-----:" if k in right else ":-----" for k, _ in cols) + "|"]
    for r in comp.rows:
        lines.append("| " + " | ".join(", ".join(r["notes"]) if k == "notes" else fmt(k, r.get(k)) for k, _ in cols)
                     + " |")
    speed = next((r for r in comp.rows if r.get("threads")), None)
    lines += ["", f"KLD: mean over the held-out sets ({', '.join(comp.sets) or 'none'}) of each set's mean KLD "
              "against the reference; n/a = not measured in this run.",
              f"Recommended: the smallest Pareto variant (size vs KLD) within {RECOMMEND_KLD_MARGIN} of the best "
              f"KLD and, where measured, within {RECOMMEND_PASS_MARGIN} of the best pass@1."]
    if speed:
        lines.append(f"Speed: llama-bench on {speed['cpu']}, {speed['threads']} threads.")
    return "\n".join(lines) + "\n"


def to_csv(comp: Comparison) -> str:
    keys = ["variant", "method", "type", "experts", "size_bytes", "size_gb", "n_params", "bpw", "kld_mean", "kld_p99",
            "top1_pct", *[f"kld_{s}" for s in comp.sets], *[f"ppl_{s}" for s in comp.sets], "pass_at_1",
            "humaneval_tasks", "pp_tps", "tg_tps", "bandwidth_share", "load_s", "peak_rss_gb", "notes", "path"]
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
        t.add_row(*[", ".join(r["notes"]) if k == "notes" else fmt(k, r.get(k)) for k, _ in cols])
    return t


def load_comparison(run_dir: Path) -> dict:
    path = Path(run_dir) / "report" / "compare.json"
    if not path.is_file():
        raise ReamkitError(f"no comparison in {run_dir}", fix=f"run reamkit compare {run_dir}")
    return json.loads(path.read_text())
