"""What a compression did, for a person: ``report.json``, a readable ``report.md`` and ``saliency.png``.

The heatmap shows every expert's saliency per layer (rows: layers, columns: experts, each row scaled to its
maximum), with the experts that were dropped crossed out, the centroids of merged groups ringed and the experts
merged into them marked with a plus -- the picture to look at to judge whether a compression removed what
mattered.
"""

from __future__ import annotations

import json
from pathlib import Path


def write_report(folder: Path, report: dict) -> None:
    folder = Path(folder)
    (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (folder / "report.md").write_text(summary(report))
    heatmap(report, folder / "saliency.png")


def summary(report: dict) -> str:
    lines = [f"# Compression: {report['method']} {report['experts_before']} -> {report['experts_after']} experts "
             f"per layer (top-{report['top_k']} unchanged)", "",
             f"- calibration: {report['calibration']['mix']}, {report['calibration']['samples']} x "
             f"{report['calibration']['seq_len']} tokens, seed {report['calibration']['seed']}",
             f"- sequential: {report['sequential']}; options: {json.dumps(report['method_options'])}",
             f"- device: {report['device']}; {report['seconds']:.1f} s", "",
             "| layer | dropped | merged groups (centroid <- members) | routed-token coverage kept | s |",
             "|---|---|---|---|---|"]
    for lay in report["layers"]:
        if not lay.get("moe"):
            lines.append(f"| {lay['layer']} | (no MoE) | | | {lay.get('seconds', 0):.2f} |")
            continue
        freq = lay.get("frequency") or []
        total = sum(freq) or 1
        kept_cov = sum(freq[i] for i in lay["kept"]) / total if freq else float("nan")
        groups = "; ".join(f"{g['centroid']} <- {g['members'][1:]}" for g in lay.get("groups", [])) or "-"
        dropped = lay.get("dropped", [])
        shown = ", ".join(map(str, dropped[:12])) + (" ..." if len(dropped) > 12 else "")
        lines.append(f"| {lay['layer']} | {len(dropped)}: {shown} | {groups} | {kept_cov:.1%} | "
                     f"{lay.get('seconds', 0):.2f} |")
    lines += ["", "Coverage: the share of calibration routing decisions that went to an expert that survives "
              "(as a centroid) in the compressed layer.", ""]
    lines += plan_choice_lines(report)
    return "\n".join(lines)


def plan_choice_lines(report: dict) -> list[str]:
    """A table of the plan each layer got when plans were chosen by measured error (``auto``): every
    candidate's relative squared error of the MoE block output on held-out calibration tokens."""
    chosen = [lay for lay in report.get("layers", []) if lay.get("auto")]
    if not chosen:
        return []
    names = list(dict.fromkeys(k for lay in chosen for k in lay["auto"]["scores"]))
    lines = ["## Plan per layer, chosen by measured error", "",
             "Relative squared error of each layer's MoE block output on calibration tokens held out from "
             "planning (lower is better; **bold**: chosen).", "",
             "| layer | plan | " + " | ".join(names) + " | held-out tokens | s |",
             "|---|---|" + "---|" * len(names) + "---|---|"]
    for lay in chosen:
        a = lay["auto"]
        cells = [(f"**{a['scores'][n]:.4g}**" if n == a["choice"] else f"{a['scores'][n]:.4g}")
                 if n in a["scores"] else "-" for n in names]
        lines.append(f"| {lay['layer']} | {a['choice']} | " + " | ".join(cells) +
                     f" | {a['heldout_tokens']} | {a['seconds']:.1f} |")
    return lines + [""]


def heatmap(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers = [lay for lay in report["layers"] if lay.get("moe") and lay.get("saliency")]
    if not layers:
        return
    n = report["experts_before"]
    grid = np.zeros((len(layers), n))
    for r, lay in enumerate(layers):
        s = np.asarray(lay["saliency"], dtype=float)
        grid[r] = s / s.max() if s.max() > 0 else s
    fig, ax = plt.subplots(figsize=(min(24, 2 + n * 0.25), 1.5 + len(layers) * 0.35), dpi=100)
    im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    dropped = [(e, r) for r, lay in enumerate(layers) for e in lay.get("dropped", [])]
    centroids = [(g["centroid"], r) for r, lay in enumerate(layers) for g in lay.get("groups", [])]
    if dropped:                       # one artist per kind (one per marker took 5 s for 48 layers x 512 experts)
        ax.plot(*zip(*dropped), linestyle="none", marker="x", color="red", markersize=5 if n <= 64 else 2)
    if centroids:
        ax.plot(*zip(*centroids), linestyle="none", marker="o", mfc="none", color="white",
                markersize=7 if n <= 64 else 3)
    members = [(m, r) for r, lay in enumerate(layers) for g in lay.get("groups", []) for m in g["members"][1:]]
    if members:
        ax.plot(*zip(*members), linestyle="none", marker="+", color="white", markersize=6 if n <= 64 else 2)
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_yticks(range(len(layers)), [str(lay["layer"]) for lay in layers])
    ax.set_title(f"{report['method']}: saliency per layer (row-normalised)\nx = removed, + = merged into the ringed centroid")
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
