"""The tensors of a model's GGUF, from its ``config.json`` alone or read from a GGUF file.

From a config, the family's adapter lists what the pinned converter writes (names and shapes in ggml order, row
length first; see :mod:`reamkit.models.facts`), so sizes can be predicted before any weights exist -- for
instance for a target expert count. Tensors the converter keeps in F32 (norms, routers, 1-D tensors and what
the family names, such as ``ssm_conv1d``) are F32; the rest are the reference type (F16/BF16).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import ReamkitError
from ..llamacpp.gguf_file import open_gguf, read_field
from .rules import ModelFacts, Tensor

_F32_FRAGMENTS = ("_norm.weight", "ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight")


@dataclass(frozen=True)
class Inventory:
    arch: str                 # GGUF architecture name
    tensors: tuple[Tensor, ...]
    facts: ModelFacts
    header_bytes: int = 0     # a GGUF's header incl. padding (where its tensor data starts); 0 from a config

    @property
    def n_elements(self) -> int:
        return sum(t.n_elements for t in self.tensors)


def experts_in(config: dict) -> int:
    from ..models import ADAPTERS

    cls = ADAPTERS.get(str(config.get("model_type")))
    keys = cls.num_experts_keys if cls else ("num_experts", "num_local_experts")
    return int(next((config[k] for k in keys if config.get(k)), 0))


def inventory_from_config(config: dict, *, experts: int | None = None, ref_type: str = "F16") -> Inventory:
    """The converter's tensors for ``config`` (optionally with the expert count set to ``experts``), as the
    family's adapter lists them (:class:`reamkit.models.facts.FamilyFacts`)."""
    from ..models import ADAPTERS

    model_type = config.get("model_type")
    cls = ADAPTERS.get(str(model_type))
    if cls is None or not cls.gguf_arch:
        raise ReamkitError(f"cannot predict GGUF sizes for model_type={model_type!r}; "
                           f"supported: {', '.join(sorted(m for m, a in ADAPTERS.items() if a.gguf_arch))}")
    family = cls()
    c = dict(config)
    n_exp = experts if experts is not None else experts_in(c)
    if n_exp < 1:
        raise ReamkitError(f"the expert count must be at least 1, not {n_exp}")
    f32 = _F32_FRAGMENTS + family.gguf_f32
    tensors = tuple(Tensor(n, s, _converter_type(n, s, ref_type, f32)) for n, s in family.gguf_tensors(c, n_exp))
    n_head = int(c["num_attention_heads"])
    facts = ModelFacts(n_layer=int(c["num_hidden_layers"]), n_expert=n_exp, n_head=n_head,
                       n_head_kv=int(c.get("num_key_value_heads") or n_head))
    return Inventory(arch=family.gguf_arch, tensors=tensors, facts=facts)


def _converter_type(name: str, shape: tuple[int, ...], ref_type: str, f32: tuple[str, ...] = _F32_FRAGMENTS) -> str:
    if len(shape) <= 1 or shape[-1] == 1 and len(shape) == 2 or not name.endswith(".weight"):
        return "F32"
    return "F32" if any(f in name for f in f32) else ref_type


def inventory_from_gguf(path: Path) -> Inventory:
    """The tensors and hyperparameters of a GGUF file (header only; the data is not read)."""
    reader = open_gguf(path)
    arch = read_field(reader, "general.architecture")
    n_layer = int(read_field(reader, f"{arch}.block_count"))
    n_head = int(read_field(reader, f"{arch}.attention.head_count"))
    n_kv = int(read_field(reader, f"{arch}.attention.head_count_kv", n_head))
    n_exp = int(read_field(reader, f"{arch}.expert_count", 0))
    tensors = tuple(Tensor(t.name, tuple(int(d) for d in t.shape), t.tensor_type.name) for t in reader.tensors)
    return Inventory(arch=arch, tensors=tensors, header_bytes=int(reader.data_offset),
                     facts=ModelFacts(n_layer=n_layer, n_expert=n_exp, n_head=n_head, n_head_kv=n_kv))
