"""What a compression method is: a :class:`Method` with typed :class:`MethodOptions`, composing the steps of
the layer pass (:class:`..steps.LayerSteps`: observe -> plan -> apply -> propagate).

A method states what it needs observed (``needs``: ``logits``, ``activations``, ``outputs``: every expert's
output sums over all tokens while observing -- a method that reads them for some experts only asks for those
at planning time, :meth:`..observe.ExpertStats.ensure_outputs`), whether the next layer is
observed on the outputs of the *compressed* layer (``sequential``, as REAM) or of the original one (as REAP),
its options (a pydantic model, validated once, written into the output's ``merge_args`` as ``model_dump()``),
and how it turns one layer's observations into a :class:`LayerPlan` (:meth:`Method.plan_layer`). Applying a
plan to the weights and passing the calibration batches on are shared; a method may override them, or the
whole composition (:meth:`Method.compress_layer`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from ...errors import ReamkitError

if TYPE_CHECKING:
    from ...models.moe import MoEBlock
    from ..observe import ExpertStats
    from ..plan import LayerPlan
    from ..steps import LayerSteps


class MethodOptions(BaseModel):
    """A method's options: each one defined once, with its default; an unknown one is refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class MethodInput:
    stats: ExpertStats
    block: MoEBlock | None                      # None when planning from saved observations
    keep: int                                   # experts kept in this layer
    options: MethodOptions | None = None        # the method's validated options
    sequences: int | None = None                # calibration sequences (REAM reference saliency)
    heldout: list | None = None                 # MoE inputs [T, H] of batches the statistics never saw
    cache: dict | None = None                   # shared by the candidate plans of one layer (auto)
    moe_inputs: Callable[[], Iterable] | None = None   # replays the observed batches' MoE inputs [T, H]


class Method(ABC):
    name: ClassVar[str]
    needs: ClassVar[tuple[str, ...]] = ()       # per-token statistics beyond the routed per-expert sums
    sequential: ClassVar[bool] = False
    plans_from_saved: ClassVar[bool] = False     # its plan depends only on statistics a run saves (reuse.py)
    Options: ClassVar[type[MethodOptions]] = MethodOptions

    def options(self, given: dict[str, Any] | MethodOptions | None = None) -> MethodOptions:
        """``given`` validated into this method's options (defaults filled in); a bad one is a one-line error."""
        if isinstance(given, self.Options):
            return given
        try:
            return self.Options(**dict(given or {}))
        except ValidationError as e:
            raise ReamkitError(self._explain(e.errors()[0])) from None

    def _explain(self, err: dict) -> str:
        field = ".".join(str(p) for p in err["loc"]) or "options"
        if err["type"] == "extra_forbidden":
            return (f"method {self.name} has no option {field!r}; its options: "
                    f"{', '.join(self.Options.model_fields) or 'none'}")
        if err["type"] == "literal_error":
            return f"unknown {self.name.upper()} {field} {err['input']!r}; choose {err['ctx']['expected']}"
        if err["type"] == "value_error":
            return str(err["ctx"]["error"])
        return f"method {self.name} option {field}={err['input']!r}: {err['msg']}"

    def holdout(self, options: MethodOptions) -> float:
        """The share of calibration batches kept out of the statistics to score plans on (0: none)."""
        return 0.0

    @abstractmethod
    def plan_layer(self, inp: MethodInput) -> LayerPlan:
        """One layer's plan from its observations (``inp.options`` are this method's options)."""

    def apply(self, plan: LayerPlan, tensors: dict, adapter, layout: str) -> dict:
        """The layer's tensors with the plan applied to its routed experts and router."""
        from ..plan import apply_plan

        router = tensors[adapter.router_key(adapter.expert_layout(tensors))]
        experts, new_router = apply_plan(plan, adapter.experts(tensors, stack=False), router, stack=False)
        return adapter.replace_experts(tensors, experts, new_router, layout)

    def compress_layer(self, steps: LayerSteps, options: MethodOptions) -> None:
        """One MoE layer: observe (read instead when planning from saved observations), plan, apply, propagate."""
        observed = steps.observe(self.needs, self.holdout(options))
        plan = steps.plan(self, options, observed)
        steps.propagate(steps.apply(self, plan))
