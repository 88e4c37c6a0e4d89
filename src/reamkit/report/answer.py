"""The card's answer, from this run's measurements and their errors: for each size class, which variant keeps
the most fidelity (lowest KLD), and -- at the same file size -- whether dropping experts (REAM/REAP) or
quantizing the uncompressed model harder kept more of it.

A *size class* gathers the compressed variants of one type (REAM, REAP) and the uncompressed variant nearest
to them in size, when it is within :data:`SIZE_CLASS`. Within a class, the lowest-KLD compressed variant is set
against the uncompressed one; the difference is paired on the same chunks, and "cannot tell" is said when it
is within :data:`~reamkit.evaluation.stats.Z` standard errors.
"""

from __future__ import annotations

from ..evaluation.stats import Z, sig
from .compare import Comparison, fmt
from .evidence import compare_figure, difference

SIZE_CLASS = 0.20        # "about the same size": within 20%


def size_classes(rows: list[dict]) -> list[list[dict]]:
    """Groups of files of about one size. With compressed variants: each of their types (REAM and REAP files of
    one type are nearly the same size) with the uncompressed variant nearest in size, when within
    :data:`SIZE_CLASS`; otherwise runs of sizes, each within :data:`SIZE_CLASS` of its smallest."""
    rs = sorted((r for r in rows if r.get("size_gb") and r.get("kld_mean") is not None), key=lambda r: r["size_gb"])
    plain = [r for r in rs if r["method"] == "none"]
    dropped: dict[str, list[dict]] = {}
    for r in rs:
        if r["method"] not in ("none", "unknown"):
            dropped.setdefault(r["type"], []).append(r)
    if dropped:
        classes = []
        for group in dropped.values():
            mid = sum(r["size_gb"] for r in group) / len(group)
            near = min(plain, key=lambda r: abs(r["size_gb"] - mid), default=None)
            if near is not None and abs(near["size_gb"] - mid) <= SIZE_CLASS * mid:
                group = [*group, near]
            classes.append(sorted(group, key=lambda r: r["size_gb"]))
        return sorted(classes, key=lambda g: g[0]["size_gb"])
    classes: list[list[dict]] = []
    for r in rs:
        if classes and r["size_gb"] <= classes[-1][0]["size_gb"] * (1 + SIZE_CLASS):
            classes[-1].append(r)
        else:
            classes.append([r])
    return classes


def label(r: dict) -> str:
    experts = f" ({r['experts']} experts)" if r.get("experts") else ""
    who = "uncompressed" if r["method"] == "none" else r["method"].upper()
    return f"{who} {r['type']}{experts}"


def _kld(r: dict) -> str:
    return f"{fmt('kld_mean', r['kld_mean'])} ± {sig(r.get('kld_mean_se'))}"


def class_answer(group: list[dict]) -> dict:
    best = min(group, key=lambda r: r["kld_mean"])
    tied = [r for r in group if r is not best and compare_figure(r, best, "kld_mean") == 0]
    dropped = [r for r in group if r["method"] not in ("none", "unknown")]
    plain = [r for r in group if r["method"] == "none"]
    out = {"sizes": (group[0]["size_gb"], group[-1]["size_gb"]), "best": best, "tied": tied, "verdict": None}
    if dropped and plain:
        a = min(dropped, key=lambda r: r["kld_mean"])
        b = min(plain, key=lambda r: r["kld_mean"])
        d = difference(a, b, "kld_mean")
        out.update(drop=a, quantize=b, diff=d,
                   verdict={"a better": "drop experts", "b better": "quantize harder"}.get(d["verdict"], "cannot tell"))
    return out


def answer_lines(comp: Comparison) -> list[str]:
    answers = [class_answer(g) for g in size_classes(comp.rows)]
    if not answers:
        return ["## The answer", "", "No fidelity was measured in this run (`reamkit evaluate`), so it cannot say "
                "which file keeps most of the model.", ""]
    judged = [a for a in answers if a["verdict"]]
    count = {v: sum(a["verdict"] == v for a in judged) for v in ("drop experts", "quantize harder", "cannot tell")}
    if judged:
        summary = (f"**At the same file size, drop experts or quantize harder?** Measured in {len(judged)} size "
                   f"class{'es' if len(judged) != 1 else ''} holding both: dropping experts kept more fidelity in "
                   f"{count['drop experts']}, quantizing harder in {count['quantize harder']}, and "
                   f"{count['cannot tell']} cannot tell (difference within {Z:g} standard errors).")
    else:
        summary = ("**At the same file size, drop experts or quantize harder?** Cannot tell from this run: no size "
                   "class holds both a compressed and an uncompressed variant.")
    out = ["## The answer", "", summary, "",
           f"Size classes: the compressed files of one type with the uncompressed file nearest in size (within "
           f"{SIZE_CLASS:.0%}). KLD = mean KL divergence from the reference "
           "± its standard error over the evaluation chunks; differences are paired on the same chunks.", "",
           "| Size/GB | Keeps most fidelity (KLD) | Drop experts | Quantize harder | Difference | Answer |",
           "|:-----|:-----|:-----|:-----|-----:|:-----|"]
    for a in answers:
        lo, hi = a["sizes"]
        size = fmt("size_gb", lo) if lo == hi else f"{fmt('size_gb', lo)}-{fmt('size_gb', hi)}"
        best = f"{label(a['best'])} ({_kld(a['best'])})"
        if a["tied"]:
            best += "; tied with " + ", ".join(label(r) for r in a["tied"])
        if a["verdict"]:
            d = a["diff"]
            cells = [f"{label(a['drop'])} ({_kld(a['drop'])})", f"{label(a['quantize'])} ({_kld(a['quantize'])})",
                     f"{d['diff']:+.3g} ± {sig(d['se'])}", a["verdict"]]
        else:
            cells = ["-", "-", "-", "only one kind in this class"]
        out.append(f"| {size} | {best} | " + " | ".join(cells) + " |")
    return out + [""]
