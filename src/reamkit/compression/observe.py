"""Per-expert statistics of one MoE layer, accumulated over calibration batches in a size that does not grow
with the number of calibration tokens.

Every routed expert is evaluated on every calibration token (in blocks of experts sized to a memory budget), as
REAP and REAM both require. One pass gathers everything any method needs:

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
* ``logit_gram`` [N, N]  sum over all tokens of z z^T, z the router logits (float64). The logit profile v_i (expert
                         i's logit on every token, REAM's and M-SMoE's similarity) enters only through inner
                         products v_i . v_j, which are exactly these entries: :meth:`ExpertStats.logit_cosine`
* ``x_samples``         the MoE input at ``activation_samples`` positions at most [S, H], S // batches drawn
                        uniformly from each batch (one from each of the first S batches when there are more);
                        REAM's neuron alignment needs h_i there, computed on demand
                        (:meth:`ExpertStats.activations`) for the few experts that are merged

Sizes: 6N + N(3H + D) + N^2 float64 numbers and S x H inputs, whatever the number of calibration tokens.

Speed: E_i = W_down,i h_i is linear in h_i, so the sums over all tokens of p_i E_i and E_i are W_down,i applied
to the sums of p_i h_i and h_i; the down projection runs on the routed tokens only (where the norms are needed).
Every expert's gate and up projections run on every token: a third of the dense cost is saved, and more
as top-k / N falls. Memory: the hidden activations are computed ``block_bytes`` at a time (a few experts per step).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..defaults import ACTIVATION_SAMPLES
from ..models.moe import MoEBlock

STAT_KEYS = ("freq", "prob_mass", "reap_sum", "paper_sum", "ref_chunk_sum", "ean_sum", "gated_out_sum",
             "out_sum", "in_sumsq", "mid_sumsq")


@dataclass
class ObserveOptions:
    activation_samples: int = ACTIVATION_SAMPLES   # positions of the MoE input kept per layer for alignment (0: none)
    keep_logits: bool = True              # accumulate the router logits' Gram matrix (REAM, M-SMoE)
    block_bytes: int = 32 << 20           # memory for one block of hidden activations
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
        self.logit_gram = z(n, n) if self.options.keep_logits else None
        self.tokens = 0
        self.batches = 0
        self.sampled = 0
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
        self.freq += routed.sum(0).double().cpu()
        self.prob_mass += probs.sum(0).double().cpu()
        self.in_sumsq += (routed.to(x.dtype).T @ (x * x)).double().cpu()
        if self.logit_gram is not None:
            zd = logits.double()
            self.logit_gram += (zd.T @ zd).cpu()
        self._sample(x)
        self._block = block
        n = block.num_experts
        step = max(1, int(self.options.block_bytes // max(1, 3 * t * self.inter * x.element_size())))
        for s in range(0, n, step):
            self._experts(block, x, slice(s, min(n, s + step)), probs, gates, routed)
        self.tokens += t
        self.batches += 1

    def _sample(self, x: torch.Tensor) -> None:
        cap = self.options.activation_samples
        if not cap or self.sampled >= cap:
            return
        per = min(max(1, cap // max(1, self.expected_batches)), cap - self.sampled)
        pos = torch.randperm(x.shape[0], generator=self._gen)[:per].to(x.device)
        self.x_samples.append(x[pos].clone())
        self.sampled += len(pos)

    def _experts(self, block: MoEBlock, x, sl: slice, probs, gates, routed) -> None:
        """The statistics of the experts ``sl`` on one batch."""
        h = block.expert_hidden(x, sl)                                     # [n, T, D]
        down_t = block.experts.down[sl].to(h.dtype).transpose(1, 2)        # [n, D, H]
        weights = torch.stack([probs[:, sl].T.to(h.dtype), torch.ones_like(h[:, :, 0])], dim=1)   # [n, 2, T]
        sums = torch.bmm(torch.bmm(weights, h), down_t).double().cpu()    # [n, 2, H]: sums of p E and of E
        self.gated_out_sum[sl] += sums[:, 0]
        self.out_sum[sl] += sums[:, 1]
        r = routed[:, sl].T                                                # [n, T]
        cnt = r.sum(1)
        most = int(cnt.max())
        if not most:
            return
        order = torch.sort(r.to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :most]  # routed first
        valid = torch.arange(most, device=r.device)[None] < cnt[:, None]                            # [n, c]
        hr = torch.gather(h, 1, order[..., None].expand(-1, -1, h.shape[-1]))                       # [n, c, D]
        del h
        norms = torch.bmm(hr, down_t).float().norm(dim=-1) * valid                                  # [n, c]
        p = probs[:, sl].T.gather(1, order)
        g = gates[:, sl].T.float().gather(1, order)
        self.reap_sum[sl] += (g * norms).sum(1).double().cpu()
        self.paper_sum[sl] += (p * norms).sum(1).double().cpu()
        self.ean_sum[sl] += norms.sum(1).double().cpu()
        self.ref_chunk_sum[sl] += torch.where(cnt > 0, (p * p * norms).sum(1) / cnt.clamp(min=1), 0).double().cpu()
        self.mid_sumsq[sl] += (hr * hr * valid[..., None].to(hr.dtype)).sum(1).double().cpu()

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

    def logit_cosine(self) -> torch.Tensor:
        """Cosine similarity [N, N] (float64) between the experts' logit profiles over all calibration tokens,
        from their Gram matrix: cos(v_i, v_j) = G_ij / sqrt(G_ii G_jj) (0 for an all-zero profile)."""
        if self.logit_gram is None:
            raise ValueError("the router logits were not observed (keep_logits=False)")
        norm = self.logit_gram.diagonal().clamp(min=0).sqrt()
        return self.logit_gram / torch.outer(norm, norm).clamp(min=1e-300)

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
        """The per-expert statistics worth keeping on disk (not the logits' Gram matrix or the samples), each once;
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
