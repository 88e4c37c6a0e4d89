"""The end of a run in the terminal: what ran, a short comparison table, the card, and how to serve the
recommended variant."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..report.compare import with_error
from ..report.pick import label, run_variants
from .runner import RunResult


def _rows(run_dir) -> list[dict]:
    p = run_dir / "report" / "compare.json"
    data = json.loads(p.read_text())
    return data["rows"] if isinstance(data, dict) else data


def _fmt(v, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def print_summary(result: RunResult, out: Console) -> None:
    run_dir = result.run_dir
    total = sum(result.seconds.values())
    out.print(f"{len(result.ran)} stages ran ({total:.0f} s of stage time), {len(result.skipped)} were already done",
              highlight=False)
    rows = _rows(run_dir)
    t = Table(title="variants (full table: report/compare.md)")
    for col in ("method", "type", "size GB", "mean KLD", "top-1 %", "pass@1", "tg t/s", "notes"):
        t.add_column(col, justify="left" if col in ("method", "type", "notes") else "right")
    shown = [r for r in rows if r.get("notes")] or rows[:8]
    for r in shown:
        t.add_row(f"{r.get('method')} ({r.get('experts')}e)" if r.get("experts") else str(r.get("method")),
                  str(r.get("type")), _fmt(r.get("size_gb"), ".3f"),
                  *(with_error(k, r) for k in ("kld_mean", "top1_pct", "pass_at_1", "tg_tps")),
                  ", ".join(r["notes"]) if isinstance(r.get("notes"), list) else str(r.get("notes") or ""))
    out.print(t)
    out.print(f"card: {run_dir / 'report' / 'README.md'}", highlight=False, soft_wrap=True)
    for folder in sorted((run_dir / "release").glob("*-GGUF")):
        out.print(f"to publish: hf upload ORG/{folder.name} {shlex.quote(str(folder))}", highlight=False,
                  soft_wrap=True)
    best = next((r for r in rows if "recommended" in str(r.get("notes"))), None)
    if best is not None:
        found = run_variants(run_dir)
        choice = next((label(v, found) for v in found if v.name == best["variant"]), best["variant"])
        out.print(f"try it: {reamkit_command()} serve {shlex.quote(str(run_dir))} --variant {choice}",
                  highlight=False, soft_wrap=True)


def reamkit_command() -> str:
    """How to call reamkit again from the shell this one runs in: ``reamkit`` when that is on PATH, else the
    path of the script (``.venv/bin/reamkit``) or of the interpreter (``python -m reamkit.cli``)."""
    argv0 = Path(sys.argv[0])
    if argv0.name == "reamkit" and argv0.is_file():
        on_path = shutil.which("reamkit")
        if on_path and Path(on_path).resolve() == argv0.resolve():
            return "reamkit"
        return _shell_path(argv0)
    return f"{_shell_path(Path(sys.executable))} -m reamkit.cli"


def _shell_path(p: Path) -> str:
    rel = os.path.relpath(p.absolute())
    text = rel if not rel.startswith("..") else str(p.absolute())
    return shlex.quote(text if "/" in text else f"./{text}")
