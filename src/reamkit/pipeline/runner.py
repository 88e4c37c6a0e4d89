"""Run a plan: skip what is done and valid, schedule the rest on an executor, record each finished stage.

``RUN/pipeline.json`` holds one record per finished stage (its key and outputs). A stage counts as done when its
record's key equals the stage's key and its outputs exist; outputs are written atomically by the stage
functions and the record only after them, so a run killed at any moment (SIGKILL included) resumes with
nothing half-written used: an unrecorded stage is run again, and its own manifests let it skip whatever it had
already published.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from ..defaults import MEMORY_SHARE
from ..errors import Interrupted, ReamkitError, Terminated
from ..fsutil import atomic_file, clean_stale_temps, write_json
from ..identity import changed_files
from .config import RunConfig, to_toml
from .executors import make_executor
from .plan import HEAVY, Plan, Stage, build_plan, run_folder_paths
from .stages import remove_output

STATE_VERSION = 1


@dataclass
class RunResult:
    run_dir: Path
    plan: Plan
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def plan_for(cfg: RunConfig) -> Plan:
    from ..models import open_model

    opened = open_model(cfg.model)
    config = opened.config
    n = opened.adapter.num_experts(config) if opened.adapter.moe_layers(config) else None
    return build_plan(cfg, config, n, opened.checkpoint.fingerprint())


def load_state(run_dir: Path) -> dict:
    p = run_folder_paths(run_dir)["state"]
    if not p.is_file():
        return {"version": STATE_VERSION, "stages": {}}
    try:
        state = json.loads(p.read_text())
    except ValueError:
        raise ReamkitError(f"{p} is not valid JSON; it was not written by reamkit",
                           fix="remove it to rerun every stage") from None
    if state.get("version") != STATE_VERSION:
        raise ReamkitError(f"{p} was written by another reamkit version", fix="use a new run folder")
    return state


def is_done(stage: Stage, record: dict | None, run_dir: Path) -> bool:
    """Its record's key is the stage's key, and every output is there holding the bytes recorded when it finished."""
    return (bool(record) and record.get("key") == stage.key and all((run_dir / o).exists() for o in stage.outputs)
            and not damaged_outputs(stage, record, run_dir))


def damaged_outputs(stage: Stage, record: dict, run_dir: Path) -> list[str]:
    """Outputs whose files changed (or went missing) since the stage recorded their content hashes."""
    hashes = record.get("hashes") or {}
    return [o for o in stage.outputs if o in hashes and changed_files(run_dir / o, hashes[o])]


def _memory_need(stage: Stage, run_dir: Path) -> int:
    """A rough peak for the scheduler: the GGUF a job maps (or will map) plus the tools' working memory."""
    path = stage.params.get("variant") or stage.params.get("reference")
    size = (run_dir / path).stat().st_size if path and (run_dir / path).exists() else 0
    return int(size * 1.3) + (512 << 20)


class _Log:
    def __init__(self, path: Path):
        self.path = path

    def __call__(self, line: str) -> None:
        stamp = _dt.datetime.now().isoformat(timespec="seconds")
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(f"{stamp} {line}\n")


def run_pipeline(cfg: RunConfig, run_dir: Path, *, view: Callable | None = None) -> RunResult:
    """Run (or resume) ``cfg`` in ``run_dir``. ``view`` receives events: (event, stage, info)."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ReamkitError(f"{run_dir} is a file, not a run folder", fix="choose another output folder")
    executor = make_executor(cfg.executor)     # a cluster that cannot be joined fails here, before the folder
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        paths = run_folder_paths(run_dir)
        lock = open(run_dir / ".lock", "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise ReamkitError(f"another reamkit run is working in {run_dir}",
                               fix="wait for it, or use another folder") from None
        try:
            return _run_locked(cfg, run_dir, paths, view or (lambda *a: None), executor)
        finally:
            lock.close()
    finally:
        executor.close()


def _run_locked(cfg: RunConfig, run_dir: Path, paths: dict, view: Callable, executor) -> RunResult:
    plan = plan_for(cfg)
    _sweep_stale_temps(run_dir)
    with atomic_file(paths["config"]) as tmp:          # what ``reamkit status`` reads back
        tmp.write_text(to_toml(cfg), encoding="utf-8")
    log = _Log(paths["log"])
    state = load_state(run_dir)
    records: dict = state["stages"]
    result = RunResult(run_dir, plan)
    done: set[str] = set()
    for s in plan.order():
        rec = records.get(s.id)
        if is_done(s, rec, run_dir):
            done.add(s.id)
            result.skipped.append(s.id)
        elif rec and rec.get("key") == s.key:
            for o in damaged_outputs(s, rec, run_dir):      # remade, not skipped by the stage's own manifest
                log(f"{o} changed after {s.id} wrote it: making it again")
                remove_output(run_dir / o)
    log(f"run: {len(plan.stages)} stages, {len(done)} already done; executor {cfg.executor.kind}")
    view("plan", None, {"plan": plan, "done": set(done)})
    budget = int((cfg.executor.memory_gb or psutil.virtual_memory().available / 1e9 * MEMORY_SHARE) * 1e9)
    pending = [s for s in plan.order() if s.id not in done]
    running: dict[object, Stage] = {}
    failed: list[tuple[str, str]] = []
    try:
        while pending or running:
            if not failed:
                _launch(pending, running, done, executor, run_dir, budget, cfg.executor.workers, log, view)
            if not running:
                if failed:
                    break
                raise ReamkitError("no stage can start: " + ", ".join(s.id for s in pending))   # a plan bug
            for handle, outcome, error in executor.wait(list(running)):
                stage = running.pop(handle)
                if error is not None:
                    failed.append((stage.id, error))
                    log(f"failed {stage.id}: {error}; rerun the same command to resume")
                    view("failed", stage, {"error": error})
                    continue
                records[stage.id] = {"key": stage.key, "kind": stage.kind, "outputs": stage.outputs,
                                     "seconds": outcome["seconds"], "hashes": outcome.get("hashes", {}),
                                     "finished": _dt.datetime.now().isoformat(timespec="seconds")}
                write_json(paths["state"], state)
                done.add(stage.id)
                result.ran.append(stage.id)
                result.seconds[stage.id] = outcome["seconds"]
                log(f"done {stage.id} in {outcome['seconds']:.1f} s")
                view("done", stage, outcome)
    except KeyboardInterrupt as e:
        executor.stop()                       # every worker and its tools, now
        how = "SIGTERM" if isinstance(e, Terminated) else "Ctrl-C"
        stopped = ", ".join(s.id for s in running.values()) or "nothing"
        log(f"interrupted ({how}): {len(done)} of {len(plan.stages)} stages done, stopped {stopped}")
        stop = Interrupted(f"interrupted ({how}): {len(done)} of {len(plan.stages)} stages done, stopped {stopped}",
                           fix="rerun the same command to resume")
        stop.exit_code = 143 if isinstance(e, Terminated) else 130
        _sweep_stale_temps(run_dir)           # what the stopped stages were writing
        raise stop from None
    if failed:
        sid, error = failed[0]
        logfile = paths["logs"] / (sid.replace(":", "__") + ".log")
        raise ReamkitError(f"stage {sid} failed: {error}",
                           fix=f"see {logfile}; rerun the same command to resume from there")
    log("run finished")
    return result


def _sweep_stale_temps(run_dir: Path) -> None:
    """Temporaries of a killed run (``.<name>.tmp-<pid>-*``): removed once their writer is gone."""
    targets = {p.with_name(p.name[1:].split(".tmp-")[0]) for p in run_dir.rglob(".*.tmp-*")}
    for target in targets:
        clean_stale_temps(target)


def _launch(pending: list[Stage], running: dict, done: set, executor, run_dir: Path, budget: int, workers: int,
            log: _Log, view: Callable) -> None:
    heavy_running = any(s.mode == HEAVY for s in running.values())
    used = sum(s.memory_bytes for s in running.values())
    for stage in list(pending):
        if heavy_running or len(running) >= workers:
            return
        if not all(d in done for d in stage.deps):
            continue
        if stage.mode == HEAVY and running:
            continue
        stage.memory_bytes = _memory_need(stage, run_dir)
        if running and used + stage.memory_bytes > budget:
            continue
        pending.remove(stage)
        handle = executor.submit(stage, str(run_dir))
        running[handle] = stage
        used += stage.memory_bytes
        heavy_running = stage.mode == HEAVY
        log(f"start {stage.id}")
        view("start", stage, {})


def stage_rows(run_dir: Path) -> list[tuple[str, str, float | None]]:
    """For ``reamkit status``: each stage of the run folder's plan with its state (done, to do, stale)."""
    from .config import load_config

    paths = run_folder_paths(run_dir)
    if not paths["config"].is_file():
        raise ReamkitError(f"{run_dir} is not a reamkit run folder (no run.toml)")
    plan = plan_for(load_config(paths["config"]))
    records = load_state(run_dir)["stages"]
    rows = []
    for s in plan.order():
        rec = records.get(s.id)
        state = "done" if is_done(s, rec, run_dir) else ("stale" if rec else "to do")
        rows.append((s.id, state, rec.get("seconds") if rec and state == "done" else None))
    return rows


def is_running(run_dir: Path) -> bool:
    """True when a run holds the folder's lock right now."""
    p = run_dir / ".lock"
    if not p.exists():
        return False
    with open(p) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False
