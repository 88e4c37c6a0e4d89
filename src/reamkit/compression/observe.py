"""Per-expert statistics of one MoE layer, accumulated over calibration batches.

Every routed expert is evaluated densely on every calibration token (in blocks of experts sized to a memory
budget), as REAP and REAM both require. One pass gathers everything any method needs:

* ``freq`` [N]           routed token counts |X_i| (tokens whose top-k includes i)
* ``prob_mass`` [N]      sum over all tokens of the softmax probability p_i
* ``reap_sum`` [N]       sum over X_i of g_i * ||E_i|| with g the model's gate (top-k renormalised when the
                         model renormalises): REAP's saliency numerator
* ``paper_sum`` [N]      sum over X_i of p_i * ||E_i||: the REAM paper's saliency numerator
* ``ref_chunk_sum`` [N]  sum over batches of mean over (X_i in the batch) of p_i^2 * ||E_i||: the released REAM
                         code's saliency (double gating, per-chunk means that let frequency leak in)
* ``ean_sum`` [N]        sum over X_i of ||E_i||
* ``gated_out_sum`` [N, H]  sum over all tokens of p_i * E_i (REAM's similarity of outputs)
* ``out_sum`` [N, H]     sum over all tokens of E_i (HC-SMoE's characteristic activation)
* ``in_sumsq`` [N, H], ``mid_sumsq`` [N, D]  sums over X_i of x^2 and h_i^2: an importance matrix per expert
* ``logits``            router logits of every token [T, N] (REAM's logit profiles, M-SMoE's similarity)
* ``x_samples``         the MoE input at a random subset of positions [S, H]; REAM's neuron alignment needs
                        h_i there, computed on demand (:meth:`ExpertStats.activations`) for the few experts
                        that are merged, instead of storing [N, S, D] for all (34 GB at Qwen3-Next scale)

Memory: the dense expert outputs are computed ``block_bytes`` at a time (a few experts per step), so the
observation costs a few tens of MB however many experts the layer has.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..models.moe import MoEBlock

STAT_KEYS = ("freq", "prob_mass", "reap_sum", "paper_sum", "ref_chunk_sum", "ean_sum", "gated_out_sum",
             "out_sum", "in_sumsq", "mid_sumsq")


@dataclass
class ObserveOptions:
    activation_samples: int = 32768       # positions of h_i kept per layer for alignment (0: none)
    keep_logits: bool = True              # REAM / M-SMoE need every token's router logits
    block_bytes: int = 32 << 20           # memory for one block of dense expert outputs
    seed: int = 0


@dataclass
class ExpertStats:
    num_experts: int
    hidden: int
    inter: int
    expected_batches: int
    options: ObserveOptions = field(default_factory=ObserveOptions)

    def __post_init__(self):
        n, h, d = self.num_experts, self.hidden, self.inter
        z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
        self.freq, self.prob_mass, self.reap_sum, self.paper_sum = z(n), z(n), z(n), z(n)
        self.ref_chunk_sum, self.ean_sum = z(n), z(n)
        self.gated_out_sum, self.out_sum, self.in_sumsq, self.mid_sumsq = z(n, h), z(n, h), z(n, h), z(n, d)
        self.tokens = 0
        self.batches = 0
        self.logits: list[torch.Tensor] = []
        self.x_samples: list[torch.Tensor] = []
        self._block: MoEBlock | None = None        # the block observed last (for activations on demand)
        self._gen = torch.Generator().manual_seed(self.options.seed)

    # ------------------------------------------------------------------ accumulate
    @torch.no_grad()
    def observe(self, block: MoEBlock, x: torch.Tensor) -> None:
        """Add one batch: ``x`` [T, H] is the MoE input at real (non-padding) positions."""
        x = x.to(block.router.dtype)
        t = x.shape[0]
        logits = block.router_logits(x)                                    # [T, N]
        probs = torch.softmax(logits.float(), dim=-1)
        gates = block.gates(logits)                                        # model's weights, 0 if not routed
        _, top = torch.topk(probs, block.routing.top_k, dim=-1)
        routed = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, top, True)   # [T, N]
        routed_f = routed.to(x.dtype)
        self.freq += routed.sum(0).double()
        self.prob_mass += probs.sum(0).double()
        self.in_sumsq += (routed_f.T @ (x * x)).double()
        if self.options.keep_logits:
            self.logits.append(logits.float().cpu())
        per = max(1, self.options.activation_samples // max(1, self.expected_batches))
        pos = (torch.randperm(t, generator=self._gen)[:per].to(x.device)
               if self.options.activation_samples else None)
        if pos is not None:
            self.x_samples.append(x[pos].clone())
        self._block = block
        n = block.num_experts
        step = max(1, int(self.options.block_bytes // max(1, t * (self.hidden + self.inter) * x.element_size())))
        for s in range(0, n, step):
            sl = slice(s, min(n, s + step))
            h = block.expert_hidden(x, sl)                                 # [n, T, D]
            e = block.expert_down(h, sl)                                   # [n, T, H]
            norms = e.float().norm(dim=-1)                                 # [n, T]
            r = routed[:, sl].T.float()                                    # [n, T]
            p = probs[:, sl].T
            g = gates[:, sl].T.float()
            self.reap_sum[sl] += (g * norms).sum(1).double()
            self.paper_sum[sl] += (r * p * norms).sum(1).double()
            self.ean_sum[sl] += (r * norms).sum(1).double()
            cnt = r.sum(1)
            self.ref_chunk_sum[sl] += torch.where(cnt > 0, (r * p * p * norms).sum(1) / cnt.clamp(min=1), 0).double()
            self.gated_out_sum[sl] += torch.einsum("nt,nth->nh", p.to(e.dtype), e).double()
            self.out_sum[sl] += e.sum(1).double()
            self.mid_sumsq[sl] += torch.einsum("nt,ntd->nd", r.to(h.dtype), h * h).double()
            del h, e
        self.tokens += t
        self.batches += 1

    # ------------------------------------------------------------------ results
    def saliency(self, mode: str, sequences: int | None = None, chunk: int = 8) -> torch.Tensor:
        """Per-expert saliency [N] (float64).

        ``reap``: mean over X_i of g_i ||E_i|| (the model's gate); ``paper``: mean over X_i of p_i ||E_i||;
        ``reference``: the released REAM code's sum of per-batch means of p_i^2 ||E_i|| divided by
        floor(sequences / chunk); ``frequency``: |X_i|; ``ean``: mean over X_i of ||E_i||.
        Experts never routed get 0 (except ``reference``, see :func:`fill_zero_saliency`).
        """
        freq = self.freq.clamp(min=1)
        if mode == "reap":
            return self.reap_sum / freq
        if mode == "paper":
            return self.paper_sum / freq
        if mode == "ean":
            return self.ean_sum / freq
        if mode == "frequency":
            return self.freq.clone()
        if mode == "reference":
            denom = max(1, (sequences or self.batches * chunk) // chunk)
            return self.ref_chunk_sum / denom
        raise ValueError(f"unknown saliency mode {mode!r}")

    def all_logits(self) -> torch.Tensor:
        return torch.cat(self.logits) if self.logits else torch.empty(0, self.num_experts)

    def sampled_inputs(self) -> torch.Tensor:
        """The MoE inputs at the sampled positions [S, H]."""
        return torch.cat(self.x_samples) if self.x_samples else torch.empty(0, self.hidden)

    def activations(self, experts: list[int] | None = None, block: MoEBlock | None = None) -> torch.Tensor:
        """Hidden activations h_i at the sampled positions [n, S, D] (float32) for ``experts`` (default: all),
        computed from ``block`` (default: the block observed)."""
        block = block or self._block
        idx = torch.arange(self.num_experts) if experts is None else torch.as_tensor(experts, dtype=torch.long)
        xs = self.sampled_inputs()
        if block is None or not xs.numel():
            return torch.empty(len(idx), 0, self.inter)
        return block.expert_hidden(xs.to(block.router.dtype), idx.to(xs.device)).float().cpu()

    def summary_tensors(self) -> dict[str, torch.Tensor]:
        """The per-expert statistics worth keeping on disk (not the per-token logits or samples), each once;
        counts and squared-input sums under the names the quantizer's importance matrix reads.
        The per-expert vectors stay float64, so a plan made from the saved file equals one made here."""
        renamed = {"freq": "expert_tokens", "in_sumsq": "expert_in_sumsq", "mid_sumsq": "expert_mid_sumsq"}
        return {renamed.get(k, k): getattr(self, k) if getattr(self, k).ndim == 1 else getattr(self, k).float()
                for k in STAT_KEYS}


def fill_zero_saliency(s: torch.Tensor) -> torch.Tensor:
    """The released REAM code's rule: zeros become min(0.5, smallest positive saliency)."""
    pos = s[s > 0]
    fill = min(0.5, float(pos.min())) if pos.numel() else 0.5
    return torch.where(s > 0, s, torch.full_like(s, fill))


class OutputStats:
    """What the experts of the *compressed* layer see: per output expert, its routed token count and the sums of
    squared inputs, per input channel, of ``gate``/``up`` (x) and of ``down`` (h), over the tokens routed to it.
    These are llama-imatrix's ``counts`` and ``in_sum2`` for the compressed model's ``ffn_*_exps`` tensors, so
    ``reamkit quantize <compressed model> --imatrix auto`` uses them (saved as
    ``compression/output_observations.safetensors``). Only routed tokens are evaluated (top-k of N experts)."""

    def __init__(self, num_experts: int, hidden: int, inter: int):
        z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
        self.freq, self.in_sumsq, self.mid_sumsq = z(num_experts), z(num_experts, hidden), z(num_experts, inter)

    @torch.no_grad()
    def observe(self, block: MoEBlock, x: torch.Tensor) -> None:
        x = x.to(block.router.dtype)
        probs = torch.softmax(block.router_logits(x).float(), dim=-1)
        _, top = torch.topk(probs, block.routing.top_k, dim=-1)
        routed = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, top, True)   # [T, N]
        self.freq += routed.sum(0).double()
        self.in_sumsq += (routed.to(x.dtype).T @ (x * x)).double()
        for i in range(routed.shape[1]):
            rows = routed[:, i].nonzero().squeeze(1)
            if rows.numel():
                h = block.expert_hidden(x[rows], slice(i, i + 1))[0]                  # [T_i, D]
                self.mid_sumsq[i] += (h * h).sum(0).double()

    def summary_tensors(self) -> dict[str, torch.Tensor]:
        return {"expert_tokens": self.freq, "expert_in_sumsq": self.in_sumsq.float(),
                "expert_mid_sumsq": self.mid_sumsq.float()}
