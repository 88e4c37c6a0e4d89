"""Routed experts kept in the checkpoint's dtype inside a layer that computes in a wider one.

A decoder layer of a bf16 checkpoint run in float32 would otherwise hold a float32 copy of every expert:
twice the layer's bytes, the largest single item of the compression pass's memory. Instead the experts
module keeps its bf16 parameters and this experts implementation (registered with transformers as
``reamkit_upcast``) widens one expert's weights at a time, for the tokens routed to it. Widening bf16 to
float32 is exact, so each expert computes what it would with float32 weights; the per-expert grouping and the
final weighted sum over the top-k follow transformers' ``grouped_mm`` implementation.

Since it evaluates each expert on its routed tokens anyway, an observer can be attached (:func:`observing`):
it is given every expert's routed inputs and hidden activations as they are computed (the compression pass
takes the compressed layer's importance statistics from its own forward this way).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

NAME = "reamkit_upcast"
_OBSERVER = "_reamkit_observer"
_configs: dict[int, object] = {}


def _loops(module) -> bool:
    """Whether ``module`` (a transformers experts module) runs :func:`upcast_experts_forward`'s own per-expert
    loop (other layouts are handed to transformers' ``grouped_mm`` with widened weights)."""
    return (getattr(getattr(module, "config", None), "_experts_implementation", None) == NAME
            and not (module.has_bias or module.is_transposed or not module.has_gate or module._is_expert_parallel))


@contextmanager
def observing(module, observer: Callable[[int, torch.Tensor, torch.Tensor], None]) -> Iterator[bool]:
    """While inside, ``observer(e, x, h)`` is called for every expert ``e`` that ``module``'s forward evaluates,
    with its routed inputs ``x`` [c, H] and hidden activations ``h`` [c, D] (before the down projection).
    Yields whether it will be called at all: only a module that runs this file's per-expert loop does."""
    if not _loops(module):
        yield False
        return
    setattr(module, _OBSERVER, observer)
    try:
        yield True
    finally:
        delattr(module, _OBSERVER)


def upcast_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                           top_k_weights: torch.Tensor) -> torch.Tensor:
    dtype = hidden_states.dtype
    if not _loops(self):
        from transformers.integrations.moe import grouped_mm_experts_forward

        widened = copy.copy(self)
        widened.gate_up_proj = torch.nn.Parameter(self.gate_up_proj.to(dtype), requires_grad=False)
        widened.down_proj = torch.nn.Parameter(self.down_proj.to(dtype), requires_grad=False)
        return grouped_mm_experts_forward(widened, hidden_states, top_k_index, top_k_weights)
    num_tokens, hidden = hidden_states.shape
    k = top_k_index.size(-1)
    expert_ids, perm = torch.sort(top_k_index.reshape(-1))
    x = hidden_states.index_select(0, perm // k)          # (a few times faster than hidden_states[perm // k])
    counts = torch.bincount(expert_ids, minlength=self.num_experts).tolist()
    out = torch.zeros(x.shape[0], hidden, dtype=dtype, device=x.device)
    observer = getattr(self, _OBSERVER, None)
    start = 0
    for e, c in enumerate(counts[: self.num_experts]):
        if c:
            xe = x[start:start + c]
            h = self._apply_gate(xe @ self.gate_up_proj[e].to(dtype).T)
            if observer is not None:
                observer(e, xe, h)
            out[start:start + c] = h @ self.down_proj[e].to(dtype).T
            start += c
    out = out * top_k_weights.reshape(-1).index_select(0, perm).unsqueeze(-1)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return out.index_select(0, inv).view(num_tokens, k, hidden).sum(dim=1).to(dtype)


def upcast_config(hf_config):
    """A copy of ``hf_config`` whose experts modules use :func:`upcast_experts_forward` (cached per config)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if NAME not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(NAME, upcast_experts_forward)
    key = id(hf_config)
    if key not in _configs:
        cfg = copy.deepcopy(hf_config)
        cfg._experts_implementation = NAME
        _configs[key] = (hf_config, cfg)          # the original is kept so its id stays unique
    return _configs[key][1]
