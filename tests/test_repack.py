"""Weight repacking: probed once per llama.cpp build and CPU, and the decision applied wherever llama.cpp loads a
model (tools through run_tool, llama-server, the Python bindings through load_llama)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from reamkit.errors import ToolchainError
from reamkit.gguf import convert_to_gguf
from reamkit.llamacpp import repack
from reamkit.llamacpp.doctor import doctor_checks
from reamkit.llamacpp.gguf_file import open_gguf
from reamkit.llamacpp.repack import RepackDecision, repack_decision
from reamkit.llamacpp.toolchain import find_toolchain
from reamkit.llamacpp.tools import run_tool
from reamkit.zoo import DEMO_MODEL


@pytest.fixture(scope="module")
def q4_gguf(tmp_path_factory) -> Path:
    """The demo model at Q4_0: the smallest quantized GGUF whose tensors llama.cpp repacks."""
    base = tmp_path_factory.getbasetemp() / "repack"
    f16, _ = convert_to_gguf(DEMO_MODEL, base / "demo.F16.gguf", dtype="f16")
    out = base / "demo.Q4_0.gguf"
    if not out.is_file():
        run_tool("llama-quantize", [f16, out, "Q4_0"])
    return out


@pytest.fixture
def forced(monkeypatch):
    """Force the decision through REAMKIT_REPACK; the cached decision is dropped before and after."""
    def force(value: str) -> None:
        monkeypatch.setenv(repack.REPACK_OVERRIDE, value)
        repack_decision.cache_clear()
    yield force
    repack_decision.cache_clear()


def test_probe_is_cached_per_build_and_cpu(monkeypatch):
    monkeypatch.delenv(repack.REPACK_OVERRIDE, raising=False)
    repack_decision.cache_clear()
    decision = repack_decision()
    cached = repack.repack_probe_file(find_toolchain().commit)
    data = json.loads(cached.read_text())
    assert data["on"] == decision.on and data["llama_cpp_commit"] == find_toolchain().commit
    assert repack.cpu_fingerprint() in cached.name
    # a second process (no lru cache) reads the file instead of probing again
    repack_decision.cache_clear()
    monkeypatch.setattr(repack, "probe_repack", lambda *a: pytest.fail("probed again despite the cache"))
    assert repack_decision() == decision
    repack_decision.cache_clear()


def test_the_probe_model_is_quantized_and_evaluated(monkeypatch, tmp_path):
    """The probe writes its own tiny model (no stage of reamkit's), quantizes it to Q4_0 and reaches the
    decision cached for this CPU."""
    monkeypatch.delenv(repack.REPACK_OVERRIDE, raising=False)
    repack_decision.cache_clear()
    cached = repack_decision()
    decision = repack.probe_repack(find_toolchain(), tmp_path)
    repack_decision.cache_clear()
    assert decision == cached
    q4 = open_gguf(tmp_path / "probe.Q4_0.gguf")
    assert {t.tensor_type.name for t in q4.tensors if t.name.startswith("blk.0.ffn_")} == {"Q4_0", "F32"}


def test_quantized_model_loads_through_the_helper(q4_gguf):
    """With repacking as probed, a quantized GGUF evaluates in the bindings (on an AMX-faulting CPU, the raw
    default dies with SIGILL: shown by the second child)."""
    script = ("import sys; from reamkit.llamacpp.repack import load_llama;"
              "llm = load_llama(sys.argv[1], n_ctx=64, n_threads=1, logits_all=True);"
              "llm.eval(llm.tokenize(b'def add(a, b):')); print('logits', len(llm.scores[0]))")
    proc = subprocess.run([sys.executable, "-c", script, str(q4_gguf)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "logits" in proc.stdout
    if not repack_decision().on and "faults" in repack_decision().reason:
        raw = ("import sys; from llama_cpp import Llama; llm = Llama(model_path=sys.argv[1], n_ctx=64, "
               "n_threads=1, verbose=False); llm.eval(llm.tokenize(b'def add(a, b):'))")
        proc = subprocess.run([sys.executable, "-c", raw, str(q4_gguf)], capture_output=True, timeout=300)
        assert proc.returncode < 0, "the probe said repacking faults, yet the raw bindings loaded the model"


def test_tools_get_the_switch_only_when_off(forced):
    forced("0")
    assert repack.repack_env("llama-server") == {"LLAMA_ARG_REPACK": "0"}
    assert repack.repack_env("llama-perplexity") == {"LLAMA_ARG_REPACK": "0"}
    assert repack.repack_env("llama-quantize") == {}
    assert repack.repack_args("llama-bench", ["-m", "x"]) == ["--repack", "0"]
    assert repack.repack_args("llama-bench", ["--repack", "1"]) == []
    assert repack.repack_args("llama-perplexity", []) == []
    forced("1")
    assert repack.repack_env("llama-server") == {} and repack.repack_args("llama-bench") == []


def test_llama_bench_runs_on_a_quantized_model(q4_gguf):
    """run_tool adds ``--repack 0`` when the probe says so; without it this CPU would fault."""
    repack_decision.cache_clear()
    proc = run_tool("llama-bench", ["-m", q4_gguf, "-p", "8", "-n", "0", "-r", "1", "-t", "1", "-o", "json"],
                    timeout=300, separate_stdout=True)
    rows = json.loads(proc.stdout)
    assert rows and rows[0]["avg_ts"] > 0


def test_llama_server_child_gets_the_environment(forced, tmp_path):
    from reamkit.serving.server import LlamaServer

    forced("0")
    log = tmp_path / "child.log"
    child = LlamaServer([sys.executable, "-c", "import os; print('REPACK=' + os.environ.get('LLAMA_ARG_REPACK', '-'))"],
                        log, 1, "k")
    child.proc.wait(timeout=60)
    assert "REPACK=0" in log.read_text()


def test_doctor_reports_the_decision(forced):
    forced("0")
    line = [c for c in doctor_checks() if c.name == "weight repacking"]
    assert line and line[0].ok and line[0].detail.startswith("off (forced by REAMKIT_REPACK=0")


def test_undecided_probe_is_not_cached(monkeypatch, tmp_path):
    monkeypatch.delenv(repack.REPACK_OVERRIDE, raising=False)
    monkeypatch.setenv("REAMKIT_CACHE_DIR", str(tmp_path))

    def broken(tc, work):
        raise ToolchainError("llama-quantize failed (exit 1): no space left")

    monkeypatch.setattr(repack, "probe_repack", broken)
    repack_decision.cache_clear()
    try:
        d = repack_decision()
    finally:
        repack_decision.cache_clear()
    assert d == RepackDecision(False, d.reason) and "did not finish" in d.reason
    assert not list((tmp_path / "probes").glob("*.json"))
