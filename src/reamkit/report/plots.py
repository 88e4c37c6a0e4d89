"""The comparison's two pictures: size vs KLD with the Pareto front drawn, and size vs HumanEval pass@1, each
point with its error bar (KLD: 2 standard errors; pass@1: the 95% Wilson interval).

Points are coloured by compression method and labelled with their type. KLD spans orders of magnitude
(Q8_0 ~1e-3, Q2_K ~0.3), so its axis is logarithmic; a variant whose KLD is at or below :data:`KLD_FLOOR` (the
reference scored against itself) is drawn on the floor and labelled "KLD ~ 0".
"""

from __future__ import annotations

from pathlib import Path

from ..fsutil import atomic_file
from .runinfo import type_from_name

KLD_FLOOR = 1e-5
_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colours(rows: list[dict]) -> dict[str, str]:
    methods = sorted({r["method"] for r in rows})
    return {m: _COLOURS[i % len(_COLOURS)] for i, m in enumerate(methods)}


def _label(r: dict) -> str:
    t = r["type"] if r["type"] != "unknown" else (type_from_name(r["variant"]) or r["variant"])
    return f"{t} ({r['experts']}e)" if r.get("experts") else t


def _save(fig, path: Path) -> Path:
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    _plt().close(fig)
    return path


def _annotate(ax, rows, xs, ys):
    """Labels beside their points, alternating above/below so neighbours on a ladder do not overlap."""
    for i, (r, x, y) in enumerate(sorted(zip(rows, xs, ys), key=lambda t: t[1])):
        dy = 9 if i % 2 == 0 else -15
        ax.annotate(_label(r), (x, y), textcoords="offset points", xytext=(6, dy), fontsize=8)


def plot_size_vs_kld(comp, path: Path) -> Path:
    from .notes import pareto_front

    plt = _plt()
    rows = [r for r in comp.rows if r.get("size_gb") and r.get("kld_mean") is not None]
    fig, ax = plt.subplots(figsize=(8, 5.2))
    if not rows:
        ax.text(0.5, 0.5, "no KLD measured in this run (reamkit evaluate)", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_axis_off()
        return _save(fig, path)
    colours = _colours(rows)
    ys = [max(r["kld_mean"], KLD_FLOOR) for r in rows]
    xs = [r["size_gb"] for r in rows]
    for m, c in colours.items():
        pts = [(x, y, r.get("kld_mean_se") or 0.0) for r, x, y in zip(rows, xs, ys) if r["method"] == m]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=c, s=42, label=f"method: {m}", zorder=3)
        below = [min(2 * se, y - KLD_FLOOR / 2) for _, y, se in pts]     # a log axis: the bar stays above 0
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[below, [2 * se for _, _, se in pts]],
                    fmt="none", ecolor=c, elinewidth=1, capsize=2, zorder=2)
    front = pareto_front(rows)
    fx = [xs[i] for n in front for i, r in enumerate(rows) if r["variant"] == n]
    fy = [ys[i] for n in front for i, r in enumerate(rows) if r["variant"] == n]
    if len(front) >= 2:
        ax.step(fx, fy, where="post", color="0.35", linestyle="--", linewidth=1.2, label="Pareto front", zorder=2)
    ax.scatter(fx, fy, s=140, facecolors="none", edgecolors="0.35", zorder=4)
    _annotate(ax, rows, xs, ys)
    for r, x, y in zip(rows, xs, ys):
        if r["kld_mean"] <= KLD_FLOOR:
            ax.annotate("KLD ~ 0", (x, y), textcoords="offset points", xytext=(6, 20), fontsize=7, color="0.4")
    ax.set_yscale("log")
    ax.set_xlabel("file size (GB)")
    ax.set_ylabel(f"KLD vs reference (mean of {', '.join(comp.sets)}; log)")
    ax.set_title("Size vs fidelity (lower left is better; bars: 2 standard errors; circled: Pareto-optimal)")
    ax.grid(True, which="both", alpha=0.25)
    ax.margins(x=0.12, y=0.15)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return _save(fig, path)


def plot_pass_vs_size(comp, path: Path) -> Path:
    plt = _plt()
    rows = [r for r in comp.rows if r.get("size_gb") and r.get("pass_at_1") is not None]
    fig, ax = plt.subplots(figsize=(8, 5.2))
    if not rows:
        ax.text(0.5, 0.5, "no HumanEval pass@1 in this run", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return _save(fig, path)
    colours = _colours(rows)
    xs = [r["size_gb"] for r in rows]
    ys = [r["pass_at_1"] for r in rows]
    for m, c in colours.items():
        pts = [(x, y, r.get("pass_at_1_ci95") or [y, y]) for r, x, y in zip(rows, xs, ys) if r["method"] == m]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=c, s=42, label=f"method: {m}", zorder=3)
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts],
                    yerr=[[max(0.0, y - ci[0]) for _, y, ci in pts], [max(0.0, ci[1] - y) for _, y, ci in pts]],
                    fmt="none", ecolor=c, elinewidth=1, capsize=2, zorder=2)
    _annotate(ax, rows, xs, ys)
    ax.set_xlabel("file size (GB)")
    ax.set_ylabel("HumanEval pass@1 (bars: 95% interval)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Size vs HumanEval pass@1 (upper left is better)")
    ax.grid(True, alpha=0.25)
    ax.margins(x=0.12)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return _save(fig, path)
