"""The importance matrix: computed with the pinned ``llama-imatrix``, or built from a compression pass.

An imatrix GGUF holds, per weight ``W``, ``W.in_sum2`` ``[n_mat, ne0]`` (sum over the tokens that reached it
of each input channel squared; ``n_mat`` is the expert count for stacked expert tensors, else 1) and
``W.counts`` ``[n_mat, 1]`` (those token counts), plus ``imatrix.datasets`` / ``chunk_count`` / ``chunk_size``.
The counts of the expert tensors say which experts saw data: that is the coverage we report, since llama.cpp
quantizes an expert that saw nothing with uniform importance.

Calibration text comes from the same mixture spec as compression (default
:data:`reamkit.defaults.CALIB_MIX`, REAM's released mix); the built-in corpora contribute only their calibration part, never the held-out evaluation text.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..defaults import CALIB_MIX
from ..errors import ReamkitError
from ..identity import file_hash
from ..llamacpp.gguf_file import open_gguf
from .inventory import Inventory

_EXPERT_INPUTS = {"ffn_gate_exps": "expert_in_sumsq", "ffn_up_exps": "expert_in_sumsq",
                  "ffn_down_exps": "expert_mid_sumsq"}


@dataclass
class ImatrixInfo:
    path: Path
    sha256: str
    source: str                                  # "llama-imatrix", "compression observations" or "file"
    datasets: list[str] = field(default_factory=list)
    chunks: int = 0
    coverage: dict[int, float] = field(default_factory=dict)   # block -> share of experts that saw data

    @property
    def min_coverage(self) -> float:
        return min(self.coverage.values(), default=1.0)


def calibration_text(n_bytes: int, spec: str | None = None, *, seed: int = 0) -> str:
    """About ``n_bytes`` of calibration text from the mixture ``spec`` (as compression takes it; default
    :data:`~reamkit.defaults.CALIB_MIX`), the sources interleaved in proportion so any prefix keeps the mix. Built-in corpora
    contribute their calibration part only."""
    from ..calibration.mixture import documents, parse_mix

    sources = parse_mix(spec or CALIB_MIX)
    streams = [documents(s.name, seed) for s in sources]
    done = [0] * len(sources)
    live = set(range(len(sources)))
    parts: list[str] = []
    while live and sum(done) < n_bytes:
        i = min(live, key=lambda j: done[j] / sources[j].weight)     # the source furthest below its share
        doc = next(streams[i], None)
        if doc is None:
            live.discard(i)
            continue
        parts.append(doc)
        done[i] += len(doc)
    return "\n\n".join(parts)


def check_calibration(spec: str | None) -> None:
    """Fail before any work on a mixture that cannot be read."""
    from ..calibration.mixture import check_source, parse_mix

    for s in parse_mix(spec or CALIB_MIX):
        check_source(s.name)


def read_imatrix(path: Path) -> tuple[dict[str, tuple[int, np.ndarray]], list[str], int]:
    """``({weight: (n_values, counts)}, datasets, chunk_count)`` of an imatrix GGUF, or a one-line error."""
    reader = open_gguf(path)
    kind = reader.fields.get("general.type")
    if kind is None or kind.contents() != "imatrix":
        raise ReamkitError(f"{path} is a GGUF but not an importance matrix (general.type is not 'imatrix')")
    sums, counts = {}, {}
    for t in reader.tensors:
        if t.name.endswith(".in_sum2"):
            sums[t.name[: -len(".in_sum2")]] = int(t.n_elements)
        elif t.name.endswith(".counts"):
            counts[t.name[: -len(".counts")]] = np.asarray(t.data, dtype=np.float64).ravel()
    entries = {name: (n, counts.get(name, np.zeros(0))) for name, n in sums.items()}
    ds = reader.fields.get("imatrix.datasets")
    chunks = reader.fields.get("imatrix.chunk_count")
    return entries, list(ds.contents()) if ds else [], int(chunks.contents()) if chunks else 0


def check_fits(path: Path, inv: Inventory) -> dict[str, tuple[int, np.ndarray]]:
    """Refuse an imatrix made for another model: every entry must name a tensor of this model, with
    ne0 x n_expert values (the quantizer aborts midway on a mismatch otherwise)."""
    entries, _, _ = read_imatrix(path)
    shapes = {t.name: t.shape for t in inv.tensors}
    for name, (n, _) in sorted(entries.items()):
        shape = shapes.get(name)
        if shape is None:
            raise ReamkitError(f"imatrix {path} was made for another model: it has {name}, which this model lacks")
        need = shape[0] * (shape[2] if len(shape) > 2 else 1)
        if n != need and name != "token_embd.weight":
            raise ReamkitError(f"imatrix {path} was made for another model: {name} has {n} values, "
                               f"this model needs {need}")
    if not entries:
        raise ReamkitError(f"imatrix {path} has no entries")
    return entries


def expert_coverage(entries: dict[str, tuple[int, np.ndarray]]) -> dict[int, float]:
    """Per block, the share of experts whose input the imatrix saw (the least covered expert tensor)."""
    cov: dict[int, float] = {}
    for name, (_, counts) in entries.items():
        m = re.match(r"blk\.(\d+)\.ffn_\w+_exps\.weight$", name)
        if m and counts.size:
            share = float((counts > 0).mean())
            cov[int(m.group(1))] = min(share, cov.get(int(m.group(1)), 1.0))
    return dict(sorted(cov.items()))


def describe(path: Path, inv: Inventory, source: str) -> ImatrixInfo:
    entries = check_fits(path, inv)
    _, datasets, chunks = read_imatrix(path)
    return ImatrixInfo(path=Path(path), sha256=file_hash(path), source=source, datasets=datasets,
                       chunks=chunks, coverage=expert_coverage(entries))


def compute_imatrix(reference: Path, out: Path, *, spec: str | None = None, chunks: int, ctx: int,
                    threads: int | None = None, seed: int = 0, on_line: Callable[[str], None] | None = None) -> None:
    """Run ``llama-imatrix`` on ``reference`` over ``chunks`` x ``ctx`` tokens of calibration text into ``out``
    (a path the caller makes atomic)."""
    import os
    import tempfile

    from ..llamacpp.tools import run_tool

    with tempfile.TemporaryDirectory(prefix="reamkit-imatrix-") as tmp:
        label = re.sub(r"[^A-Za-z0-9=.,_-]+", "_", spec or CALIB_MIX)
        text = Path(tmp) / f"reamkit-calibration-{label}-seed{seed}.txt"
        text.write_text(calibration_text(int(chunks * ctx * 5), spec, seed=seed))
        run_tool("llama-imatrix", ["-m", Path(reference).resolve(), "-f", text.name, "-o", Path(out).resolve(),
                                   "--output-format", "gguf",
                                   "-c", ctx, "-b", ctx, "--chunks", chunks, "--no-ppl",
                                   "-t", threads or os.cpu_count() or 1], on_line=on_line, cwd=Path(tmp))


def imatrix_from_observations(observations: Path, inv: Inventory, out: Path) -> None:
    """Write an imatrix GGUF from a compression pass's per-expert statistics.

    ``observations`` (safetensors) holds per MoE block ``layers.{i}.expert_in_sumsq`` [N, H] (sum of x^2 of each
    expert's input over its routed tokens), ``layers.{i}.expert_mid_sumsq`` [N, D] (the same for the input of
    ``down_proj``) and ``layers.{i}.expert_tokens`` [N]. These are exactly llama-imatrix's ``in_sum2`` and
    ``counts`` for ``ffn_{gate,up}_exps`` and ``ffn_down_exps``.
    """
    from gguf import GGUFWriter
    from safetensors.torch import load_file

    blocks = check_observations(observations, inv)
    obs = {k: v.float().numpy() for k, v in load_file(str(observations)).items()}
    writer = GGUFWriter(str(out), arch="imatrix", use_temp_file=False)
    writer.add_type("imatrix")
    where = Path(observations)
    writer.add_array("imatrix.datasets", [f"reamkit compression observations ({where.parent.name}/{where.name})"])
    tokens_max = 0
    for i in blocks:
        counts = obs[f"layers.{i}.expert_tokens"].astype(np.float32).reshape(-1, 1)
        tokens_max = max(tokens_max, int(counts.max()))
        for tensor, key in _EXPERT_INPUTS.items():
            name = f"blk.{i}.{tensor}.weight"
            sums = obs[f"layers.{i}.{key}"]
            writer.add_tensor(f"{name}.in_sum2", np.ascontiguousarray(sums, dtype=np.float32))
            writer.add_tensor(f"{name}.counts", counts)
    writer.add_uint32("imatrix.chunk_count", 1)
    writer.add_uint32("imatrix.chunk_size", tokens_max)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def check_observations(observations: Path, inv: Inventory) -> list[int]:
    """The MoE blocks of a compression statistics file, after checking (from its header alone) that every
    block's shapes fit this model's expert tensors; a file for another model is one clear error."""
    from ..checkpoint.safetensors_header import read_header

    try:
        entries = read_header(Path(observations))[0]
    except ReamkitError as e:
        raise ReamkitError(f"cannot read compression observations {observations}: {e.problem}") from None
    shapes = {t.name: t.shape for t in inv.tensors}
    blocks = sorted({int(m.group(1)) for k in entries if (m := re.match(r"layers\.(\d+)\.expert_tokens$", k))})
    if not blocks:
        raise ReamkitError(f"{observations} holds no layers.N.expert_tokens; is it a compression observations file?")
    for i in blocks:
        for tensor, key in _EXPERT_INPUTS.items():
            name, entry = f"blk.{i}.{tensor}.weight", entries.get(f"layers.{i}.{key}")
            if entry is None:
                raise ReamkitError(f"{observations} lacks layers.{i}.{key}")
            shape = shapes.get(name)
            tokens = entries[f"layers.{i}.expert_tokens"].shape
            if shape is None or tuple(entry.shape) != (shape[2], shape[0]) or tuple(tokens) != (shape[2],):
                want = f"[{shape[2]}, {shape[0]}]" if shape else "no such tensor"
                raise ReamkitError(f"compression observations {observations} are for another model: "
                                   f"layers.{i}.{key} is {list(entry.shape)}, this model's {name} needs {want}")
    return blocks


OUTPUT_OBSERVATIONS = "output_observations.safetensors"


def find_observations(model: Path) -> Path | None:
    """A compression pass's statistics for ``model``: what a compressed model's own experts saw
    (``<model>/compression/output_observations.safetensors``, written by ``reamkit compress``), else a
    statistics file in ``<model>/../observations``, ``<model>/observations`` or beside the model."""
    model = Path(model)
    base = model.parent if model.suffix == ".gguf" else model
    own = base / "compression" / OUTPUT_OBSERVATIONS
    if own.is_file():
        return own
    for folder in (base.parent / "observations", base / "observations", base):
        if folder.is_dir():
            found = sorted(p for p in folder.glob("*.safetensors") if _is_observations(p))
            if found:
                return found[0]
    return None


def _is_observations(p: Path) -> bool:
    from ..checkpoint.safetensors_header import read_header

    try:
        keys = read_header(p)[0]
    except Exception:  # noqa: BLE001
        return False
    return any(re.match(r"layers\.\d+\.expert_tokens$", k) for k in keys)
