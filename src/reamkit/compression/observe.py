"""Per-expert statistics of one MoE layer, accumulated over calibration batches in a size that does not grow
with the number of calibration tokens.

One pass over the batches gathers what the methods need. Each expert is evaluated on its routed tokens (the
saliencies, the importance matrix); the sums over *all* tokens (``gated_out_sum``, ``out_sum``) need every
expert on every token, so they are computed either in the same pass (``outputs=True``: HC-SMoE reads every
expert's) or later, for the experts a plan reads (:meth:`ExpertStats.ensure_outputs`, replaying the batches'
MoE inputs: REAM reads only the dropped experts' and those of the centroids that take them).

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
                        uniformly from each batch (one from each of the first S batches when there are more),
                        into one buffer allocated at the first batch (their positions likewise); REAM's neuron
                        alignment needs h_i there, computed on demand (:meth:`ExpertStats.neuron_activations`) for
                        the few experts that are merged
* ``neuron_products``   the same alignment's costs for the expert pairs it may match (centroids c x members j),
                        taken while the output sums are replayed (those experts' h_i at the sampled positions come
                        out of the replay): sums over the samples of h_c h_j^T [C, M, D, D] and of h_e^2
                        (:meth:`ExpertStats.neuron_distance`), within ``pair_bytes``

Sizes: 6N + N(3H + D) + N^2 float64 numbers, S x H inputs and at most ``pair_bytes`` of neuron products,
whatever the number of calibration tokens.

Speed: the routed statistics cost top-k expert evaluations per token (each expert's gate, up and down on its
own tokens, gathered). For the sums over all tokens, E_i = W_down,i h_i is linear in h_i, so they are W_down,i
applied to the sums of p_i h_i and h_i: a block of experts' gate and up projections run on every token
(``block_bytes`` of hidden activations at a time), the down projection once per batch. REAM compressing 512
experts to 384 with groups of 16 evaluates 137 of them on every token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..defaults import ACTIVATION_SAMPLES
from ..models.moe import MoEBlock
from .heap import FORWARD, heap_mode

STAT_KEYS = ("freq", "prob_mass", "reap_sum", "paper_sum", "ref_chunk_sum", "ean_sum", "gated_out_sum",
             "out_sum", "in_sumsq", "mid_sumsq")
OUTPUT_KEYS = ("gated_out_sum", "out_sum")    # the sums over all tokens (every expert evaluated on every token)


@dataclass
class ObserveOptions:
    activation_samples: int = ACTIVATION_SAMPLES   # positions of the MoE input kept per layer for alignment (0: none)
    keep_logits: bool = True              # accumulate the router logits' Gram matrix (REAM, M-SMoE)
    outputs: bool = True                  # every expert's output sums on every token now (False: on demand,
                                          # :meth:`ExpertStats.ensure_outputs`, for the experts a plan reads)
    block_bytes: int = 32 << 20           # memory for one block of hidden activations
    pair_bytes: int = 256 << 20           # memory for the neuron cross products a replay may take for alignment
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
        self.has_outputs = torch.zeros(n, dtype=torch.bool)     # experts whose output sums are complete
        self.tokens = 0
        self.batches = 0
        self.x_samples: torch.Tensor | None = None     # [bound, H], allocated at the first batch, filled in order
        self._sample_pos: torch.Tensor | None = None   # [bound]: the sampled positions, batch after batch
        self._sample_at: list[int] = [0]               # where each observed batch's positions start in it (and,
                                                       # last, how many are sampled)
        self.neuron_products: list[NeuronProducts] = []   # taken in output-sum replays, for alignment
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
        self._routed(block, x, probs, gates, routed)
        if self.options.outputs:
            self._all_outputs(block, x, torch.arange(block.num_experts), probs, self.gated_out_sum, self.out_sum)
            self.has_outputs[:] = True
        self.tokens += t
        self.batches += 1

    def _sample(self, x: torch.Tensor) -> None:
        cap = self.options.activation_samples
        if not cap or self.sampled >= cap:
            self._sample_at.append(self.sampled)
            return
        each = max(1, cap // max(1, self.expected_batches))
        if self.x_samples is None:
            # one buffer each for all batches' samples and positions: no small blocks left behind by every
            # batch to fragment the heap that the batches' large temporaries come from
            bound = min(cap, each * max(1, self.expected_batches))
            self.x_samples = x.new_empty(bound, x.shape[1])
            self._sample_pos = torch.empty(bound, dtype=torch.long)
        start = self.sampled
        per = min(each, len(self.x_samples) - start)         # (the buffer holds at most cap rows)
        drawn = torch.randperm(x.shape[0], generator=self._gen)[:per]
        pos = self._sample_pos[start:start + len(drawn)]
        pos.copy_(drawn)
        torch.index_select(x, 0, pos.to(x.device), out=self.x_samples[start:start + len(pos)])
        self._sample_at.append(start + len(pos))

    @property
    def sampled(self) -> int:
        """How many positions are sampled so far."""
        return self._sample_at[-1]

    def _positions(self, b: int) -> torch.Tensor | None:
        """The positions sampled in observed batch ``b`` (None: no such batch)."""
        if b + 1 >= len(self._sample_at) or self._sample_pos is None:
            return None
        return self._sample_pos[self._sample_at[b]:self._sample_at[b + 1]]

    def _routed(self, block: MoEBlock, x, probs, gates, routed) -> None:
        """The statistics over each expert's routed tokens: its output's norm there (saliencies) and its squared
        hidden activations, each expert evaluated on its own tokens only."""
        e, tok = routed.T.nonzero(as_tuple=True)                           # (expert, token) pairs, expert-major
        counts = torch.bincount(e, minlength=block.num_experts).tolist()
        norms = torch.empty(len(e), dtype=torch.float32, device=x.device)
        xs = x.index_select(0, tok)                                        # every expert's tokens, in one gather
        start = 0
        for i, c in enumerate(counts):
            if c:
                one = slice(i, i + 1)
                h = block.expert_hidden(xs[start:start + c], one)               # [1, c, D]
                norms[start:start + c] = block.expert_down(h, one)[0].float().norm(dim=-1)
                h = h[0]
                self.mid_sumsq[i] += (h * h).sum(0).double().cpu()
                start += c
        p, g, nd = probs[tok, e].double(), gates[tok, e].double(), norms.double()
        add = lambda v: torch.zeros(block.num_experts, dtype=torch.float64, device=x.device).index_add_(0, e, v)  # noqa: E731
        self.reap_sum += add(g * nd).cpu()
        self.paper_sum += add(p * nd).cpu()
        self.ean_sum += add(nd).cpu()
        cnt = torch.tensor(counts, dtype=torch.float64, device=x.device).clamp(min=1)
        self.ref_chunk_sum += (add(p * p * nd) / cnt).cpu()

    def _all_outputs(self, block: MoEBlock, x, idx: torch.Tensor, probs, gated, plain, on_block=None) -> None:
        """Add the sums over all tokens of p_i E_i and of E_i for the experts ``idx`` to ``gated`` and ``plain``
        [N, H], a few experts at a time (``on_block(experts, h)`` sees each block's hidden activations)."""
        step = self._block_experts(x.shape[0], x.element_size())
        for s in range(0, len(idx), step):
            h = self._outputs(block, x, idx[s:s + step], probs, gated, plain)
            if on_block is not None:
                on_block(idx[s:s + step].tolist(), h)

    def _block_experts(self, tokens: int, itemsize: int) -> int:
        """Experts per block of :meth:`_all_outputs`: their gate, up and hidden activations on ``tokens`` tokens
        ([n, T, D] each) within ``block_bytes``."""
        return max(1, int(self.options.block_bytes // max(1, 3 * tokens * self.inter * itemsize)))

    def _outputs(self, block: MoEBlock, x, idx: torch.Tensor, probs, gated, plain) -> torch.Tensor:
        h = block.expert_hidden(x, idx)                                    # [n, T, D]
        down_t = block.experts.down[idx].to(h.dtype).transpose(1, 2)       # [n, D, H]
        weights = torch.stack([probs[:, idx].T.to(h.dtype), torch.ones_like(h[:, :, 0])], dim=1)   # [n, 2, T]
        sums = torch.bmm(torch.bmm(weights, h), down_t).double().cpu()    # [n, 2, H]: sums of p E and of E
        idx = idx.cpu()
        gated[idx] += sums[:, 0]
        plain[idx] += sums[:, 1]
        return h

    @torch.no_grad()
    def ensure_outputs(self, experts, block: MoEBlock | None = None, inputs=None, pairs=None) -> None:
        """Make ``gated_out_sum`` and ``out_sum`` exact for ``experts`` (observed with ``outputs=False``): every
        one of them evaluated on every observed token again, ``inputs()`` replaying the observed batches' MoE
        inputs [T, H] in order. Experts done already are not done again.

        ``pairs`` (centroids, members): experts whose neurons an alignment may match, every centroid with every
        member. Their hidden activations at the sampled positions come out of the replay anyway, so their
        products are taken there (:meth:`neuron_distance`) instead of being computed again from the sampled
        inputs -- for those of them the replay evaluates, when the products and the centroids' samples of one
        batch fit ``pair_bytes`` (else none are)."""
        idx = torch.as_tensor(sorted({int(i) for i in experts}), dtype=torch.long)
        idx = idx[~self.has_outputs[idx]]
        if not idx.numel():
            return
        block = block or self._block
        if block is None or inputs is None:
            raise ValueError("the experts' output sums were not observed and the MoE inputs cannot be replayed "
                             "(observe with outputs=True)")
        products = self._products_to_take(pairs, set(idx.tolist()))
        if products is not None:          # the centroids first: their samples are kept through a batch
            first = set(products.centroids)
            idx = torch.as_tensor(products.centroids + [e for e in idx.tolist() if e not in first], dtype=torch.long)
        seen = 0
        gated, plain = torch.zeros_like(self.gated_out_sum), torch.zeros_like(self.out_sum)   # added when complete
        with heap_mode(FORWARD):                  # forward-pass work, even when a plan asks for it
            for b, x in enumerate(inputs()):
                x = x.to(block.router.dtype)
                probs = torch.softmax(block.router_logits(x).float(), dim=-1)
                if products is not None:
                    products.batch(self._positions(b))
                self._all_outputs(block, x, idx.to(x.device), probs, gated, plain,
                                  products.take if products is not None else None)
                seen += x.shape[0]
        if seen != self.tokens:
            raise RuntimeError(f"the replayed MoE inputs hold {seen} tokens, the observed ones {self.tokens}")
        self.gated_out_sum[idx] += gated[idx]
        self.out_sum[idx] += plain[idx]
        self.has_outputs[idx] = True
        if products is not None:
            products.batch(None)
            self.neuron_products.append(products)

    def _products_to_take(self, pairs, replayed: set[int]) -> "NeuronProducts | None":
        """The neuron products to take in a replay of ``replayed`` for ``pairs`` (centroids, members), or None:
        no pair of replayed experts, no samples, or more than ``pair_bytes``."""
        if not pairs:
            return None
        cs, ms = ([int(e) for e in dict.fromkeys(side) if int(e) in replayed] for side in pairs)
        per = max((b - a for a, b in zip(self._sample_at, self._sample_at[1:])), default=0)
        if not cs or not ms or not per or set(cs) & set(ms):
            return None
        step = self._block_experts(per, 4)
        need = (len(cs) * len(ms) * self.inter ** 2 * 4 + (len(cs) + len(ms)) * self.inter * 8
                + (len(cs) + step) * per * self.inter * 4)
        return NeuronProducts(cs, ms, self.inter) if need <= self.options.pair_bytes else None

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
        return self.x_samples[:self.sampled] if self.x_samples is not None else torch.empty(0, self.hidden)

    def neuron_activations(self, e: int, block: MoEBlock | None = None) -> torch.Tensor:
        """Expert ``e``'s hidden activations at the sampled positions, one row per neuron [D, S] (float32),
        computed from ``block`` (default: the block observed)."""
        block = block or self._block
        xs = self.sampled_inputs()
        if block is None or not xs.numel():
            return torch.empty(self.inter, 0)
        return block.neuron_activations(xs.to(block.router.dtype), e).float().cpu()

    def neuron_distance(self, c: int, j: int) -> torch.Tensor | None:
        """||u_a - v_b|| [D, D] (float32) between expert ``c``'s neurons a and expert ``j``'s neurons b, u and v
        their activation vectors over the sampled positions scaled to unit length (rows of
        :meth:`neuron_activations`, normalised): from the products a replay took (:meth:`ensure_outputs` with
        ``pairs``), ||u - v||^2 = |u|^2 + |v|^2 - 2 h_c.h_j / (|h_c| |h_j|). None when not taken."""
        for taken in self.neuron_products:
            d = taken.distance(c, j)
            if d is not None:
                return d
        return None

    def summary_tensors(self) -> dict[str, torch.Tensor]:
        """The per-expert statistics worth keeping on disk (not the logits' Gram matrix or the samples), each once;
        counts and squared-input sums under the names the quantizer's importance matrix reads; the output sums
        only when they were computed for every expert (``outputs=True``).
        The per-expert vectors stay float64, so a plan made from the saved file equals one made here."""
        renamed = {"freq": "expert_tokens", "in_sumsq": "expert_in_sumsq", "mid_sumsq": "expert_mid_sumsq"}
        keys = STAT_KEYS if bool(self.has_outputs.all()) else [k for k in STAT_KEYS if k not in OUTPUT_KEYS]
        return {renamed.get(k, k): getattr(self, k) if getattr(self, k).ndim == 1 else getattr(self, k).float()
                for k in keys}


class NeuronProducts:
    """Sums over the sampled positions of h_c h_j^T for every centroid c and member j ([C, M, D, D], float32, the
    precision of the feature products they replace) and of h_e^2 ([C + M, D]), taken from the hidden activations
    [n, T, D] an output-sum replay computes for a block of experts at a time. The centroids are evaluated first
    in each batch and their samples kept until the batch's members have come (:meth:`take`)."""

    def __init__(self, centroids: list[int], members: list[int], inter: int):
        self.centroids, self.members = centroids, members
        self.row = {e: i for i, e in enumerate(centroids + members)}
        self.gram = torch.zeros(len(centroids), len(members), inter, inter, dtype=torch.float32)
        self.sumsq = torch.zeros(len(self.row), inter, dtype=torch.float64)
        self.at: torch.Tensor | None = None
        self.kept: torch.Tensor | None = None              # [C, S_b, D]: the centroids' samples of this batch

    def batch(self, at: torch.Tensor | None) -> None:
        """A new batch begins; ``at``: its sampled positions (None: the replay is over)."""
        self.at, self.kept = at, None

    def take(self, experts: list[int], h: torch.Tensor) -> None:
        if self.at is None or not len(self.at):
            return
        for e, he in zip(experts, h[:, self.at.to(h.device)]):
            r = self.row.get(e)
            if r is None:
                continue
            self.sumsq[r] += (he * he).sum(0).double().cpu()
            if r < len(self.centroids):
                if self.kept is None:
                    self.kept = he.new_empty(len(self.centroids), *he.shape)
                self.kept[r] = he
            else:                                          # every centroid came before (ensure_outputs' order)
                self.gram[:, r - len(self.centroids)] += (self.kept.transpose(1, 2) @ he).float().cpu()

    def distance(self, c: int, j: int) -> torch.Tensor | None:
        """||u_a - v_b|| [D, D] for centroid ``c`` and member ``j`` (see :meth:`ExpertStats.neuron_distance`),
        or None when they are not a pair here."""
        rc, rj = self.row.get(c), self.row.get(j)
        if rc is None or rj is None or rc >= len(self.centroids) or rj < len(self.centroids):
            return None
        nc, nj = self.sumsq[rc].sqrt(), self.sumsq[rj].sqrt()
        dc, dj = nc.clamp_min(1e-12), nj.clamp_min(1e-12)     # a zero neuron's unit vector is zero, as normalised
        sq = ((nc / dc) ** 2)[:, None] + ((nj / dj) ** 2)[None] - 2 * self.gram[rc, rj - len(self.centroids)] \
            .double() / torch.outer(dc, dj)
        return sq.clamp_min_(0).sqrt_().float()


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
    ``compression/output_observations.safetensors``). Only routed tokens are evaluated (top-k of N experts):
    either here (:meth:`observe`) or, given to :meth:`add` expert by expert, by the layer's own forward."""

    def __init__(self, num_experts: int, hidden: int, inter: int):
        z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
        self.freq, self.in_sumsq, self.mid_sumsq = z(num_experts), z(num_experts, hidden), z(num_experts, inter)

    @torch.no_grad()
    def add(self, e: int, x: torch.Tensor, h: torch.Tensor) -> None:
        """Expert ``e``'s routed inputs ``x`` [c, H] and its hidden activations on them ``h`` [c, D]."""
        self.freq[e] += x.shape[0]
        self.in_sumsq[e] += (x * x).sum(0).double().cpu()
        self.mid_sumsq[e] += (h * h).sum(0).double().cpu()

    @torch.no_grad()
    def observe(self, block: MoEBlock, x: torch.Tensor) -> None:
        """The MoE input ``x`` [T, H] of one batch: route it with ``block``'s router, evaluate each expert on its
        tokens."""
        x = x.to(block.router.dtype)
        probs = torch.softmax(block.router_logits(x).float(), dim=-1)
        _, top = torch.topk(probs, block.routing.top_k, dim=-1)
        for i in range(probs.shape[1]):
            rows = (top == i).any(-1).nonzero().squeeze(1)
            if rows.numel():
                xi = x.index_select(0, rows)
                self.add(i, xi, block.expert_hidden(xi, slice(i, i + 1))[0])

    def summary_tensors(self) -> dict[str, torch.Tensor]:
        return {"expert_tokens": self.freq, "expert_in_sumsq": self.in_sumsq.float(),
                "expert_mid_sumsq": self.mid_sumsq.float()}
