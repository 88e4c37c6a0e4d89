"""The run as a graph of stages, and where each stage's outputs live in the run folder.

    RUN/
      run.toml            the validated configuration
      pipeline.json       one record per finished stage (key, outputs, seconds)
      pipeline.log        what ran, was skipped or failed, and when; logs/<stage>.log hold each stage's output
      models/<name>-<method>-<N>e/       compressed checkpoints               (compress:<method>)
      gguf/<model>/<model>.<DTYPE>.gguf  reference GGUF + importance matrix   (prepare:<model>)
      gguf/<model>/<model>.<TYPE>.gguf   one per ladder type                  (quantize:<model>:<TYPE>)
      reference/, fidelity/, humaneval/                                       (reference, evaluate:<variant>)
      speed/                                                                  (speed:<variant>, each run alone)
      variants.json, report/             table, plots, card                   (compare, card)
      release/<model>-GGUF/              card, GGUFs (hard links), imatrix, plots: uploadable as it is  (card)

Everything the run records names its files relative to the run folder, so the folder can be moved.

A stage's key hashes its kind, its own parameters and the keys of the stages it depends on, so changing one
parameter changes exactly the keys downstream of it: those stages rerun, every other one is skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .config import RunConfig

# How a stage may be scheduled: "heavy" stages (compression: a whole model's pass, all cores) run alone;
# "job" stages (one GGUF each) run in parallel within the executor's worker and memory limits.
HEAVY, JOB = "heavy", "job"


@dataclass
class Stage:
    id: str                       # e.g. "quantize:demo-coder-ream-12e:Q4_K_M"
    kind: str                     # compress | prepare | quantize | reference | evaluate | speed | compare | card
    params: dict
    deps: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)    # paths relative to the run folder
    mode: str = JOB
    memory_bytes: int = 0         # rough peak, for the scheduler's memory budget
    key: str = ""
    unkeyed: tuple[str, ...] = ()  # params that change how a stage runs, not what it makes (thread counts)


@dataclass
class Plan:
    config: RunConfig
    stages: dict[str, Stage]
    models: dict[str, dict]       # model name -> {"path", "method", "experts"}
    variants: dict[str, dict]     # variant name -> {"path", "model", "method", "experts", "type"}
    reference: str                # the reference variant (uncompressed model's F16/BF16 GGUF)

    def order(self) -> list[Stage]:
        return list(self.stages.values())      # built in dependency order


def _reference_dtype(cfg: RunConfig, model_config: dict) -> str:
    want = cfg.quantize.reference_dtype
    if want == "auto":
        want = "bf16" if "bfloat16" in str(model_config.get("torch_dtype") or model_config.get("dtype")) else "f16"
    return want.upper()


def build_plan(cfg: RunConfig, model_config: dict, num_experts: int | None, fingerprint: str) -> Plan:
    """Every stage of the run, with keys, in an order where dependencies come first."""
    from ..compression.driver import resolve_target
    from ..quantization import LADDER, LADDERS

    name = cfg.model_name
    stages: dict[str, Stage] = {}
    dtype = _reference_dtype(cfg, model_config)
    types = cfg.quantize.types or list(LADDER)
    suffix = LADDERS[cfg.quantize.ladder]
    models: dict[str, dict] = {name: {"path": cfg.model, "method": "none", "experts": num_experts}}
    c = cfg.compress
    params_common = {"calib": c.calib, "samples": c.samples, "seq_len": c.seq_len, "batch_size": c.batch_size,
                     "seed": c.seed, "drop_mtp": c.drop_mtp}
    if c.methods and num_experts:
        from ..models import open_model

        routing_k = open_model(cfg.model, check=False).adapter.routing(model_config).top_k
        keep = resolve_target(num_experts, routing_k, c.experts, c.ratio)
        for method in c.methods:
            m = f"{name}-{method}-{keep}e"
            models[m] = {"path": f"models/{m}", "method": method, "experts": keep}
            _add(stages, Stage(f"compress:{method}", "compress", {
                "model": cfg.model, "model_fingerprint": fingerprint, "out": f"models/{m}",
                "method": method, "experts": keep, "device": c.device, **params_common},
                outputs=[f"models/{m}"], mode=HEAVY))

    variants: dict[str, dict] = {}
    q = cfg.quantize
    for m, info in models.items():
        deps = [f"compress:{info['method']}"] if info["method"] != "none" else []
        ref_file = f"gguf/{m}/{m}.{dtype}.gguf"
        _add(stages, Stage(f"prepare:{m}", "prepare", {
            "model": info["path"], "model_fingerprint": fingerprint if info["method"] == "none" else None,
            "dtype": dtype.lower(), "imatrix": q.imatrix, "imatrix_chunks": q.imatrix_chunks,
            "imatrix_ctx": q.imatrix_ctx, "calib": c.calib, "out": f"gguf/{m}"},
            deps=deps, outputs=[ref_file] + ([f"gguf/{m}/{m}.imatrix.gguf"] if q.imatrix != "none" else []),
            mode=HEAVY))
        variants[f"{m}.{dtype}"] = {"path": ref_file, "model": m, "method": info["method"],
                                    "experts": info["experts"], "type": dtype}
        for t in types:
            out = f"gguf/{m}/{m}.{t}{suffix}.gguf"
            _add(stages, Stage(f"quantize:{m}:{t}", "quantize", {
                "reference": ref_file, "type": t, "ladder": q.ladder, "imatrix": q.imatrix, "out": f"gguf/{m}"},
                deps=[f"prepare:{m}"], outputs=[out]))
            variants[f"{m}.{t}{suffix}"] = {"path": out, "model": m, "method": info["method"],
                                            "experts": info["experts"], "type": t + suffix}

    reference = f"{name}.{dtype}"
    e = cfg.evaluate
    # parallel jobs share the cores; more threads than cores makes llama.cpp's spinning workers fight each other
    threads = e.threads or max(1, (os.cpu_count() or 1) // cfg.executor.workers)
    ev = {"tokens": e.tokens, "ctx": e.ctx, "sets": list(e.sets), "threads": threads}
    _add(stages, Stage("reference", "reference", {"reference": variants[reference]["path"], **ev},
                       deps=[f"prepare:{name}"], outputs=["reference"], unkeyed=("threads",)))
    for v, info in variants.items():
        producer = f"prepare:{info['model']}" if info["type"] == dtype else \
            f"quantize:{info['model']}:{info['type'].removesuffix(suffix)}"
        _add(stages, Stage(f"evaluate:{v}", "evaluate", {
            "variant": info["path"], "reference": variants[reference]["path"], **ev,
            "humaneval_limit": e.humaneval_limit, "humaneval_max_tokens": e.humaneval_max_tokens},
            deps=[producer, "reference"],
            outputs=[f"fidelity/{v}.json"] + ([f"humaneval/{v}.json"] if e.humaneval_limit else []),
            unkeyed=("threads",)))
        if e.speed:    # alone on the machine, every core: a speed measured beside other jobs says little
            _add(stages, Stage(f"speed:{v}", "speed", {
                "variant": info["path"], "prompt": e.speed_prompt, "gen": e.speed_gen,
                "repetitions": e.speed_repetitions, "threads": e.threads}, deps=[producer],
                outputs=[f"speed/{v}.json"], mode=HEAVY))
    evals = [s for s in stages if s.startswith(("evaluate:", "speed:"))]
    base = cfg.model.removeprefix("hf:") if cfg.model.startswith("hf:") else Path(cfg.model).name
    run = {"model_name": name, "base_model": base, "description": cfg.description, "calibration": c.calib}
    _add(stages, Stage("compare", "compare", {"variants": variants, "reference": reference, "run": run},
                       deps=evals, outputs=["variants.json", "run.json", "report/compare.json"]))
    # the card states the configuration that shapes the results; where the stages ran does not change them
    _add(stages, Stage("card", "card", {"model": name, "config": cfg.model_dump(mode="json", exclude={"executor"})},
                       deps=["compare"], outputs=["report/README.md", *(f"release/{m}-GGUF/README.md" for m in models)]))
    return Plan(cfg, stages, models, variants, reference)


def _add(stages: dict[str, Stage], stage: Stage) -> None:
    params = {k: v for k, v in stage.params.items() if k not in stage.unkeyed}
    blob = json.dumps({"kind": stage.kind, "params": params, "deps": [stages[d].key for d in stage.deps]},
                      sort_keys=True, default=str)
    stage.key = hashlib.sha256(blob.encode()).hexdigest()[:16]
    stages[stage.id] = stage


def run_folder_paths(run_dir: Path) -> dict[str, Path]:
    return {"state": run_dir / "pipeline.json", "log": run_dir / "pipeline.log", "logs": run_dir / "logs",
            "config": run_dir / "run.toml"}
