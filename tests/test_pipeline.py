"""The release pipeline: config validation, a full run on a tiny model, skipping, resuming after SIGKILL,
rerunning only what a changed parameter affects, and the Ray executor."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reamkit.errors import ReamkitError
from reamkit.pipeline import load_config, run_pipeline
from reamkit.zoo import write_zoo_model

from .signals_support import as_terminal_job

REAMKIT = [sys.executable, "-m", "reamkit.cli"]

CONFIG = """
model = "model"
name = "tiny"

[compress]
methods = ["ream", "reap"]
ratio = 0.25
samples = 8
seq_len = 64
batch_size = 4

[quantize]
types = ["Q8_0"]
imatrix_chunks = 2
imatrix_ctx = 64

[evaluate]
tokens = 128
ctx = 128
humaneval_limit = 2
humaneval_max_tokens = 8
speed = false

[executor]
workers = 2
"""


@pytest.fixture(scope="session")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pipeline")
    write_zoo_model("qwen3_next", root / "model")
    (root / "run.toml").write_text(CONFIG)
    return root


@pytest.fixture(scope="session")
def baseline(project) -> Path:
    """One uninterrupted run, the reference for every other test here."""
    run = project / "baseline"
    run_pipeline(load_config(project / "run.toml"), run)
    return run


def _config(project: Path, text: str, name: str) -> Path:
    p = project / f"{name}.toml"
    p.write_text(text)
    return p


def _rows(run: Path) -> list[dict]:
    rows = json.loads((run / "report" / "compare.json").read_text())["rows"]
    return sorted(({k: v for k, v in r.items() if k != "path"} for r in rows), key=lambda r: r["variant"])


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _outputs(run: Path) -> dict[str, str]:
    """Content hashes of what a run produces (models, GGUFs, evaluation numbers); not logs or manifests."""
    found = {}
    for p in sorted(run.rglob("*")):
        rel = str(p.relative_to(run))
        if p.is_file() and p.suffix in (".safetensors", ".gguf"):
            found[rel] = _sha(p)
    for p in sorted((run / "fidelity").glob("*.json")):
        found[f"fidelity/{p.name}"] = json.dumps(json.loads(p.read_text())["sets"], sort_keys=True)
    for p in sorted((run / "humaneval").glob("*.completions.jsonl")):
        found[f"humaneval/{p.name}"] = _sha(p)
        data = json.loads(p.with_name(p.name.replace(".completions.jsonl", ".json")).read_text())
        found[f"humaneval/{p.name}:results"] = json.dumps([data["pass_at_1"], data["results"]], sort_keys=True)
    return found


def test_a_run_produces_every_variant_evaluated_compared_and_carded(baseline):
    rows = _rows(baseline)
    assert {r["variant"] for r in rows} == {f"{m}.{t}" for m in ("tiny", "tiny-ream-12e", "tiny-reap-12e")
                                            for t in ("F16", "Q8_0")}
    assert {r["method"] for r in rows} == {"none", "ream", "reap"}
    ref = next(r for r in rows if r["variant"] == "tiny.F16")
    assert ref["kld_mean"] == pytest.approx(0, abs=1e-6) and ref["top1_pct"] == pytest.approx(100)
    assert all(r["kld_mean"] > 0 for r in rows if r["method"] != "none")      # compression costs something
    assert all(r["pass_at_1"] is not None for r in rows)
    assert (baseline / "report" / "README.md").is_file()
    log = (baseline / "pipeline.log").read_text()
    assert "done compress:ream" in log and "run finished" in log


def test_a_rerun_skips_everything(project, baseline):
    result = run_pipeline(load_config(project / "run.toml"), baseline)
    assert result.ran == []
    assert len(result.skipped) == len(result.plan.stages)


def test_a_changed_ladder_reruns_only_the_stages_that_depend_on_it(project, baseline, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(baseline, run)
    cfg = _config(project, CONFIG.replace('types = ["Q8_0"]', 'types = ["Q8_0", "Q6_K"]'), "ladder")
    result = run_pipeline(load_config(cfg), run)
    expected = {f"quantize:{m}:Q6_K" for m in ("tiny", "tiny-ream-12e", "tiny-reap-12e")} | \
               {f"evaluate:{m}.Q6_K" for m in ("tiny", "tiny-ream-12e", "tiny-reap-12e")} | {"compare", "card"}
    assert set(result.ran) == expected
    assert len(_rows(run)) == 9
    # and one compression parameter redoes that method's branch only, down to the report
    cfg = _config(project, CONFIG.replace("samples = 8", "samples = 6"), "samples")
    result = run_pipeline(load_config(cfg), run)
    ran = set(result.ran)
    assert {"compress:ream", "compress:reap", "prepare:tiny-ream-12e", "evaluate:tiny-reap-12e.Q8_0"} <= ran
    assert not any(s.endswith(":tiny") or ":tiny." in s or s == "reference" for s in ran)


def _done_count(run: Path) -> int:
    try:
        return len(json.loads((run / "pipeline.json").read_text())["stages"])
    except (OSError, ValueError):
        return 0


def test_a_run_killed_at_several_points_resumes_to_identical_outputs(project, baseline, tmp_path):
    run = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    kills = []
    for after in (1, 5, 11):           # during compression, quantization, evaluation
        proc = subprocess.Popen([*REAMKIT, "run", str(project / "run.toml"), "-o", str(run)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        while _done_count(run) < after and proc.poll() is None:
            time.sleep(0.2)
        assert proc.poll() is None, "the run finished before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        kills.append(_done_count(run))
    assert kills == sorted(kills) and kills[-1] < 17
    result = run_pipeline(load_config(project / "run.toml"), run)
    assert result.ran and result.skipped          # it resumed rather than starting over
    assert _outputs(run) == _outputs(baseline)
    assert _rows(run) == _rows(baseline)
    leftovers = [p for p in run.rglob("*") if ".tmp-" in p.name or p.name.endswith(".work")]
    assert not leftovers


def test_the_ray_executor_gives_the_same_table(project, baseline, tmp_path):
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        cfg = _config(project, CONFIG.replace("workers = 2", 'workers = 2\nkind = "ray"'), "ray")
        run_pipeline(load_config(cfg), tmp_path / "ray")
    finally:
        ray.shutdown()
    assert _rows(tmp_path / "ray") == _rows(baseline)


@pytest.mark.parametrize("change, key", [
    ('name = "tiny"', 'name = "tiny"\ncolour = "blue"'),
    ("ratio = 0.25", "ratio = 0.25\nexpert = 3"),
    ("ratio = 0.25", "experts = 16"),
    ("ratio = 0.25", "experts = 1"),
    ('types = ["Q8_0"]', 'types = ["Q8_0", "Q5_X"]'),
    ('model = "model"', 'model = "no-such-model"'),
    ('methods = ["ream", "reap"]', 'methods = ["ream", "magic"]'),
    ("tokens = 128", 'tokens = "many"'),
])
def test_bad_configs_are_refused_before_any_work_naming_the_key(project, tmp_path, change, key):
    bad = CONFIG.replace(change, key)
    assert bad != CONFIG
    cfg = _config(project, bad, "bad")
    run = tmp_path / "run"
    res = subprocess.run([*REAMKIT, "run", str(cfg), "-o", str(run)], capture_output=True, text=True)
    assert res.returncode == 2
    line = res.stderr.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line
    named = {"colour": "colour: unknown key", "expert = 3": "compress.expert: unknown key",
             "experts = 16": "compress.experts", "experts = 1": "compress.experts", "Q5_X": "quantize.types",
             "no-such-model": "model:", "magic": "compress.methods", "many": "evaluate.tokens"}
    assert next(v for k, v in named.items() if k in key) in line
    assert not run.exists()


def test_status_shows_where_a_run_stands(project, baseline, tmp_path):
    res = subprocess.run([*REAMKIT, "status", str(baseline)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "17 of 17 stages done" in res.stdout
    with pytest.raises(ReamkitError, match="not a reamkit run folder"):
        from reamkit.pipeline import stage_rows
        stage_rows(tmp_path)


def _states(run: Path) -> dict[str, str]:
    from reamkit.pipeline import stage_rows

    return {sid: state for sid, state, _ in stage_rows(run)}


def _flip(p: Path, offset: int) -> None:
    with open(p, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def test_a_copied_run_is_current_and_one_flipped_input_byte_makes_every_stage_stale(project, baseline, tmp_path):
    run = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(baseline), str(run)], check=True)        # new inodes and dates, same bytes
    assert set(_states(run).values()) == {"done"}
    shard = max((project / "model").glob("*.safetensors"), key=lambda p: p.stat().st_size)
    middle = shard.stat().st_size // 2
    _flip(shard, middle)
    try:
        states = _states(run)
    finally:
        _flip(shard, middle)
    assert set(states.values()) == {"stale"}, states     # every stage depends on the input model
    assert set(_states(run).values()) == {"done"}


def test_a_damaged_output_gguf_is_noticed_and_only_its_stage_remade(project, baseline, tmp_path):
    from gguf import GGUFReader

    run = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(baseline), str(run)], check=True)
    flipped = run / "gguf" / "tiny" / "tiny.Q8_0.gguf"
    t = max(GGUFReader(str(flipped)).tensors, key=lambda t: int(t.n_bytes))
    _flip(flipped, int(t.data_offset) + int(t.n_bytes) // 2)              # inside the tensor data
    cut = run / "gguf" / "tiny-reap-12e" / "tiny-reap-12e.Q8_0.gguf"
    os.truncate(cut, cut.stat().st_size - 1000)
    states = _states(run)
    assert {s for s, st in states.items() if st != "done"} == {"quantize:tiny:Q8_0", "quantize:tiny-reap-12e:Q8_0"}
    result = run_pipeline(load_config(project / "run.toml"), run)
    assert set(result.ran) == {"quantize:tiny:Q8_0", "quantize:tiny-reap-12e:Q8_0"}
    assert _outputs(run) == _outputs(baseline)
    assert "tiny.Q8_0.gguf changed after quantize:tiny:Q8_0 wrote it" in (run / "pipeline.log").read_text()


def test_executor_kind_workers_and_threads_do_not_change_the_keys_of_results(project):
    from reamkit.pipeline import plan_for
    from reamkit.pipeline.config import EvaluateConfig, ExecutorConfig

    cfg = load_config(project / "run.toml")
    keys = {s.id: s.key for s in plan_for(cfg).order()}
    for executor in (ExecutorConfig(kind="ray", workers=2), ExecutorConfig(workers=1), ExecutorConfig(workers=7)):
        other = {s.id: s.key for s in plan_for(cfg.model_copy(update={"executor": executor})).order()}
        assert other == keys, executor
    ev = cfg.evaluate.model_dump()
    timed = {t: {s.id: s.key for s in plan_for(cfg.model_copy(update={"evaluate": EvaluateConfig(
        **{**ev, "speed": True, "threads": t})})).order()} for t in (1, 2)}
    assert {k for k in timed[1] if timed[1][k] != timed[2][k]} == {s for s in timed[1] if s.startswith("speed:")} \
        | {"compare", "card"}          # speed figures depend on the thread count, and so does what shows them


def test_a_rerun_with_other_workers_skips_everything(project, baseline, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(baseline, run)
    cfg = _config(project, CONFIG.replace("workers = 2", "workers = 1"), "one-worker")
    assert run_pipeline(load_config(cfg), run).ran == []


def _gone(p) -> bool:
    import psutil

    try:
        return p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_stopping_the_local_executor_ends_its_pool_and_the_pools_manager_thread():
    """An interrupted run's stop kills the workers and waits for the pool's manager thread: alive at exit, it
    closes its wake-up pipe while CPython's exit hook writes to it ('Bad file descriptor' traceback)."""
    from reamkit.pipeline.executors import LocalExecutor

    ex = LocalExecutor(1)
    future = ex.pool.submit(time.sleep, 60)
    t0 = time.monotonic()
    while not ex.pool._processes and time.monotonic() - t0 < 30:
        time.sleep(0.05)
    workers = list(ex.pool._processes.values())
    manager = ex.pool._executor_manager_thread
    ex.stop()
    assert workers and not any(w.is_alive() for w in workers)
    assert not manager.is_alive() and future.done()
    ex.close()


def test_ctrl_c_and_sigterm_stop_every_child_at_once_in_one_line_and_the_run_resumes(project, baseline, tmp_path,
                                                                                       figure):
    import psutil

    run = tmp_path / "interrupted"
    for sig, code, how, after in ((signal.SIGINT, 130, "Ctrl-C", "start prepare:tiny"),
                                  (signal.SIGTERM, 143, "SIGTERM", "start quantize:")):
        proc = subprocess.Popen([*REAMKIT, "run", str(project / "run.toml"), "-o", str(run)], text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                                preexec_fn=as_terminal_job)
        log = run / "pipeline.log"
        while proc.poll() is None and after not in (log.read_text() if log.is_file() else ""):
            time.sleep(0.1)
        time.sleep(1.0)
        # the stage workers and their tools (multiprocessing's resource tracker ends with reamkit itself)
        children = [c for c in psutil.Process(proc.pid).children(recursive=True)
                    if "resource_tracker" not in " ".join(c.cmdline())]
        assert proc.poll() is None and children
        if sig == signal.SIGINT:
            os.killpg(proc.pid, sig)          # what a terminal's Ctrl-C does: the whole process group
        else:
            proc.send_signal(sig)             # what a service manager does: reamkit alone
        t0 = time.monotonic()
        while not all(_gone(c) for c in children) and time.monotonic() - t0 < 10:
            time.sleep(0.01)
        assert all(_gone(c) for c in children)
        figure(f"{how}: stage workers and tools gone {time.monotonic() - t0:.2f} s after the signal")
        _, stderr = proc.communicate(timeout=60)
        assert time.monotonic() - t0 < 15
        assert proc.returncode == code and "Traceback" not in stderr, stderr
        errors = [ln for ln in stderr.splitlines() if "error:" in ln]
        assert len(errors) == 1 and errors[0] == stderr.strip().splitlines()[-1], stderr
        assert f"interrupted ({how})" in errors[0] and "stages done" in errors[0] and "rerun" in errors[0]
        assert f"interrupted ({how})" in log.read_text()
        assert not [p for p in run.rglob("*") if ".tmp-" in p.name]
    result = run_pipeline(load_config(project / "run.toml"), run)
    assert result.ran and result.skipped
    assert _outputs(run) == _outputs(baseline)
