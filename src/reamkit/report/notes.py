"""The notes column, drawn from the numbers and their errors only (:mod:`.evidence` decides what differs, here
against the figures' own error bars as shown, so that no note contradicts them).

* ``Pareto``: no other variant is smaller (beyond :data:`~.evidence.SIZE_TIE`) with a KLD not credibly worse,
  or as small with a KLD credibly better;
* ``best KLD`` / ``smallest`` / ``fastest tg`` / ``fastest pp`` / ``best pass@1``: the extreme of a column, only
  when it is credibly ahead of every other variant; when some are within the error of it they are all ``tied
  best ...``; when none of the column's variants differs, nobody is named. Speeds measured on a busy machine
  are not ranked;
* ``best KLD drop per GB``: the Pareto step that buys the most fidelity per added gigabyte, against the next
  smaller Pareto variant, when its gain is credible and credibly larger than every other step's;
* ``recommended``: the smallest Pareto variant whose KLD is credibly within :data:`RECOMMEND_KLD_MARGIN` of the
  lowest KLD in the run (its difference plus its error) and whose pass@1, where measured, is not credibly more
  than :data:`RECOMMEND_PASS_MARGIN` below the best; a Pareto variant of the same size and a KLD within the
  error shares it as ``recommended (tie)``.
"""

from __future__ import annotations

from ..evaluation.stats import Z
from .evidence import compare_figure, diff_se, indistinct
from .runinfo import type_from_name

RECOMMEND_KLD_MARGIN = 0.05      # nats of mean KLD above the run's best
RECOMMEND_PASS_MARGIN = 0.05     # pass@1 (a fraction) below the run's best
EXTREMES = (("kld_mean", "best KLD"), ("size_gb", "smallest"), ("tg_tps", "fastest tg"), ("pp_tps", "fastest pp"),
            ("pass_at_1", "best pass@1"))


def pareto(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names of the points no other point dominates (both coordinates lower is better), sorted by the first."""
    front = [n for n, (x, y) in points.items()
             if not any((x2 <= x and y2 <= y) and (x2 < x or y2 < y) for m, (x2, y2) in points.items() if m != n)]
    return sorted(front, key=lambda n: points[n])


def dominates(a: dict, b: dict) -> bool:
    """a makes b pointless: smaller and not credibly worse, or the same size and credibly better."""
    size, kld = compare_figure(a, b, "size_gb"), compare_figure(a, b, "kld_mean", True)
    return (size < 0 and kld <= 0) or (size == 0 and a["size_gb"] <= b["size_gb"] and kld < 0)


def pareto_front(rows: list[dict]) -> list[str]:
    """The Pareto front of size vs KLD under the errors (see the module docstring), smallest first."""
    pts = [r for r in rows if r.get("size_gb") and r.get("kld_mean") is not None]
    if len(pts) < 2:
        return []
    front = [b for b in pts if not any(dominates(a, b) for a in pts if a is not b)]
    return [r["variant"] for r in sorted(front, key=lambda r: (r["size_gb"], r["kld_mean"]))]


def _ranked(rows: list[dict], key: str) -> list[dict]:
    rs = [r for r in rows if r.get(key) is not None]
    if key in ("tg_tps", "pp_tps"):
        rs = [r for r in rs if not r.get("speed_busy")]
    return rs


def extreme(rows: list[dict], key: str) -> tuple[list[str], bool]:
    """(variants at the top of ``key``, tied?); empty when the column cannot tell its variants apart."""
    rs = _ranked(rows, key)
    if len(rs) < 2 or indistinct(rs, key):
        return [], False
    lower = key in ("kld_mean", "size_gb")
    top = (min if lower else max)(rs, key=lambda r: r[key])
    tied = [r["variant"] for r in rs if r is top or compare_figure(r, top, key, True) == 0]
    return tied, len(tied) > 1


def derive_notes(rows: list[dict]) -> dict[str, list[str]]:
    """The notes column, from the numbers and their errors alone (rules in the module docstring)."""
    notes: dict[str, list[str]] = {r["variant"]: [] for r in rows}
    by = {r["variant"]: r for r in rows}
    front = pareto_front(rows)
    for n in front:
        notes[n].append("Pareto")
    step = best_step(by, front)
    if step:
        short = _short(step[1])
        same = sum(_short(r["variant"]) == short for r in rows) > 1          # REAM and REAP files of one type
        notes[step[0]].append(f"best KLD drop per GB (vs {step[1] if same else short})")
    for key, label in EXTREMES:
        names, tied = extreme(rows, key)
        for n in names:
            notes[n].append(f"tied {label}" if tied else label)
    rec = recommended(rows, front)
    if rec:
        twins = [n for n in front if n != rec and compare_figure(by[n], by[rec], "size_gb") == 0
                 and compare_figure(by[n], by[rec], "kld_mean", True) == 0]
        for n in [rec, *twins]:
            notes[n].append("recommended (tie)" if twins else "recommended")
    return notes


def best_step(by: dict[str, dict], front: list[str]) -> tuple[str, str] | None:
    """(variant, the smaller one it is measured against) of the credibly best KLD gain per GB on the front."""
    steps = []
    for a, b in zip(front, front[1:]):
        ra, rb = by[a], by[b]
        dsize = rb["size_gb"] - ra["size_gb"]
        if dsize <= 0 or compare_figure(rb, ra, "kld_mean", True) >= 0:     # the larger must be credibly better
            continue
        se, _ = diff_se(ra, rb, "kld_mean", True)
        steps.append(((ra["kld_mean"] - rb["kld_mean"]) / dsize, (se or 0.0) / dsize, b, a))
    if not steps:
        return None
    steps.sort(reverse=True)
    gain, se, b, a = steps[0]
    if len(steps) > 1 and gain - steps[1][0] <= Z * (se * se + steps[1][1] ** 2) ** 0.5:
        return None
    return b, a


def recommended(rows: list[dict], front: list[str]) -> str | None:
    if not front:
        return None
    by = {r["variant"]: r for r in rows}
    best = min((r for r in rows if r.get("kld_mean") is not None), key=lambda r: r["kld_mean"])
    passes = [r for r in rows if r.get("pass_at_1") is not None]
    best_pass = max(passes, key=lambda r: r["pass_at_1"]) if passes else None
    for n in front:                                   # smallest first
        r = by[n]
        se, _ = diff_se(r, best, "kld_mean", True)
        if r is not best and r["kld_mean"] - best["kld_mean"] + Z * (se or 0.0) > RECOMMEND_KLD_MARGIN:
            continue
        if best_pass is not None and r.get("pass_at_1") is not None and r is not best_pass:
            pse, _ = diff_se(best_pass, r, "pass_at_1", True)
            if best_pass["pass_at_1"] - r["pass_at_1"] - Z * (pse or 0.0) > RECOMMEND_PASS_MARGIN:
                continue
        return n
    return None


def _short(variant: str) -> str:
    return type_from_name(variant) or variant
