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
