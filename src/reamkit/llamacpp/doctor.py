"""``reamkit doctor``: everything reamkit needs, each with its version or path, or the one-line fix."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import ToolchainError
from .repack import repack_decision
from .toolchain import FIX, TOOLS, built_sdist_sha256, find_toolchain, installed_version, pins


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


PYTHON_PACKAGES = ("torch", "transformers", "gguf", "numpy", "safetensors", "tokenizers", "sentencepiece",
                   "huggingface_hub")


def doctor_checks() -> list[Check]:
    """Everything reamkit needs, each with its version or path, or the one-line fix."""
    checks: list[Check] = []
    try:
        p = pins()
    except ToolchainError as e:
        return [Check("version pins", False, e.problem, e.fix or FIX)]
    for dist in PYTHON_PACKAGES:
        v = installed_version(dist)
        pin = p.pinned(dist)
        if v is None:
            checks.append(Check(dist, False, "not installed", FIX))
        elif pin and v.split("+")[0] != pin:
            checks.append(Check(dist, False, f"{v} (reamkit pins {pin})", FIX))
        else:
            checks.append(Check(dist, True, v))
    try:
        import torch

        flavour_file = Path(sys.prefix) / ".reamkit-torch"
        flavour = flavour_file.read_text().strip() if flavour_file.is_file() else "cpu"
        if torch.version.cuda and flavour == "cuda":
            gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
            checks.append(Check("torch build", True, f"CUDA {torch.version.cuda} build {torch.__version__} "
                                                     f"(REAMKIT_TORCH=cuda); GPUs visible: {gpus}"))
        elif torch.version.cuda:
            checks.append(Check("torch build", False, f"CUDA build {torch.__version__} that nothing asked for",
                                f"reinstall the CPU build of torch: {FIX} (or REAMKIT_TORCH=cuda {FIX} to keep it)"))
        else:
            checks.append(Check("torch build", True, f"CPU ({torch.__version__})"))
    except ImportError:
        pass
    try:
        tc = find_toolchain()
    except ToolchainError as e:
        checks.append(Check("llama.cpp", False, e.problem, e.fix or FIX))
        return checks
    checks.append(Check("llama-cpp-python", True, installed_version("llama_cpp_python") or "?"))
    checks.append(Check("llama.cpp commit", True, f"{tc.commit} (reported by the built tools)"))
    sha = built_sdist_sha256(tc)
    if sha == p.sdist_sha256:
        checks.append(Check("llama.cpp source", True, f"sdist sha256 {sha[:16]}... as pinned"))
    else:
        checks.append(Check("llama.cpp source", False,
                            f"built from an sdist with sha256 {sha or 'unrecorded'}, reamkit pins {p.sdist_sha256}",
                            FIX))
    for name in TOOLS:
        checks.append(Check(name, True, str(tc.tool(name))))
    checks.append(Check("convert_hf_to_gguf.py", True, str(tc.converter)))
    try:
        rd = repack_decision()
        checks.append(Check("weight repacking", True, f"{'on' if rd.on else 'off'} ({rd.reason})"))
    except ToolchainError as e:
        checks.append(Check("weight repacking", False, e.problem, e.fix or FIX))
    return checks
