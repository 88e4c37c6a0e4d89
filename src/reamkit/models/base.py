"""What every architecture adapter says about its family, and the logic they share.

An adapter knows, for one ``model_type``:

* where the router, the routed experts, the shared expert and its gate live in a decoder layer, in both
  on-disk layouts: per-expert ``experts.N.{gate,up,down}_proj.weight`` and fused/stacked
  ``experts.gate_up_proj`` [E, 2D, H] + ``experts.down_proj`` [E, H, D] (transformers 5's module layout);
* how routing works (softmax over all experts, top-k, optional renormalisation);
* how the config changes when the expert count changes;
* how to build one decoder layer as a transformers module from that layer's tensors, and the position and
  mask inputs it needs, so a model can be run one layer at a time.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

import torch
from torch import nn

from ..errors import CheckpointError
from .facts import FamilyFacts

if TYPE_CHECKING:
    from ..checkpoint import Checkpoint

ExpertLayout = Literal["per_expert", "fused"]


@dataclass(frozen=True)
class Routing:
    """softmax over all N router logits -> top-k -> (renormalise the k weights to sum to 1)."""

    num_experts: int
    top_k: int
    renormalize: bool

    def weights(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(top_k_weights, top_k_indices)`` for logits [..., N], computed in float32."""
        probs = torch.softmax(router_logits.float(), dim=-1)
        w, idx = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            w = w / w.sum(dim=-1, keepdim=True)
        return w, idx


@dataclass
class Experts:
    """Routed expert weights of one layer, stacked: gate/up [E, D, H], down [E, H, D] (or lists of E
    tensors [D, H] / [H, D], when copying them into one stack is not worth the memory)."""

    gate: torch.Tensor | list[torch.Tensor]
    up: torch.Tensor | list[torch.Tensor]
    down: torch.Tensor | list[torch.Tensor]

    @property
    def num_experts(self) -> int:
        return len(self.gate)


def _experts_implementation() -> str:
    """The experts kernel transformers picks for a whole model on this machine (grouped_mm where torch has
    it, else the eager per-expert loop), so a layer built alone computes bit-identically to the full model."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    return "grouped_mm" if "grouped_mm" in ALL_EXPERTS_FUNCTIONS else "eager"


class Adapter(FamilyFacts):
    """Base adapter; subclasses fill in the class attributes (one small file per family). Its GGUF and memory
    facts (:class:`.facts.FamilyFacts`) default to a plain transformer MoE."""

    model_type: ClassVar[str]
    architecture: ClassVar[str]               # transformers class name in config["architectures"]
    hf_module: ClassVar[str]                  # transformers.models.<x>.modeling_<x>
    hf_prefix: ClassVar[str]                  # class-name prefix, e.g. "Qwen3Next"
    num_experts_keys: ClassVar[tuple[str, ...]] = ("num_experts",)   # first one present wins
    top_k_key: ClassVar[str] = "num_experts_per_tok"
    norm_topk_key: ClassVar[str | None] = "norm_topk_prob"   # None: always renormalised
    moe: ClassVar[str] = "mlp"                # module path of the MoE block in transformers 5
    per_expert_moe: ClassVar[str] = "mlp"     # its name in per-expert checkpoints (every Hub checkpoint)
    proj: ClassVar[tuple[str, str, str]] = ("gate_proj", "up_proj", "down_proj")  # per-expert names
    shared_expert: ClassVar[str | None] = None        # e.g. "shared_expert" (never compressed)
    shared_expert_gate: ClassVar[str | None] = None   # e.g. "shared_expert_gate"
    gguf_reads_fused: ClassVar[bool] = True           # does llama.cpp's converter accept fused experts?

    # ------------------------------------------------------------------ config
    def num_experts_key(self, config: dict) -> str:
        for key in self.num_experts_keys:
            if key in config:
                return key
        raise CheckpointError(f"config.json has none of {', '.join(self.num_experts_keys)} (the expert count)")

    def num_experts(self, config: dict) -> int:
        return int(config[self.num_experts_key(config)])

    def routing(self, config: dict) -> Routing:
        renorm = True if self.norm_topk_key is None else bool(config.get(self.norm_topk_key, False))
        return Routing(self.num_experts(config), int(config[self.top_k_key]), renorm)

    def with_num_experts(self, config: dict, n: int) -> dict:
        """The config of the same model with ``n`` routed experts per layer (top-k unchanged)."""
        top_k = int(config[self.top_k_key])
        if n < top_k:
            raise CheckpointError(f"cannot keep {n} experts: fewer than top-k = {top_k}")
        out = dict(config)
        out[self.num_experts_key(config)] = int(n)
        return out

    def moe_layers(self, config: dict) -> list[int]:
        """Indices of the decoder layers whose MLP is a sparse MoE block."""
        step = int(config.get("decoder_sparse_step", 1) or 1)
        dense = set(config.get("mlp_only_layers", []) or [])
        return [i for i in range(int(config["num_hidden_layers"]))
                if i not in dense and (i + 1) % step == 0 and self.num_experts(config) > 0]

    def moe_groups(self, ckpt: "Checkpoint") -> list[str]:
        """Name prefixes of every MoE block to compress: the MoE decoder layers, then any extra blocks
        (e.g. Qwen3-Next's MTP layer). Each prefix's tensors, loaded with ``ckpt.load_group``, use the
        same relative names as a decoder layer's."""
        from ..checkpoint.reader import layer_prefix

        return [layer_prefix(i) for i in self.moe_layers(ckpt.config)]

    def layer_type(self, config: dict, index: int) -> str:
        types = config.get("layer_types")
        return types[index] if types else "full_attention"

    # ------------------------------------------------------------------ tensor names
    def router_key(self, layout: ExpertLayout) -> str:
        return f"{self._moe_for(layout)}.gate.weight"

    def _moe_for(self, layout: ExpertLayout) -> str:
        return self.per_expert_moe if layout == "per_expert" else self.moe

    def expert_layout(self, names) -> ExpertLayout:
        """Which on-disk expert layout a layer's relative tensor names use."""
        names = list(names)
        if any(n.startswith(f"{self.moe}.experts.gate_up_proj") for n in names):
            return "fused"
        if any(re.match(rf"^{re.escape(self.per_expert_moe)}\.experts\.\d+\.", n) for n in names):
            return "per_expert"
        raise CheckpointError(f"no routed expert tensors found under {self.per_expert_moe}.experts / {self.moe}.experts")

    def is_expert_key(self, name: str) -> bool:
        return bool(re.match(rf"^({re.escape(self.per_expert_moe)}|{re.escape(self.moe)})\.experts\.", name))

    # ------------------------------------------------------------------ expert access
    def experts(self, tensors: dict[str, torch.Tensor], stack: bool = True) -> Experts:
        """A layer's routed experts whatever the on-disk layout: stacked tensors, or with ``stack=False``
        lists of each expert's own tensors (no copy)."""
        layout = self.expert_layout(tensors)
        if layout == "fused":
            gate_up = tensors[f"{self.moe}.experts.gate_up_proj"]
            d = gate_up.shape[1] // 2
            ex = Experts(gate_up[:, :d], gate_up[:, d:], tensors[f"{self.moe}.experts.down_proj"])
            return ex if stack else Experts(list(ex.gate), list(ex.up), list(ex.down))
        g, u, dn = self.proj
        pre = f"{self.per_expert_moe}.experts"
        n = self._count_per_expert(tensors)
        lists = [[tensors[f"{pre}.{e}.{p}.weight"] for e in range(n)] for p in (g, u, dn)]
        return Experts(*(torch.stack(t) for t in lists)) if stack else Experts(*lists)

    def expert_tensors(self, experts: Experts, layout: ExpertLayout) -> dict[str, torch.Tensor]:
        """Relative tensor names for stacked experts in the given on-disk layout."""
        if layout == "fused":
            st = lambda t: t if isinstance(t, torch.Tensor) else torch.stack(t)  # noqa: E731
            return {
                f"{self.moe}.experts.gate_up_proj": torch.cat([st(experts.gate), st(experts.up)], dim=1),
                f"{self.moe}.experts.down_proj": st(experts.down),
            }
        g, u, dn = self.proj
        pre = f"{self.per_expert_moe}.experts"
        out: dict[str, torch.Tensor] = {}
        for e in range(experts.num_experts):
            out[f"{pre}.{e}.{g}.weight"] = experts.gate[e]
            out[f"{pre}.{e}.{u}.weight"] = experts.up[e]
            out[f"{pre}.{e}.{dn}.weight"] = experts.down[e]
        return out

    def replace_experts(self, tensors: dict[str, torch.Tensor], experts: Experts, router: torch.Tensor,
                        layout: ExpertLayout | None = None) -> dict[str, torch.Tensor]:
        """A layer's tensors with new routed experts and router; everything else (shared expert,
        attention, norms) is passed through untouched. ``layout`` defaults to the input's."""
        src_layout = self.expert_layout(tensors)
        layout = layout or src_layout
        rkey = self.router_key(src_layout)
        out = {k: v for k, v in tensors.items() if not self.is_expert_key(k) and k != rkey}
        out[self.router_key(layout)] = router
        out.update(self.expert_tensors(experts, layout))
        if layout != src_layout:
            out = {self._rename_moe(k, layout): v for k, v in out.items()}
        return out

    def convert_layout(self, tensors: dict[str, torch.Tensor], layout: ExpertLayout) -> dict[str, torch.Tensor]:
        """Re-express a layer's tensors in the other expert layout (values unchanged)."""
        src = self.expert_layout(tensors)
        if src == layout:
            return dict(tensors)
        return self.replace_experts(tensors, self.experts(tensors), tensors[self.router_key(src)], layout)

    def _rename_moe(self, key: str, layout: ExpertLayout) -> str:
        src, dst = (self.moe, self.per_expert_moe) if layout == "per_expert" else (self.per_expert_moe, self.moe)
        return dst + key[len(src):] if key.startswith(src + ".") else key

    def _count_per_expert(self, tensors) -> int:
        pat = re.compile(rf"^{re.escape(self.per_expert_moe)}\.experts\.(\d+)\.")
        ids = {int(m.group(1)) for k in tensors if (m := pat.match(k))}
        if ids != set(range(len(ids))):
            raise CheckpointError(f"expert indices are not contiguous: {sorted(ids)[:8]}...")
        return len(ids)

    # ------------------------------------------------------------------ checks
    def stored_experts(self, infos) -> int:
        """How many routed experts a layer's tensors (or header infos) hold, in either layout."""
        if self.expert_layout(infos) == "fused":
            return infos[f"{self.moe}.experts.gate_up_proj"].shape[0]
        return self._count_per_expert(infos)

    def check(self, ckpt: "Checkpoint") -> None:
        """Raise a one-line CheckpointError if the weights disagree with the config."""
        cfg = ckpt.config
        n_layers = int(cfg["num_hidden_layers"])
        found = sorted(ckpt.layer_names)
        if not found:
            raise CheckpointError(f"{ckpt.path} holds no decoder layers (model.layers.N.*)")
        if found != list(range(n_layers)):
            raise CheckpointError(f"config.json says num_hidden_layers={n_layers} but the weights hold layers "
                                  f"{found[0]}..{found[-1]} ({len(found)} in all)")
        n = self.num_experts(cfg)
        for i in self.moe_layers(cfg):
            infos = ckpt.layer_infos(i)
            rkey = self.router_key(self.expert_layout(infos))
            if rkey not in infos:
                raise CheckpointError(f"layer {i} has no router tensor {rkey}")
            router_n = infos[rkey].shape[0]
            stored = self.stored_experts(infos)
            if stored != n or router_n != n:
                raise CheckpointError(
                    f"config.json says {self.num_experts_key(cfg)}={n} but layer {i} holds {stored} experts "
                    f"and a router for {router_n}")

    def gguf_converter_args(self, ckpt: "Checkpoint") -> list[str]:
        """Extra flags llama.cpp's ``convert_hf_to_gguf.py`` needs for this checkpoint, or a one-line error
        for a layout the pinned converter cannot read."""
        moe = self.moe_layers(ckpt.config)
        if not self.gguf_reads_fused and moe and self.expert_layout(ckpt.layer_infos(moe[0])) == "fused":
            raise CheckpointError(
                f"llama.cpp's converter reads {self.model_type} experts only per expert "
                f"({self.per_expert_moe}.experts.N.{self.proj[0]}.weight ...), and {ckpt.path} stores them fused",
                fix="write the checkpoint with the per-expert layout (CheckpointWriter + Adapter.convert_layout)")
        return []

    # ------------------------------------------------------------------ modules
    def hf_class(self, suffix: str):
        module = importlib.import_module(self.hf_module)
        return getattr(module, self.hf_prefix + suffix)

    def hf_config(self, config: dict):
        """A transformers config object for ``config``, with the attention and experts kernels a whole
        model would get (sdpa; grouped_mm where available)."""
        cls = self.hf_class("Config")
        cfg = cls(**{k: v for k, v in config.items() if k not in ("architectures", "transformers_version")})
        cfg._attn_implementation = "sdpa"
        cfg._experts_implementation = _experts_implementation()
        return cfg

    def module_state(self, tensors: dict[str, torch.Tensor], dtype: torch.dtype | None = None,
                     expert_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """On-disk layer tensors -> the state dict of transformers 5's decoder layer module, cast to ``dtype``
        (experts to ``expert_dtype``). Per-expert weights are copied straight into the fused tensors, with no
        intermediate stacked copy."""
        cast = lambda t, dt: t if dt is None else t.to(dt)  # noqa: E731
        if not any(self.is_expert_key(k) for k in tensors):
            return {k: cast(v, dtype) for k, v in tensors.items()}
        layout = self.expert_layout(tensors)
        out = {self._rename_moe(k, "fused") if layout == "per_expert" else k: cast(v, dtype)
               for k, v in tensors.items() if not self.is_expert_key(k)}
        gu, dn = f"{self.moe}.experts.gate_up_proj", f"{self.moe}.experts.down_proj"
        if layout == "fused":
            out[gu], out[dn] = cast(tensors[gu], expert_dtype), cast(tensors[dn], expert_dtype)
            return out
        g, u, d = self.proj
        pre = f"{self.per_expert_moe}.experts"
        n = self._count_per_expert(tensors)
        first = tensors[f"{pre}.0.{g}.weight"]
        dt = expert_dtype or first.dtype
        inter, hidden = first.shape
        gate_up = torch.empty(n, 2 * inter, hidden, dtype=dt, device=first.device)
        down = torch.empty(n, hidden, inter, dtype=dt, device=first.device)
        for e in range(n):
            gate_up[e, :inter].copy_(tensors[f"{pre}.{e}.{g}.weight"])
            gate_up[e, inter:].copy_(tensors[f"{pre}.{e}.{u}.weight"])
            down[e].copy_(tensors[f"{pre}.{e}.{d}.weight"])
        out[gu], out[dn] = gate_up, down
        return out

    def build_layer(self, hf_config, index: int, tensors: dict[str, torch.Tensor],
                    dtype: torch.dtype | None = None) -> nn.Module:
        """Build decoder layer ``index`` from its own tensors; no other layer is touched.

        Routed experts stored in a narrower float type than ``dtype`` (a bf16 checkpoint computed in float32)
        stay in it, and the layer widens one expert at a time as it computes (:mod:`.upcast`): the same
        results, without a float32 copy of every expert."""
        expert_dtype = dtype
        stored = next((v.dtype for k, v in tensors.items() if self.is_expert_key(k)), None)
        if (dtype is not None and stored is not None and stored.is_floating_point
                and torch.finfo(stored).bits < torch.finfo(dtype).bits):
            from .upcast import upcast_config

            expert_dtype, hf_config = stored, upcast_config(hf_config)
        with torch.device("meta"):
            layer = self.hf_class("DecoderLayer")(hf_config, index)
        state = self.module_state(tensors, dtype, expert_dtype)
        missing, unexpected = layer.load_state_dict(state, strict=False, assign=True)
        missing = [m for m in missing if not m.endswith("inv_freq")]
        if missing or unexpected:
            raise CheckpointError(f"layer {index} tensors do not fit the {self.architecture} layer: "
                                  f"missing {missing[:3]}, unexpected {unexpected[:3]}")
        return layer.eval()

    def layer_tensors(self, layer: nn.Module, layout: ExpertLayout) -> dict[str, torch.Tensor]:
        """A layer module's weights back as on-disk tensors in ``layout``."""
        state = {k: v.detach() for k, v in layer.state_dict().items()}
        if not any(self.is_expert_key(k) for k in state):
            return state
        return self.convert_layout(state, layout)

    def layer_masks(self, hf_config, embeds: torch.Tensor, position_ids: torch.Tensor,
                    attention_mask: torch.Tensor | None) -> dict[str, object]:
        """Attention masks keyed by layer type, exactly as the family's model forward builds them."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        window = getattr(hf_config, "sliding_window", None)      # None or 0: no window
        fn = create_sliding_window_causal_mask if window else create_causal_mask
        mask = fn(config=hf_config, inputs_embeds=embeds, attention_mask=attention_mask,
                  past_key_values=None, position_ids=position_ids)
        return {"full_attention": mask}

    def norm_class(self):
        return self.hf_class("RMSNorm")

    def rotary_class(self):
        return self.hf_class("RotaryEmbedding")
