"""The reamkit command: verbs, doctor, demo."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from reamkit.cli import app

from .conftest import constraints_pin

runner = CliRunner()


def test_help_lists_the_verbs():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for verb in ("doctor", "zoo", "convert", "demo"):
        assert verb in res.output


def doctor_lines(output: str) -> dict[str, str]:
    """``{check name: whole line}`` of doctor's output."""
    out = {}
    for ln in output.splitlines():
        parts = ln.split()
        if len(parts) >= 2 and parts[0] in ("ok", "FAIL"):
            out[" ".join(parts[1:3]) if parts[1] in ("llama.cpp", "torch") else parts[1]] = ln
    return out


def test_doctor_passes_on_the_bootstrapped_toolchain():
    # a real process, as a user runs it
    reamkit = Path(sys.executable).with_name("reamkit")
    res = subprocess.run([str(reamkit), "doctor"], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = doctor_lines(res.stdout)
    commit = constraints_pin("llama.cpp-commit")
    assert lines["llama.cpp commit"].split()[:4] == ["ok", "llama.cpp", "commit", commit]
    assert lines["llama.cpp source"].startswith("ok")
    for tool in ("llama-quantize", "llama-imatrix", "llama-perplexity", "llama-bench", "llama-server",
                 "convert_hf_to_gguf.py"):
        assert lines[tool].startswith("ok"), lines
    assert "FAIL" not in res.stdout


def test_the_built_tools_and_source_are_the_pinned_ones():
    """Read from what was built, not from what the bootstrap meant to build: the commit the binary prints of
    itself, and the sha256 of the sdist the bootstrap checked and built."""
    import llama_cpp

    server = Path(llama_cpp.__file__).resolve().parent.parent / "bin" / "llama-server"
    version = subprocess.run([str(server), "--version"], capture_output=True, text=True, timeout=60)
    printed = version.stdout + version.stderr
    assert f"commit {constraints_pin('llama.cpp-commit')}" in printed, printed
    src = Path((Path(sys.prefix) / "reamkit-llama-cpp-src").read_text().strip())
    recorded = (src.parent / "sdist.sha256").read_text().split()
    assert recorded[0] == constraints_pin("llama-cpp-python-sdist-sha256")
    assert recorded[1] == f"llama_cpp_python-{constraints_pin('llama-cpp-python')}.tar.gz"
    assert llama_cpp.__version__ == constraints_pin("llama-cpp-python")


def fake_toolchain(tmp_path, *, commit: str, sdist_sha: str | None) -> Path:
    """A copy of the toolchain's layout whose tools claim ``commit`` and whose build recorded ``sdist_sha``."""
    from reamkit.llamacpp.toolchain import TOOLS, find_toolchain

    real = find_toolchain()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in TOOLS:
        tool = bin_dir / name
        tool.write_text(f"#!/bin/sh\necho 'version: 0.5.0-dev (build 0, commit {commit})'\n")
        tool.chmod(0o755)
    build = tmp_path / "build"
    build.mkdir()
    (build / "llama.cpp").symlink_to(real.src_dir)
    if sdist_sha:
        (build / "sdist.sha256").write_text(f"{sdist_sha}  llama_cpp_python.tar.gz\n")
    return bin_dir


def run_doctor_with(monkeypatch, bin_dir: Path, src: Path):
    from reamkit.llamacpp import toolchain

    monkeypatch.setattr(toolchain, "bin_dir", lambda: bin_dir)
    monkeypatch.setenv("REAMKIT_LLAMA_CPP_SRC", str(src))
    toolchain.find_toolchain.cache_clear()
    try:
        return runner.invoke(app, ["doctor"])
    finally:
        toolchain.find_toolchain.cache_clear()


def test_doctor_refuses_tools_built_from_another_commit(tmp_path, monkeypatch):
    bin_dir = fake_toolchain(tmp_path, commit="4df29be4f", sdist_sha=constraints_pin("llama-cpp-python-sdist-sha256"))
    res = run_doctor_with(monkeypatch, bin_dir, tmp_path / "build" / "llama.cpp")
    assert res.exit_code == 1
    fail = [ln for ln in res.output.splitlines() if "FAIL" in ln]
    assert len(fail) == 1 and "built from commit 4df29be4f" in fail[0] and "scripts/bootstrap.sh" in fail[0]
    from reamkit.errors import ToolchainError
    from reamkit.llamacpp.toolchain import find_toolchain

    with pytest.raises(ToolchainError, match="4df29be4f"):     # and nothing converts with them
        find_toolchain()


def test_doctor_refuses_a_build_from_another_sdist(tmp_path, monkeypatch):
    bin_dir = fake_toolchain(tmp_path, commit=constraints_pin("llama.cpp-commit"), sdist_sha="0" * 64)
    res = run_doctor_with(monkeypatch, bin_dir, tmp_path / "build" / "llama.cpp")
    assert res.exit_code == 1
    fail = [ln for ln in res.output.splitlines() if "FAIL" in ln]
    assert len(fail) == 1 and "llama.cpp source" in fail[0] and "0" * 64 in fail[0]


def test_doctor_names_the_fix_when_the_converter_is_missing(monkeypatch):
    from reamkit.llamacpp import toolchain

    monkeypatch.setenv("REAMKIT_LLAMA_CPP_SRC", "/nonexistent")
    toolchain.find_toolchain.cache_clear()
    try:
        res = runner.invoke(app, ["doctor"])
    finally:
        toolchain.find_toolchain.cache_clear()
    assert res.exit_code == 1
    fail = [ln for ln in res.output.splitlines() if "FAIL" in ln]
    assert len(fail) == 1 and "/nonexistent" in fail[0] and "scripts/bootstrap.sh" in fail[0]


DOCTOR_WITHOUT_LLAMA = """
import importlib.abc, importlib.metadata as md, sys
class Hide(importlib.abc.MetaPathFinder):          # as after `pip install .` without the bootstrap
    def find_spec(self, name, path=None, target=None):
        if name == "llama_cpp" or name.startswith("llama_cpp."):
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, Hide())
real = md.version
def version(dist):
    if dist.replace("-", "_").lower() == "llama_cpp_python":
        raise md.PackageNotFoundError(dist)
    return real(dist)
md.version = version
from reamkit.cli import app
sys.argv = ["reamkit", "doctor"]
app()
"""


def test_doctor_without_llama_cpp_names_it_and_the_one_fix():
    res = subprocess.run([sys.executable, "-c", DOCTOR_WITHOUT_LLAMA], capture_output=True, text=True)
    assert res.returncode == 1, res.stdout + res.stderr
    fail = [ln for ln in res.stdout.splitlines() if "FAIL" in ln]
    assert fail == [fail[0]] and "llama.cpp" in fail[0] and "not installed" in fail[0], res.stdout
    assert fail[0].endswith("-> run scripts/bootstrap.sh")
    assert "Traceback" not in res.stderr


def test_demo_plans_the_whole_pipeline_on_the_trained_demo_model(tmp_path):
    """What ``reamkit demo`` runs (.ci/run runs it in full and checks its card)."""
    from reamkit.pipeline import plan_for, validate
    from reamkit.pipeline.demo import DESCRIPTION, demo_config
    from reamkit.zoo import write_demo_model

    plan = plan_for(validate(demo_config(write_demo_model(tmp_path / "demo-coder")), source="demo"))
    assert {m["method"]: m["experts"] for m in plan.models.values()} == {"none": 16, "auto": 12, "reap": 12}
    assert len(plan.variants) == 3 * 12                     # the 11-type ladder plus the BF16 reference, each
    assert {s.kind for s in plan.order()} == {"compress", "prepare", "quantize", "reference", "evaluate", "speed",
                                              "compare", "card"}
    assert plan.stages["compare"].params["run"]["description"] == DESCRIPTION       # the card says which model


def test_a_failing_tool_is_reported_in_one_line(tmp_path):
    from reamkit.errors import ToolchainError
    from reamkit.llamacpp.tools import run_tool

    with pytest.raises(ToolchainError) as e:
        run_tool("llama-quantize", [tmp_path / "missing.gguf", tmp_path / "out.gguf", "Q4_K_M"])
    msg = str(e.value)
    assert msg.startswith("llama-quantize failed (exit") and "\n" not in msg
    assert not (tmp_path / "out.gguf").exists()
