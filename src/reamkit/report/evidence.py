"""The uncertainty of a comparison row, and whether two rows differ at all.

Every variant of a run is scored on the same chunks of the same held-out text (and the same HumanEval tasks),
so a difference between two variants is computed *paired*: chunk by chunk (task by task), which cancels the
text's own difficulty. Where the per-chunk values are missing (older results, too few chunks) the unpaired
error ``sqrt(se_a^2 + se_b^2)`` is used. Two figures *differ* when their difference exceeds
:data:`~reamkit.evaluation.stats.Z` standard errors; otherwise they are a tie, and no note ranks them.
"""

from __future__ import annotations

import math
import statistics

from ..evaluation.stats import Z, binomial_se, combine, differs, paired_se, wilson

SIZE_TIE = 0.01          # files within 1% of each other's size are "the same size"
LOWER_IS_BETTER = {"kld_mean": True, "kld_p99": True, "top1_pct": False, "pass_at_1": False, "tg_tps": False,
                   "pp_tps": False, "size_gb": True}
METHOD_ORDER = ("ream", "reap", "none")


def _set_mean_se(sets: dict, key: str) -> float | None:
    ses = [s.get(key) for s in sets.values()]
    if not ses or any(v is None for v in ses):
        return None
    return math.sqrt(sum(v * v for v in ses)) / len(ses)       # the mean over sets of independent set means


def error_fields(fid: dict, he: dict, sp: dict) -> dict:
    """The standard-error columns of one row (``None`` where a figure or its error is unknown)."""
    sets = fid.get("sets", {})
    out = {"kld_mean_se": _set_mean_se(sets, "kld_mean_se") if sets else None,
           "kld_p99_se": _set_mean_se(sets, "kld_p99_se") if sets else None,
           "top1_pct_se": _set_mean_se(sets, "same_top1_pct_se") if sets else None}
    if sets and out["kld_mean_se"] is None:                     # results without chunk errors: the tool's own
        out["kld_mean_se"] = _set_mean_se(sets, "kld_mean_err")
        out["top1_pct_se"] = _set_mean_se(sets, "same_top1_pct_err")
    for name, s in sets.items():
        out[f"kld_{name}_se"] = s.get("kld_mean_se", s.get("kld_mean_err"))
    p, n = he.get("pass_at_1"), he.get("n_tasks")
    k = round(p * n) if p is not None and n else None
    out.update({"pass_at_1_passed": k, "pass_at_1_se": binomial_se(k, n) if k is not None else None,
                "pass_at_1_ci95": list(wilson(k, n)) if k is not None else None})
    out.update({"pp_tps_se": sp.get("pp_tps_se", sp.get("pp_tps_sd")) if sp.get("pp_tps") is not None else None,
                "tg_tps_se": sp.get("tg_tps_se", sp.get("tg_tps_sd")) if sp.get("tg_tps") is not None else None,
                "tg_spread": sp.get("tg_spread"), "pp_spread": sp.get("pp_spread"),
                "speed_busy": bool(sp.get("busy")) if sp else None})
    return out


def private_fields(fid: dict, he: dict) -> dict:
    """Per-chunk and per-task values for paired differences (kept out of the written files)."""
    chunks = {name: s["chunks"] for name, s in fid.get("sets", {}).items() if isinstance(s.get("chunks"), dict)}
    tasks = {r["task_id"]: bool(r["passed"]) for r in he.get("results", []) if isinstance(r, dict) and "task_id" in r}
    return {"_chunks": chunks, "_tasks": tasks}


def diff_se(a: dict, b: dict, key: str, shown: bool = False) -> tuple[float | None, bool]:
    """(standard error of a[key] - b[key], paired?). With ``shown``, never less than the unpaired error of the two
    figures' own error bars, so that a claim drawn from it never contradicts the bars a reader sees."""
    se, paired = _diff_se(a, b, key)
    if shown and paired:
        plain = combine(a.get(f"{key}_se"), b.get(f"{key}_se"))
        if plain is not None and (se is None or plain > se):
            return plain, False
    return se, paired


def _diff_se(a: dict, b: dict, key: str) -> tuple[float | None, bool]:
    if key in ("kld_mean", "top1_pct"):
        ck = "kld" if key == "kld_mean" else "top1_pct"
        ca, cb = a.get("_chunks") or {}, b.get("_chunks") or {}
        sets = sorted(ca)
        if sets and sets == sorted(cb):
            ses = [paired_se(ca[s].get(ck, []), cb[s].get(ck, [])) for s in sets]
            if all(v is not None for v in ses):
                return math.sqrt(sum(v * v for v in ses)) / len(ses), True
    if key == "pass_at_1":
        ta, tb = a.get("_tasks") or {}, b.get("_tasks") or {}
        if ta and set(ta) == set(tb) and len(ta) >= 2:
            d = [int(ta[t]) - int(tb[t]) for t in ta]
            sd = statistics.stdev(d)
            if sd == 0 and a.get("pass_at_1") == b.get("pass_at_1"):
                return combine(a.get("pass_at_1_se"), b.get("pass_at_1_se")), False
            return sd / math.sqrt(len(d)), True
    if key == "size_gb":
        return 0.0, False
    return combine(a.get(f"{key}_se"), b.get(f"{key}_se")), False


def compare_figure(a: dict, b: dict, key: str, shown: bool = False) -> int:
    """-1 when a is credibly better than b on ``key``, +1 when credibly worse, 0 for a tie (or unknown);
    ``shown``: judged against the figures' own error bars too (see :func:`diff_se`)."""
    va, vb = a.get(key), b.get(key)
    if va is None or vb is None:
        return 0
    if key == "size_gb":
        if abs(va - vb) <= SIZE_TIE * max(va, vb):
            return 0
    else:
        se, _ = diff_se(a, b, key, shown)
        if not differs(va, vb, se):
            return 0
    better = va < vb if LOWER_IS_BETTER[key] else va > vb
    return -1 if better else 1


def difference(a: dict, b: dict, key: str) -> dict | None:
    """``a - b`` on ``key`` with its standard error and the verdict (``a better`` / ``b better`` / ``tie``)."""
    if a.get(key) is None or b.get(key) is None:
        return None
    se, paired = diff_se(a, b, key)
    c = compare_figure(a, b, key)
    return {"diff": a[key] - b[key], "se": se, "paired": paired, "z": Z,
            "verdict": "tie" if c == 0 else "a better" if c < 0 else "b better"}


def same_type_differences(rows: list[dict]) -> list[dict]:
    """For every type (Q4_K_M, ...): each pair of variants made by different methods (REAM - REAP, REAM -
    uncompressed, REAP - uncompressed), paired on the same chunks and tasks."""
    by_type: dict[str, list[dict]] = {}
    for r in rows:
        by_type.setdefault(r["type"], []).append(r)
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    out = []
    for t, group in by_type.items():
        group = sorted(group, key=lambda r: (order.get(r["method"], len(order)), r["variant"]))
        for i, a in enumerate(group):
            for b in group[i + 1:]:
                if a["method"] == b["method"]:
                    continue
                entry = {"type": t, "a": a["variant"], "b": b["variant"], "a_method": a["method"],
                         "b_method": b["method"], "label": f"{a['method']} - {b['method']}"}
                for key in ("kld_mean", "top1_pct", "pass_at_1"):
                    entry[key] = difference(a, b, key)
                out.append(entry)
    return out


def indistinct(rows: list[dict], key: str) -> bool:
    """True when a column cannot tell any two of its variants apart (all ties)."""
    have = [r for r in rows if r.get(key) is not None]
    return len(have) >= 2 and all(compare_figure(a, b, key, shown=True) == 0
                                  for i, a in enumerate(have) for b in have[i + 1:])
