#!/usr/bin/env python3
"""reamkit's REAM against the released REAM code (SamsungSAILMontreal/ream), same model, same tokens, same run.

Both compress the built-in demo model (``qwen3_next``, 4 MoE layers of 16 experts, top-2) to 12 experts per
layer with REAM's defaults (saliency reap, group size 16, merging logits+weights, sequential), computing in
float32 on the CPU with the same number of threads, on the *same calibration token ids*: reamkit's
``code=0.7,math=0.3`` mix, 128 x 512 tokens, seed 0, built once before the rounds (and cached, so neither
program tokenises in the timed runs). The released code reads pre-tokenised ``.pt`` batches from
``data/<set>_b<size>_seq<len>_<tokenizer>_seed42.pt`` relative to its working folder; the bench writes those
ids there as one set (attention mask all ones: the rows are packed, no padding) and calls its ``Merger`` the way
its ``merge.py`` does, without ``merge.py`` itself (that imports vllm and lm_eval for version printing, and
infers the tokenizer from the model's name). ``datasets`` is stubbed when missing: the released code imports
it only to build its own data files, which are not used here.

The released code pins transformers 4.57.6 (its ``get_moe_input`` passes ``create_causal_mask`` a keyword that
later versions renamed), so give it an interpreter with that version (``--python``), e.g. a venv made with
``python -m venv V && V/bin/pip install transformers==4.57.6 "huggingface_hub<1.0" "tokenizers<0.23"`` plus a
``.pth`` file naming reamkit's site-packages (for torch, scipy, psutil, tqdm: the same builds for both programs).
Under transformers 4.57 the demo model loads with one module per expert, the layout that code was written for;
the child checks that every expert weight it loaded equals the checkpoint's.

Each program runs in a child process of its own, alternating (released, reamkit, released, reamkit, ...);
a child's figure is its wall time from its start to its exit -- interpreter start and imports, model load,
calibration forwards, merging, writing the compressed checkpoint -- and its peak RSS (``wait4``). Each child
also reports the time after its imports ("work": load, calibrate, merge, save). The ratio is reamkit /
released per round, with its median and range over the rounds.

    python bench/compress_released.py --released PATH/TO/ream [--python PY] [--rounds 3]
        [--samples 128] [--seq-len 512] [--experts 12] [--threads 2] [--only reamkit|released]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SEED_TAG = 42                        # the released code's data file names carry its seed
SET = "reamkit"                      # the data set name the released code is given


def calibration(model: Path, mix: str, samples: int, seq_len: int):
    from reamkit.calibration.mixture import build_calibration

    return build_calibration(model, mix, samples=samples, seq_len=seq_len, seed=0)


def write_released_data(folder: Path, ids) -> None:
    import torch

    (folder / "data").mkdir(parents=True, exist_ok=True)
    n, s = ids.shape
    torch.save({"input_ids": ids.clone(), "attention_mask": torch.ones_like(ids)},
               folder / "data" / f"{SET}_b{n}_seq{s}_qwen3_seed{SEED_TAG}.pt")


# ---------------------------------------------------------------------------------------------- children
def released_child(released: str, model: str, out: str, experts: int, samples: int, seq_len: int,
                   threads: int) -> None:
    """Run the released Merger as its merge.py does (cwd: the folder holding data/)."""
    import types

    t_start = time.time()
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    try:
        import datasets  # noqa: F401
    except ImportError:                              # only data/calibration_data.py's builder needs it
        stub = types.ModuleType("datasets")
        stub.load_dataset = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no datasets: offline bench"))
        sys.modules["datasets"] = stub
    sys.path.insert(0, released)

    from ream import Merger
    t_imported = time.time()
    np.random.seed(SEED_TAG)                         # the expert-activation sampling uses numpy's global RNG
    torch.manual_seed(0)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
    except ValueError:                               # a tokenizer_config.json written by transformers >= 5
        from transformers import PreTrainedTokenizerFast

        cfg = json.loads((Path(model) / "tokenizer_config.json").read_text())
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(Path(model) / "tokenizer.json"),
                                            eos_token=cfg.get("eos_token"), pad_token=cfg.get("pad_token"))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = tokenizer.eos_token_id
    model_ = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, low_cpu_mem_usage=False).eval()
    t_loaded = time.time()
    check_loaded(model_, model)
    merger = Merger(model_, merge_size=experts, dataset=SET, tokenizer_name="qwen3", batch_size=8,
                    calibration_data_size=samples, calibration_data_seq_len=seq_len, seed=SEED_TAG, verbose=False)
    merged = merger.fit()
    t_fit = time.time()
    merged.config.merge_args = {"merge_size": experts, "dataset": SET}
    os.makedirs(out, exist_ok=True)
    tokenizer.save_pretrained(out)
    merged.save_pretrained(out, safe_serialization=True, max_shard_size="4GB")
    t_end = time.time()
    print(json.dumps({"imports": t_imported - t_start, "load": t_loaded - t_imported, "fit": t_fit - t_loaded,
                      "save": t_end - t_fit, "work": t_end - t_imported,
                      "experts": int(merged.config.num_experts)}))


def check_loaded(hf_model, folder: str) -> None:
    """Every routed-expert weight the released code will merge equals the checkpoint's (a transformers version
    that does not know the checkpoint's layout would leave them randomly initialised)."""
    import torch
    from safetensors import safe_open

    params = dict(hf_model.named_parameters())
    index = json.loads((Path(folder) / "model.safetensors.index.json").read_text())["weight_map"]
    checked = 0
    for key, shard in index.items():
        if ".experts." not in key:
            continue
        with safe_open(str(Path(folder) / shard), "pt") as f:
            ref = f.get_tensor(key).float()
        got = params.get(key)
        if got is None or got.dtype != torch.float32 or not torch.equal(got.detach(), ref):
            sys.exit(f"released code's model: {key} not loaded as in the checkpoint (float32)")
        checked += 1
    if not checked:
        sys.exit("released code's model: no per-expert tensors found to check")


def reamkit_child(model: str, out: str, experts: int, samples: int, seq_len: int, mix: str, threads: int) -> None:
    """``reamkit compress --method ream`` through its command line code."""
    t_start = time.time()
    import torch

    torch.set_num_threads(threads)
    from reamkit.cli import app
    t_imported = time.time()
    args = ["compress", model, "-o", out, "--method", "ream", "--experts", str(experts), "--samples", str(samples),
            "--seq-len", str(seq_len), "--calib", mix, "--device", "cpu", "--dtype", "float32"]
    try:
        app(args, standalone_mode=False)
    except SystemExit as e:
        if e.code:
            raise
    t_end = time.time()
    rep = json.loads((Path(out) / "compression" / "report.json").read_text())
    print(json.dumps({"imports": t_imported - t_start, "work": t_end - t_imported, "pass": rep["seconds"],
                      "experts": rep["experts_after"],
                      "groups": [[g["members"] for g in lay.get("groups", [])] for lay in rep["layers"]]}))


# ---------------------------------------------------------------------------------------------- parent
def run_child(cmd: list[str], env: dict, cwd: Path) -> dict:
    """Run ``cmd``; its last stdout line (JSON) plus its wall seconds and peak RSS (its own, from wait4)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t = time.time()
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.time() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode:
        sys.exit(f"child failed ({proc.returncode}): {' '.join(cmd)}\n{stderr[-3000:]}")
    res = json.loads(stdout.strip().splitlines()[-1])
    res["wall"] = wall
    res["peak_rss"] = usage.ru_maxrss * 1024
    return res


def load1() -> float:
    return os.getloadavg()[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--released", help="checkout of SamsungSAILMontreal/ream")
    ap.add_argument("--python", default=sys.executable, help="interpreter for the released code")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--calib", help="calibration mix (default: reamkit's, code=0.7,math=0.3)")
    ap.add_argument("--experts", type=int, default=12, help="experts kept per layer (of 16)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", choices=["reamkit", "released"], help="time one program only")
    ap.add_argument("--model", help="default: the demo model")
    ap.add_argument("--child", choices=["reamkit", "released"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.child == "released":
        released_child(a.released, a.model, a.out, a.experts, a.samples, a.seq_len, a.threads)
        return
    if a.child == "reamkit":
        reamkit_child(a.model, a.out, a.experts, a.samples, a.seq_len, a.calib, a.threads)
        return
    if a.only != "reamkit" and not a.released:
        ap.error("--released PATH is needed (or --only reamkit)")

    from reamkit import defaults
    from reamkit.zoo import DEMO_MODEL

    a.calib = a.calib or defaults.CALIB_MIX
    model = Path(a.model or DEMO_MODEL).resolve()
    work = Path(tempfile.mkdtemp(prefix="reamkit-vs-released-"))
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads),
           "REAMKIT_CACHE_DIR": str(work / "cache"), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    os.environ["REAMKIT_CACHE_DIR"] = env["REAMKIT_CACHE_DIR"]
    try:
        ids = calibration(model, a.calib, a.samples, a.seq_len)   # cached: the reamkit runs reuse it
        write_released_data(work, ids)
        print(f"model {model.name}: {a.samples} x {a.seq_len} calibration tokens ({a.calib}, seed 0), float32, "
              f"{a.threads} threads, 16 -> {a.experts} experts; same token ids for both", flush=True)
        me = [sys.executable, str(Path(__file__).resolve())]
        common = ["--model", str(model), "--experts", str(a.experts), "--samples", str(a.samples),
                  "--seq-len", str(a.seq_len), "--threads", str(a.threads), "--calib", a.calib]
        programs = [p for p in ("released", "reamkit") if a.only in (None, p)]
        runs: dict[str, list[dict]] = {p: [] for p in programs}
        for r in range(a.rounds):
            for p in programs:
                out = work / f"out-{p}"
                shutil.rmtree(out, ignore_errors=True)
                if p == "released":
                    cmd = [a.python, me[1], "--child", "released", "--released", str(Path(a.released).resolve()),
                           "--out", str(out), *common]
                else:
                    cmd = [*me, "--child", "reamkit", "--out", str(out), *common]
                load = load1()
                res = run_child(cmd, env, work)
                res["load"] = load
                runs[p].append(res)
                print(f"round {r + 1} {p:8s} {res['wall']:7.2f} s  (work {res['work']:6.2f} s, imports "
                      f"{res['imports']:4.2f} s)  peak RSS {res['peak_rss'] / 2**20:6.0f} MiB  "
                      f"1-min load before {load:.2f}", flush=True)
        if "reamkit" in runs and runs["reamkit"]:
            groups = runs["reamkit"][0]["groups"]
            for i, g in enumerate(groups):
                print(f"reamkit groups layer {i}: {g}")
        if len(programs) == 2:
            ratios = [k["wall"] / r["wall"] for r, k in zip(runs["released"], runs["reamkit"])]
            work_ratios = [k["work"] / r["work"] for r, k in zip(runs["released"], runs["reamkit"])]
            print(f"\nreamkit / released wall, per round: {', '.join(f'{x:.3f}' for x in ratios)}; median "
                  f"{statistics.median(ratios):.3f} (range {min(ratios):.3f}-{max(ratios):.3f})")
            print(f"reamkit / released after imports:  {', '.join(f'{x:.3f}' for x in work_ratios)}; median "
                  f"{statistics.median(work_ratios):.3f} (range {min(work_ratios):.3f}-{max(work_ratios):.3f})")
        for p in programs:
            w = [x["wall"] for x in runs[p]]
            print(f"{p:8s} wall median {statistics.median(w):.2f} s, peak RSS max "
                  f"{max(x['peak_rss'] for x in runs[p]) / 2**20:.0f} MiB")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
