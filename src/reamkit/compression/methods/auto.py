"""auto: per layer, the plan that measures best among pruning and merging candidates.

For each MoE layer: make the plans of several candidates from the same statistics -- REAP pruning and REAM at
a few group sizes by default -- then compress the layer with each and measure the relative squared error of the
MoE block's output against the original block's on calibration sequences held out from the statistics
(:mod:`..candidates`); keep the plan with the smallest error. Layers are processed in order and the next layer's
statistics come from the chosen compressed layer (sequential). Which method wins depends on the model and the
layer (near-duplicate experts merge almost for free; unrelated ones average badly and are better pruned), so
this measures it instead of guessing. The report records every candidate's error and the choice, per layer.

Options: ``candidates`` (comma-separated, see :func:`..candidates.parse`), ``holdout`` (the share of calibration
batches held out, at least one batch) and the REAM options its merging candidates use. Cost: every candidate
is planned (REAM's alignments are shared between group sizes) and its layer run on the held-out tokens.
"""

from __future__ import annotations

from pydantic import Field

from ... import defaults
from ..candidates import choose
from ..plan import LayerPlan
from .base import Method
from .ream import MergeOptions

CANDIDATES = "reap,ream:2,ream:4,ream:8,ream:n/8,ream:16"


class AutoOptions(MergeOptions):
    candidates: str = CANDIDATES
    holdout: float = Field(defaults.AUTO_HOLDOUT, gt=0, lt=1)     # a fraction of the calibration batches


class Auto(Method):
    name = "auto"
    sequential = True
    needs = ("logits", "activations")
    Options = AutoOptions

    def holdout(self, options) -> float:
        return float(options.holdout)

    def plan_layer(self, inp) -> LayerPlan:
        return choose(inp, str(inp.options.candidates))
