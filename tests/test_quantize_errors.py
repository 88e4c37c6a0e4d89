"""reamkit quantize: bad input fails in one line before any work, and a killed run resumes cleanly."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from reamkit.cli import app
from reamkit.errors import ReamkitError
from reamkit.quantization import QuantizeOptions, quantize_model
from reamkit.zoo import build_cached

from .quantize_support import reference_gguf, tensor_types

FAMILY = "qwen3_moe"


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> Path:
    return reference_gguf(FAMILY, build_cached(FAMILY), tmp_path_factory.getbasetemp())


def fake_imatrix(path: Path, n_expert: int, hidden: int = 256) -> Path:
    """An imatrix GGUF as llama-imatrix writes it, for a model with ``n_expert`` experts."""
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), arch="imatrix", use_temp_file=False)
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", ["other.txt"])
    w.add_uint32("imatrix.chunk_count", 1)
    w.add_uint32("imatrix.chunk_size", 512)
    w.add_tensor("blk.0.ffn_up_exps.weight.in_sum2", np.ones((n_expert, hidden), np.float32))
    w.add_tensor("blk.0.ffn_up_exps.weight.counts", np.ones((n_expert, 1), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def cli_error(args: list[str]) -> str:
    res = CliRunner().invoke(app, ["quantize", *map(str, args)])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    return lines[0]


def test_bad_input_is_one_line_with_nothing_written(ref, tmp_path):
    out = tmp_path / "out"
    assert "unknown quantization type Q4_K_X" in cli_error([ref, "-o", out, "--types", "Q4_K_M,Q4_K_X"])
    assert "unknown ladder" in cli_error([ref, "-o", out, "--ladder", "mixed"])

    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("hello, I am not a model\n" * 10)
    assert "not a GGUF file" in cli_error([not_gguf, "-o", out])

    truncated = tmp_path / "half.gguf"
    with open(ref, "rb") as src, open(truncated, "wb") as dst:
        dst.write(src.read(ref.stat().st_size // 2))
    assert "is truncated" in cli_error([truncated, "-o", out])

    other = fake_imatrix(tmp_path / "other.imatrix.gguf", n_expert=8)      # made for an 8-expert model
    line = cli_error([ref, "-o", out, "--imatrix", other])
    assert "made for another model" in line and "blk.0.ffn_up_exps.weight" in line

    assert "does not exist" in cli_error([ref, "-o", out, "--imatrix", tmp_path / "missing.gguf"])
    assert "already quantized" in cli_error([_quantized(ref, tmp_path), "-o", out])
    assert not out.exists()


def _quantized(ref: Path, tmp_path: Path) -> Path:
    result = quantize_model(ref, tmp_path / "q", QuantizeOptions(types="Q8_0", imatrix="none", progress=False))
    return result.variants[0].path


def test_full_disk_is_refused_before_any_work(ref, tmp_path, monkeypatch):
    import reamkit.quantization.quantize as q

    real = shutil.disk_usage
    monkeypatch.setattr(q.shutil, "disk_usage", lambda p: real(p)._replace(free=20_000_000))   # 20 MB free
    out = tmp_path / "out"
    with pytest.raises(ReamkitError, match=r"not enough disk space .* the outputs need \d+\.\d+ GB"):
        quantize_model(ref, out, QuantizeOptions(imatrix="none", progress=False))
    assert not out.exists()
    # two small types fit in 20 MB
    result = quantize_model(ref, out, QuantizeOptions(types="Q2_K,Q3_K_S", imatrix="none", progress=False))
    assert [v.type for v in result.variants] == ["Q2_K", "Q3_K_S"]


def test_disk_filling_up_midway_leaves_no_partial_file(ref, tmp_path, monkeypatch):
    """The quantizer's write fails (file size limit, as a full disk would): one line, no file left."""
    import resource

    import reamkit.llamacpp.process as runner

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (4_000_000, 4_000_000))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)      # write() then fails with EFBIG instead of a signal

    monkeypatch.setattr(runner, "die_with_parent", limited)
    out = tmp_path / "out"
    with pytest.raises(ReamkitError) as err:
        quantize_model(ref, out, QuantizeOptions(types="Q8_0", imatrix="none", progress=False))
    assert "llama-quantize failed" in str(err.value) and "\n" not in str(err.value)
    assert sorted(p.name for p in out.iterdir()) == []


def test_killed_run_resumes_without_corrupt_files(ref, tmp_path):
    out = tmp_path / "out"
    types = "Q2_K,Q3_K_S,Q3_K_M,Q4_K_S,Q8_0"
    cmd = [sys.executable, "-m", "reamkit.cli", "quantize", str(ref), "-o", str(out), "--types", types,
           "--imatrix", "none"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    # wait until one variant is complete and the next is being written, then kill without warning
    while time.time() < deadline and not (list(out.glob("*.Q2_K.gguf")) and list(out.glob(".*.tmp-*"))):
        assert proc.poll() is None, "the run finished before it could be interrupted"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(0.5)                              # the quantizer child gets SIGKILL from the kernel as well
    assert list(out.glob(".*.tmp-*")), "the kill did not land mid-write"
    for f in out.glob("*.gguf"):                 # whatever is there under a final name is complete
        assert f.with_name(f.name + ".manifest.json").is_file()
        assert tensor_types(f)
    done_before = {f.name: f.stat().st_mtime_ns for f in out.glob("*.gguf")}

    result = quantize_model(ref, out, QuantizeOptions(types=types, imatrix="none", progress=False))
    assert [v.type for v in result.variants] == types.split(",")
    assert not list(out.glob(".*.tmp-*"))        # the killed run's temporary file is gone
    for v in result.variants:
        assert v.skipped == (v.path.name in done_before)
        assert v.bytes == v.path.stat().st_size and tensor_types(v.path)
    assert {n: (out / n).stat().st_mtime_ns for n in done_before} == done_before


def test_row_length_fallback_is_predicted_and_reported(tmp_path):
    """Expert width 320 is no multiple of 256: K-quants fall back on those tensors, as predicted."""
    model = build_cached(FAMILY, moe_intermediate_size=320)
    ref = reference_gguf(FAMILY + "-odd320", model, tmp_path)
    result = quantize_model(ref, tmp_path / "out", QuantizeOptions(types="Q4_K_M,IQ4_XS", imatrix="none",
                                                                  progress=False))
    for v in result.variants:
        assert v.type_mismatches == [] and v.fallbacks == 4        # ffn_down_exps of the 4 layers
        assert abs(v.predicted_bytes / v.bytes - 1) < 0.001
    types = tensor_types(result.variants[0].path)
    assert {types[f"blk.{i}.ffn_down_exps.weight"] for i in range(4)} <= {"Q5_0", "Q8_0"}   # Q4_K / Q6_K fell back


def test_cli_quantizes_an_hf_folder_and_keeps_the_reference(tmp_path):
    from reamkit.zoo import write_zoo_model

    model = write_zoo_model(FAMILY, tmp_path / "tiny-moe")
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["quantize", str(model), "-o", str(out), "--types", "Q4_K_M", "--imatrix", "none"])
    assert res.exit_code == 0, res.output
    assert "tiny-moe.Q4_K_M.gguf" in res.output and "written" in res.output
    names = sorted(p.name for p in out.iterdir())
    assert names == ["tiny-moe.F16.gguf", "tiny-moe.F16.gguf.manifest.json", "tiny-moe.Q4_K_M.gguf",
                     "tiny-moe.Q4_K_M.gguf.manifest.json"]            # the reference is kept for evaluation
    assert tensor_types(out / "tiny-moe.F16.gguf")["blk.0.ffn_up_exps.weight"] == "F16"
    again = CliRunner().invoke(app, ["quantize", str(model), "-o", str(out), "--types", "Q4_K_M", "--imatrix", "none"])
    assert again.exit_code == 0 and "up to date" in again.output
