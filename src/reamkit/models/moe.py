"""A decoder layer's sparse MoE block as explicit steps, computed from its tensors.

Compression methods need what the fused transformers kernel hides: every routed expert's output on every
token, the router logits, and the shared-expert term. :class:`MoEBlock` computes them directly from the
on-disk tensors (either expert layout), so methods never reach into transformers internals; a test checks
that :meth:`MoEBlock.forward` reproduces the transformers module.

Shapes: ``x`` is the MoE block's input [T, H] (after the post-attention norm); router logits [T, N];
expert hidden activations ``h_i(x) = silu(W_gate,i x) * (W_up,i x)`` [n, T, D]; expert outputs
``E_i(x) = W_down,i h_i(x)`` [n, T, H].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from .base import Adapter, Experts, Routing

SHARED_PROJ = ("gate_proj", "up_proj", "down_proj")   # the shared expert's names in every family that has one


@dataclass
class MoEBlock:
    router: torch.Tensor                     # [N, H]
    experts: Experts                         # gate/up [N, D, H], down [N, H, D]
    routing: Routing
    shared: dict[str, torch.Tensor] | None = None   # gate/up [Ds, H], down [H, Ds]
    shared_gate: torch.Tensor | None = None          # [1, H]

    @classmethod
    def from_tensors(cls, adapter: Adapter, config: dict, tensors: dict[str, torch.Tensor],
                     dtype: torch.dtype | None = torch.float32) -> "MoEBlock":
        """The MoE block of a layer from its relative tensor names (``mlp.gate.weight`` ...)."""
        cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
        layout = adapter.expert_layout(tensors)
        ex = adapter.experts(tensors)
        experts = Experts(cast(ex.gate), cast(ex.up), cast(ex.down))
        router = cast(tensors[adapter.router_key(layout)])
        routing = adapter.routing(adapter.with_num_experts(config, router.shape[0]))
        shared = shared_gate = None
        if adapter.shared_expert:
            pre = f"{adapter.moe}.{adapter.shared_expert}."
            g, u, d = SHARED_PROJ
            shared = {"gate": cast(tensors[pre + g + ".weight"]), "up": cast(tensors[pre + u + ".weight"]),
                      "down": cast(tensors[pre + d + ".weight"])}
            if adapter.shared_expert_gate:
                shared_gate = cast(tensors[f"{adapter.moe}.{adapter.shared_expert_gate}.weight"])
        return cls(router, experts, routing, shared, shared_gate)

    # ------------------------------------------------------------------ steps
    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.router.T

    def expert_hidden(self, x: torch.Tensor, idx: slice | torch.Tensor = slice(None)) -> torch.Tensor:
        """``h_i(x)`` for the experts ``idx`` on every token: [n, T, D]. Expert weights stored in another dtype
        (a bf16 checkpoint observed in float32) are widened a block of experts at a time."""
        gate = torch.matmul(x, self.experts.gate[idx].to(x.dtype).transpose(1, 2))
        up = torch.matmul(x, self.experts.up[idx].to(x.dtype).transpose(1, 2))
        return F.silu(gate, inplace=True).mul_(up)

    def neuron_activations(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """Expert ``e``'s hidden activations laid out per neuron, ``h_e(x)^T`` [D, T]: each row one neuron's
        values on the tokens (computed in that layout, without transposing [T, D])."""
        xt = x.T
        gate = self.experts.gate[e].to(x.dtype) @ xt
        return F.silu(gate, inplace=True).mul_(self.experts.up[e].to(x.dtype) @ xt)

    def expert_down(self, hidden: torch.Tensor, idx: slice | torch.Tensor = slice(None)) -> torch.Tensor:
        """``E_i = W_down,i h_i`` for hidden activations [n, T, D]: [n, T, H]."""
        return torch.matmul(hidden, self.experts.down[idx].to(hidden.dtype).transpose(1, 2))

    def shared_term(self, x: torch.Tensor) -> torch.Tensor:
        """The always-active part: ``sigmoid(shared_gate x) * shared_expert(x)``, or zeros."""
        if self.shared is None:
            return torch.zeros_like(x)
        s = F.linear(F.silu(F.linear(x, self.shared["gate"])) * F.linear(x, self.shared["up"]), self.shared["down"])
        if self.shared_gate is not None:
            s = torch.sigmoid(F.linear(x, self.shared_gate)) * s
        return s

    def gates(self, logits: torch.Tensor) -> torch.Tensor:
        """Dense [T, N] gate values: the model's top-k weights where routed, 0 elsewhere."""
        w, idx = self.routing.weights(logits)
        return torch.zeros_like(logits, dtype=w.dtype).scatter_(-1, idx, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output [T, H], evaluating every expert densely (reference semantics, not speed)."""
        g = self.gates(self.router_logits(x))
        out = self.expert_down(self.expert_hidden(x))                 # [N, T, H]
        routed = torch.einsum("tn,nth->th", g.to(out.dtype), out)
        return routed + self.shared_term(x)

    @property
    def num_experts(self) -> int:
        return self.router.shape[0]


MOE_NORM = "post_attention_layernorm"       # the norm in front of the MoE block, in every supported family


class _Stop(Exception):
    """Raised by a capture hook to end a decoder layer's forward at its MoE block."""


def capture_moe_input(layer: torch.nn.Module, adapter: Adapter, stop: bool = False):
    """Register a pre-hook on a decoder layer's MoE module that records its input; returns (list, handle).

    With ``stop`` the hook also records the layer's residual stream in front of the MoE block (the input of
    its norm) -- ``seen`` then holds (residual, moe input) pairs -- and ends the layer's forward there: run the
    layer through :func:`run_to_moe`. The MoE block itself and what follows it are not computed."""
    module = layer.get_submodule(adapter.moe)
    seen: list = []
    if not stop:
        return seen, module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    resid: list[torch.Tensor] = []

    def hook(_module, args):
        seen.append((resid.pop(), args[0].detach()))
        raise _Stop

    norm = layer.get_submodule(MOE_NORM).register_forward_pre_hook(lambda _m, args: resid.append(args[0].detach()))
    handle = module.register_forward_pre_hook(hook)
    return seen, _Handles(handle, norm)


class _Handles:
    def __init__(self, *handles):
        self.handles = handles

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def run_to_moe(run, *args) -> None:
    """Call ``run(*args)`` (a decoder layer's forward) when a :func:`capture_moe_input` hook with ``stop`` ends
    it at the MoE block."""
    try:
        run(*args)
    except _Stop:
        return
    raise RuntimeError("the decoder layer never reached its MoE block")


def moe_tail(layer: torch.nn.Module, adapter: Adapter, resid: torch.Tensor) -> torch.Tensor:
    """What a pre-norm decoder layer computes after its attention, from the residual stream ``resid`` in front of
    the MoE block: ``resid + moe(norm(resid))``; the same operations as the layer's own forward, so the same
    values, without computing the attention again."""
    out = layer.get_submodule(adapter.moe)(layer.get_submodule(MOE_NORM)(resid))
    return resid + (out[0] if isinstance(out, tuple) else out)
