"""What each kind of stage does: a thin call into the stage packages (compression, quantization, evaluation,
report), with paths resolved against the run folder.

These functions run in worker processes (local or Ray), so they take plain data and return plain data. Each
underlying stage function keys its own outputs with a manifest: it skips an output that is already current and
refuses one made from other inputs, which :func:`run_stage` answers by removing the stale output and redoing it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from pathlib import Path

from ..errors import OutputExistsError
from ..identity import output_hashes
from ..manifest import manifest_path_for


def run_stage(kind: str, stage_id: str, params: dict, outputs: list[str], run_dir: str) -> dict:
    """Run one stage; its stdout and stderr go to ``RUN/logs/<stage>.log``. Returns ``{"seconds": ..., "hashes":
    ...}``: the content hashes of its outputs, which the runner records to notice later damage."""
    root = Path(run_dir)
    log = root / "logs" / (stage_id.replace(":", "__") + ".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with _redirected(log):
        fn = _KINDS[kind]
        try:
            fn(root, params)
        except OutputExistsError as e:       # an output from an earlier configuration: remove it, redo
            print(f"removing stale outputs: {e.problem}", flush=True)
            for rel in outputs:
                remove_output(root / rel)
            fn(root, params)
    seconds = round(time.perf_counter() - t0, 3)
    hashes = {rel: output_hashes(root / rel) for rel in outputs if (root / rel).exists()}
    return {"seconds": seconds, "hashes": hashes}


@contextlib.contextmanager
def _redirected(log: Path):
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log, "a", buffering=1) as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def remove_output(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p)
    elif p.exists():
        p.unlink()
    manifest_path_for(p, folder=False).unlink(missing_ok=True)


def _model_path(root: Path, path: str) -> str:
    return path if path.startswith("hf:") or Path(path).is_absolute() else str(root / path)


def _compress(root: Path, p: dict) -> None:
    from ..compression import CompressOptions, compress

    compress(_model_path(root, p["model"]), root / p["out"], CompressOptions(
        method=p["method"], experts=p["experts"], calib=p["calib"], samples=p["samples"],
        seq_len=p["seq_len"], batch_size=p["batch_size"], seed=p["seed"], device=p["device"], drop_mtp=p["drop_mtp"]))


def _prepare(root: Path, p: dict) -> None:
    from ..quantization import QuantizeOptions, prepare_reference

    out = root / p["out"]
    prepare_reference(_model_path(root, p["model"]), out, QuantizeOptions(
        reference_dtype=p["dtype"], imatrix=p["imatrix"], calibration=p["calib"], imatrix_chunks=p["imatrix_chunks"],
        imatrix_ctx=p["imatrix_ctx"], name=out.name, progress=False))


def _quantize(root: Path, p: dict) -> None:
    from ..quantization import QuantizeOptions, quantize_model

    out = root / p["out"]
    imatrix = out / f"{out.name}.imatrix.gguf"
    quantize_model(root / p["reference"], out, QuantizeOptions(
        types=[p["type"]], ladder=p["ladder"], imatrix=str(imatrix) if p["imatrix"] != "none" else "none",
        name=out.name, progress=False))


def _fidelity_options(p: dict):
    from ..evaluation.fidelity import FidelityOptions

    return FidelityOptions(sets=tuple(p["sets"]), tokens=p["tokens"], ctx=p["ctx"], threads=p["threads"])


def _reference(root: Path, p: dict) -> None:
    from ..evaluation.fidelity import evaluate_fidelity

    ref = root / p["reference"]
    evaluate_fidelity([ref], ref, root, _fidelity_options(p))


def _evaluate(root: Path, p: dict) -> None:
    from ..evaluation.fidelity import evaluate_fidelity

    variant = root / p["variant"]
    evaluate_fidelity([variant], root / p["reference"], root, _fidelity_options(p))
    if p["humaneval_limit"]:
        from ..evaluation.humaneval import HumanEvalOptions, run_humaneval

        run_humaneval(variant, root, HumanEvalOptions(limit=p["humaneval_limit"], max_tokens=p["humaneval_max_tokens"],
                                                      threads=p["threads"]))


def _speed(root: Path, p: dict) -> None:
    from ..evaluation.speed import SpeedOptions, measure_speed

    measure_speed(root / p["variant"], root, SpeedOptions(prompt=p["prompt"], gen=p["gen"],
                                                          repetitions=p["repetitions"], threads=p["threads"]))


def _compare(root: Path, p: dict) -> None:
    from ..fsutil import write_json
    from ..report import compare, write_variants

    write_variants(root, p["variants"])          # paths relative to the run folder, which may move
    write_json(root / "run.json", p["run"])
    compare(root)


def _card(root: Path, p: dict) -> None:
    from ..report import write_card, write_release

    write_card(root)
    write_release(root)


_KINDS = {"compress": _compress, "prepare": _prepare, "quantize": _quantize, "reference": _reference,
          "evaluate": _evaluate, "speed": _speed, "compare": _compare, "card": _card}
