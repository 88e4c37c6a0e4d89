"""What a person watches while a run works: one bar per kind of stage (with ETA), the stages running now,
and a one-line summary per finished stage; and ``reamkit status`` for a run folder."""

from __future__ import annotations

import time

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from .plan import Plan, Stage

KIND_LABELS = {"compress": "compress", "prepare": "convert + imatrix", "quantize": "quantize", "reference":
               "reference logits", "evaluate": "evaluate", "speed": "speed", "compare": "compare", "card": "card"}


class LiveView:
    """Receives the runner's events; renders with rich (a live area on a terminal, plain lines elsewhere)."""

    def __init__(self, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.progress = Progress(TextColumn("{task.description:<18}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                 console=self.console)
        self.tasks: dict[str, int] = {}
        self.running: dict[str, float] = {}
        self.live: Live | None = None

    def __enter__(self) -> "LiveView":
        self.live = Live(self._render(), console=self.console, refresh_per_second=4, transient=False,
                         get_renderable=self._render)
        self.live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.live is not None:
            if exc[0] is not None:
                self.live.transient = True       # a failed run ends in its one error line, not the last frame
            self.live.__exit__(*exc)

    def _render(self):
        now = time.monotonic()
        lines = [f"  running: {sid} ({now - t0:.0f} s)" for sid, t0 in self.running.items()]
        return Group(self.progress, Text("\n".join(lines), style="dim"))

    def __call__(self, event: str, stage: Stage | None, info: dict) -> None:
        if event == "plan":
            plan: Plan = info["plan"]
            for kind, label in KIND_LABELS.items():
                stages = [s for s in plan.order() if s.kind == kind]
                if stages:
                    done = sum(s.id in info["done"] for s in stages)
                    self.tasks[kind] = self.progress.add_task(label, total=len(stages), completed=done)
            skipped = len(info["done"])
            if skipped:
                self.console.print(f"[dim]{skipped} of {len(plan.stages)} stages already done: skipped[/]")
        elif event == "start":
            self.running[stage.id] = time.monotonic()
        elif event == "done":
            self.running.pop(stage.id, None)
            self.progress.advance(self.tasks[stage.kind])
            self.console.print(f"[green]done[/] {stage.id} [dim]({info['seconds']:.1f} s)[/]")
        elif event == "failed":
            self.running.pop(stage.id, None)
            self.console.print(f"[red]failed[/] {stage.id}: {info['error']}")


def status_table(rows: list[tuple[str, str, float | None]], running: bool) -> Table:
    t = Table(title="run " + ("(working now)" if running else "(not running)"))
    for col in ("stage", "state", "seconds"):
        t.add_column(col, justify="right" if col == "seconds" else "left", no_wrap=True)
    style = {"done": "green", "stale": "yellow", "to do": "dim"}
    for sid, state, secs in rows:
        t.add_row(sid, f"[{style[state]}]{state}[/]", "" if secs is None else f"{secs:.1f}")
    return t
