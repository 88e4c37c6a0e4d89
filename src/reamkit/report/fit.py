"""``reamkit fit``: the best-fidelity variant whose weights + KV cache + recurrent state + runtime overhead fit
in a machine's memory, with the arithmetic printed.

The family's adapter states which layers hold what (:mod:`reamkit.models.facts`), from a config or a GGUF's
metadata:

* **KV cache**: only attention layers hold one (for ``qwen3_next`` the full-attention layers, 12 of 48):
  ``KV = n_full_layers x n_kv_heads x (k_dim + v_dim) x context x bytes per element``.
* **Recurrent state** (linear-attention layers, fixed size, F32 as llama.cpp keeps it): per layer a conv state
  of ``(conv_kernel - 1) x conv_dim`` and an SSM state of ``ssm_state`` elements, per sequence: one per parallel
  slot (``-np``, 4 by default as ``reamkit serve``), while the KV cache of the whole context is shared by the
  slots (``--kv-unified``).
* **Overhead**: :data:`FIXED_OVERHEAD` (process, context, graph) + the compute buffer of one 512-token
  micro-batch (logits ``512 x n_vocab`` F32 + activations ``512 x n_embd x`` :data:`ACTIVATION_FLOATS` F32).

With ``--gpu-memory``, everything goes on the GPU when it fits there; otherwise the always-active weights, KV
cache, state and compute buffer go on the GPU and the routed experts of as many layers as needed stay in system
RAM (llama.cpp's ``--n-cpu-moe N``). "Best fidelity" = lowest measured mean KLD (``reamkit compare``); variants
without a KLD rank after those with one, by bits/weight (highest first) -- which is all there is for a built-in
family, whose sizes come from :mod:`.families`. Memory sizes are GB = 1e9 bytes (GiB = 2^30 when written so).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..defaults import CACHE_TYPE, CONTEXT, PARALLEL
from ..errors import ReamkitError
from ..models.facts import Memory as Arch
from ..quantization.rules import GGML_BLOCKS

FIXED_OVERHEAD = 250_000_000
UBATCH = 512
ACTIVATION_FLOATS = 16
_UNITS = {"": 1e9, "g": 1e9, "gb": 1e9, "gib": 2**30, "m": 1e6, "mb": 1e6, "mib": 2**20, "t": 1e12, "tb": 1e12,
          "tib": 2**40}


def parse_memory(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS or float(m.group(1)) <= 0:
        raise ReamkitError(f"cannot read the memory size {text!r}; write e.g. 24GB, 24GiB or 512MB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_context(text: str | int) -> int:
    m = re.fullmatch(r"\s*([0-9]+)\s*([kKmM]?)\s*", str(text))
    if not m or int(m.group(1)) < 1:
        raise ReamkitError(f"cannot read the context {text!r}; write e.g. 32k or 32768")
    return int(m.group(1)) * {"": 1, "k": 1024, "m": 1024**2}[m.group(2).lower()]


def cache_bytes_per_element(cache_type: str) -> float:
    t = cache_type.upper()
    if t not in GGML_BLOCKS or t in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS"):
        raise ReamkitError(f"unknown KV cache type {cache_type!r}; choose f16, bf16, f32, q8_0, q5_1, q5_0, q4_1, q4_0")
    n, b = GGML_BLOCKS[t]
    return b / n


def arch_from_config(c: dict) -> Arch:
    """The memory model of a config, as its family states it (another architecture: every layer attention)."""
    from ..models import ADAPTERS, Adapter

    return ADAPTERS.get(str(c.get("model_type")), Adapter)().memory(c)


def arch_from_gguf(reader) -> Arch:
    """The memory model of a GGUF, from its metadata, as the family its architecture names states it."""
    from ..models import gguf_family
    from ..llamacpp.gguf_file import read_field

    a = read_field(reader, "general.architecture")
    vocab = next((int(t.shape[-1]) for t in reader.tensors if t.name == "token_embd.weight"), 0)
    return gguf_family(a).memory_from_gguf(lambda key, default=None: read_field(reader, f"{a}.{key}", default), vocab)


def kv_cache_bytes(arch: Arch, context: int, bytes_per_element: float = 2.0) -> int:
    return int(arch.n_full_attn * arch.n_kv_heads * (arch.k_dim + arch.v_dim) * context * bytes_per_element)


def recurrent_state_bytes(arch: Arch, parallel: int = 1) -> int:
    return arch.n_linear * ((arch.conv_kernel - 1) * arch.conv_dim + arch.ssm_state) * 4 * parallel


def overhead_bytes(arch: Arch) -> int:
    return FIXED_OVERHEAD + UBATCH * (arch.n_vocab + ACTIVATION_FLOATS * arch.n_embd) * 4


@dataclass
class Candidate:
    name: str                  # variant (run folder) or type (built-in family)
    type: str
    weights: int               # bytes
    experts: int               # bytes of routed-expert tensors (can stay in RAM)
    bpw: float | None
    kld: float | None
    arch: Arch
    file: str | None = None


@dataclass
class Need:
    candidate: Candidate
    kv: int
    state: int
    overhead: int
    total: int
    fits: bool
    placement: str             # "CPU", "GPU", "GPU + N layers' experts in RAM" or why not
    n_cpu_moe: int | None = None


@dataclass
class FitResult:
    target: str
    memory: int
    gpu_memory: int | None
    context: int
    cache_type: str
    parallel: int = PARALLEL
    needs: list[Need] = field(default_factory=list)       # best fidelity first
    choice: Need | None = None


def rank_key(c: Candidate):
    return (c.kld is None, c.kld if c.kld is not None else 0.0, -(c.bpw or 0.0))


def place(c: Candidate, kv: int, state: int, over: int, memory: int, gpu: int | None) -> tuple[bool, str, int | None]:
    total = c.weights + kv + state + over
    if gpu is None:
        return total <= memory, "CPU (system RAM)", None
    if total <= gpu and FIXED_OVERHEAD <= memory:
        return True, "all on the GPU", 0
    gpu_base = c.weights - c.experts + kv + state + over
    if c.experts and gpu_base <= gpu:
        per_layer = c.experts / c.arch.n_layers
        on_gpu = min(c.arch.n_layers, int((gpu - gpu_base) // per_layer))
        n_cpu = c.arch.n_layers - on_gpu
        if n_cpu * per_layer + FIXED_OVERHEAD <= memory:
            return True, f"GPU, routed experts of {n_cpu} layers in RAM", n_cpu
    if total <= memory:
        return True, "CPU (system RAM; too large for the GPU)", None
    return False, "does not fit", None


def fit(target: str | Path, memory: str | int, *, context: str | int = CONTEXT,
        gpu_memory: str | int | None = None, cache_type: str = CACHE_TYPE, parallel: int = PARALLEL) -> FitResult:
    """Pick the best-fidelity variant of a run folder or built-in family that fits; refuses when none does."""
    mem = memory if isinstance(memory, int) else parse_memory(memory)
    gpu = None if gpu_memory is None else gpu_memory if isinstance(gpu_memory, int) else parse_memory(gpu_memory)
    ctx = parse_context(context)
    per_elem = cache_bytes_per_element(cache_type)
    if parallel < 1:
        raise ReamkitError(f"--parallel {parallel} must be at least 1")
    cands = candidates(target)
    res = FitResult(target=str(target), memory=mem, gpu_memory=gpu, context=ctx, cache_type=cache_type,
                    parallel=parallel)
    for c in sorted(cands, key=rank_key):
        kv, st, ov = kv_cache_bytes(c.arch, ctx, per_elem), recurrent_state_bytes(c.arch, parallel), overhead_bytes(c.arch)
        ok, where, n_cpu = place(c, kv, st, ov, mem, gpu)
        res.needs.append(Need(c, kv, st, ov, c.weights + kv + st + ov, ok, where, n_cpu))
    res.choice = next((n for n in res.needs if n.fits), None)
    if res.choice is None:
        small = min(res.needs, key=lambda n: n.total)
        pool = f"{mem / 1e9:g} GB of RAM" + (f" + {gpu / 1e9:g} GB of GPU memory" if gpu else "")
        raise ReamkitError(f"nothing fits in {pool}: the smallest variant, {small.candidate.type}, needs "
                           f"{small.total / 1e9:.1f} GB at a {ctx}-token context", fix="more memory or a shorter --context")
    return res


def candidates(target: str | Path) -> list[Candidate]:
    from .families import find_family

    path = Path(target)
    if path.is_dir():
        return run_candidates(path)
    fam = find_family(str(target))
    if fam is None:
        from .families import FAMILIES

        raise ReamkitError(f"{target} is neither a run folder nor a built-in model "
                           f"(built-in: {', '.join(f.name for f in FAMILIES)})")
    return family_candidates(fam)


def family_candidates(fam) -> list[Candidate]:
    from ..quantization.inventory import inventory_from_config
    from ..quantization.rules import choose_types, tensor_bytes

    from ..models import get_adapter

    inv = inventory_from_config(fam.config)
    arch = arch_from_config(fam.config)
    routed = get_adapter(fam.config).gguf_routed
    out = []
    for t, (gb, _source) in fam.sizes_gb.items():
        types = choose_types(inv.tensors, t, inv.facts)
        by = {x.name: tensor_bytes(types[x.name], x.shape) for x in inv.tensors}
        share = sum(b for n, b in by.items() if routed(n)) / sum(by.values())
        weights = int(gb * 1e9)
        out.append(Candidate(t, t, weights, int(weights * share), weights * 8 / inv.n_elements, None, arch))
    return out


def run_candidates(run_dir: Path) -> list[Candidate]:
    from ..models import gguf_family
    from ..llamacpp.gguf_file import open_gguf, read_field
    from .compare import comparison_rows

    out = []
    for r in comparison_rows(run_dir).rows:
        p = Path(run_dir) / r["path"] if r.get("path") else None
        if p is None or not p.is_file():
            continue
        reader = open_gguf(p)
        routed = gguf_family(read_field(reader, "general.architecture")).gguf_routed
        experts = sum(int(t.n_bytes) for t in reader.tensors if routed(t.name))
        out.append(Candidate(r["variant"], r["type"], p.stat().st_size, experts, r.get("bpw"), r.get("kld_mean"),
                             arch_from_gguf(reader), file=str(p)))
    if not out:
        raise ReamkitError(f"none of the GGUF files of {run_dir} is where its results say",
                           fix="keep the GGUFs beside the run folder or name them in variants.json")
    return out


def fit_lines(res: FitResult) -> list[str]:
    """The arithmetic, one line per variant (best fidelity first), then the choice."""
    gb = lambda b: f"{b / 1e9:.2f}"   # noqa: E731
    a = res.needs[0].candidate.arch
    lines = [f"memory: {gb(res.memory)} GB RAM" + (f" + {gb(res.gpu_memory)} GB GPU" if res.gpu_memory else "")
             + f"; context {res.context} tokens, KV cache {res.cache_type}",
             f"KV cache = {a.n_full_attn} attention layers x {a.n_kv_heads} KV heads x ({a.k_dim} + {a.v_dim}) x "
             f"{res.context} tokens x {cache_bytes_per_element(res.cache_type):g} B = {gb(res.needs[0].kv)} GB; "
             f"recurrent state ({a.n_linear} layers x {res.parallel} slots) {gb(res.needs[0].state)} GB; overhead {gb(res.needs[0].overhead)} GB",
             "variant (best fidelity first): weights + KV + state + overhead = total -> placement"]
    for n in res.needs:
        c = n.candidate
        fid = f"KLD {c.kld:.4g}" if c.kld is not None else f"{c.bpw:.2f} bpw" if c.bpw else "?"
        mark = "*" if n is res.choice else " "
        lines.append(f"{mark} {c.name} ({fid}): {gb(c.weights)} + {gb(n.kv)} + {gb(n.state)} + {gb(n.overhead)} = "
                     f"{gb(n.total)} GB -> {n.placement}")
    ch = res.choice
    f = ch.candidate.file or f"<model>.{ch.candidate.type}.gguf"
    extra = f" -ngl 99 --n-cpu-moe {ch.n_cpu_moe}" if ch.n_cpu_moe else " -ngl 99" if ch.n_cpu_moe == 0 else ""
    lines.append(f"pick: {ch.candidate.name} ({ch.placement}); run: llama-server -m {f} -c {res.context} -np {res.parallel} --kv-unified{extra}")
    return lines
