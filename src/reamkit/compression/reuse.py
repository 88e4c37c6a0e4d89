"""Saved observations, and compressing again from them without calibrating.

A compression run saves, in ``compression/`` next to the model, every MoE block's per-expert statistics
(``observations.safetensors``: token counts, saliency sums, squared-input sums, and the sums of every expert's
outputs over all tokens when the method computed them for every expert, as ``hc-smoe`` does) and what they were
computed on (``observations.json``: the model's fingerprint, the calibration mix, sizes and seed, the compute
dtype, and whether the inputs came from the original model). A later run can plan from them instead of
running the calibration set through the model again, when the plan depends on those statistics alone:

* ``reap`` (saliency = mean of g * ||E|| over routed tokens) and ``frequency`` (routed counts) can, in the
  non-sequential setting: their statistics are those of the original model's layers, whatever the target.
* The observations must then come from a non-sequential run (any method): in a sequential run layer i+1
  was observed on the outputs of the *compressed* layer i, so its statistics belong to that compression.
* ``ream`` cannot: it is sequential (each layer's inputs depend on how the previous layer was merged) and it
  needs the router logits' Gram matrix and sampled inputs, which are not saved. ``m-smoe`` needs that Gram matrix;
  ``hc-smoe`` clusters mean outputs that are saved only in float32, so a plan from them could differ from a
  fresh run's on near-ties -- neither reuses.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..errors import ReamkitError
from .observe import OUTPUT_KEYS, STAT_KEYS

_RENAMED = {"freq": "expert_tokens", "in_sumsq": "expert_in_sumsq", "mid_sumsq": "expert_mid_sumsq"}


def identity(fingerprint: str, opts, sequential: bool) -> dict:
    """What observations were computed on; two runs may share observations when these agree."""
    return {"model_fingerprint": fingerprint, "sequential": sequential, "compute_dtype": opts.compute_dtype,
            "calibration": {"mix": opts.calib, "samples": opts.samples, "seq_len": opts.seq_len,
                            "seed": opts.seed, "batch_size": opts.batch_size}}


class SavedStats:
    """One MoE block's saved statistics with :class:`ExpertStats`'s reading interface (``saliency``, ``freq``)."""

    def __init__(self, tensors: dict[str, torch.Tensor], tokens: int):
        for k in STAT_KEYS:
            saved = tensors.get(_RENAMED.get(k, k))
            if saved is None and k not in OUTPUT_KEYS:             # the output sums are saved by some runs only
                raise KeyError(_RENAMED.get(k, k))
            setattr(self, k, None if saved is None else saved.double())
        self.num_experts = self.freq.numel()
        self.tokens = tokens

    def saliency(self, mode: str, sequences: int | None = None, chunk: int = 8) -> torch.Tensor:
        from .observe import ExpertStats

        return ExpertStats.saliency(self, mode, sequences, chunk)      # type: ignore[arg-type]


def load_observations(path: Path, method, sequential: bool, expected: dict) -> tuple[dict, dict]:
    """(identity, tensors) of saved observations at ``path`` (a ``compression/`` folder, the model folder above
    it, or the safetensors file), refused in one line if this run (``method``: a :class:`.methods.Method`) cannot
    use them."""
    path = Path(path)
    folder = path.parent if path.suffix == ".safetensors" else path
    if (folder / "compression").is_dir():
        folder = folder / "compression"
    meta, data = folder / "observations.json", folder / "observations.safetensors"
    if not meta.is_file() or not data.is_file():
        raise ReamkitError(f"{path} holds no saved observations (observations.json + observations.safetensors)",
                           fix="point --observations at the compression/ folder of an earlier reamkit compress output")
    if not method.plans_from_saved:
        from .methods import METHODS

        can = [m.name for m in METHODS.values() if m.plans_from_saved]
        raise ReamkitError(f"method {method.name} cannot plan from saved observations (only {', '.join(can)} can: "
                           "see reamkit.compression.reuse)", fix="drop --observations to calibrate afresh")
    if sequential:
        raise ReamkitError("saved observations are per layer of the original model; a sequential pass needs "
                           "each layer observed after the previous one was compressed", fix="use --no-sequential")
    saved = json.loads(meta.read_text())
    if saved.get("sequential"):
        raise ReamkitError(f"the observations in {folder} come from a sequential run (each layer observed after "
                           "the previous one was compressed); they describe that compression, not the model",
                           fix="save observations with a --no-sequential run, or drop --observations")
    if saved.get("model_fingerprint") != expected["model_fingerprint"]:
        raise ReamkitError(f"the observations in {folder} belong to another model (fingerprint "
                           f"{saved.get('model_fingerprint')}, this model {expected['model_fingerprint']})")
    for key in ("calibration", "compute_dtype"):
        if saved.get(key) != expected[key]:
            raise ReamkitError(f"the observations in {folder} were computed with {key} {saved.get(key)}, this run "
                               f"asks for {expected[key]}", fix="match the calibration options, or drop --observations")
    return saved, load_file(str(data))
