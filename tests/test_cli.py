"""The reamkit command: verbs, doctor, demo."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from reamkit.cli import app

runner = CliRunner()


def test_help_lists_the_verbs():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for verb in ("doctor", "zoo", "convert", "demo"):
        assert verb in res.output


def test_doctor_passes_on_the_bootstrapped_toolchain():
    # a real process, as a user runs it
    reamkit = Path(sys.executable).with_name("reamkit")
    res = subprocess.run([str(reamkit), "doctor"], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0c1e57098" in res.stdout
    for tool in ("llama-quantize", "llama-imatrix", "llama-perplexity", "llama-bench", "llama-server",
                 "convert_hf_to_gguf.py"):
        assert tool in res.stdout
    assert "FAIL" not in res.stdout


def test_doctor_names_the_fix_when_the_toolchain_is_missing(monkeypatch):
    from reamkit import toolchain

    monkeypatch.setenv("REAMKIT_LLAMA_CPP_SRC", "/nonexistent")
    toolchain.find_toolchain.cache_clear()
    try:
        res = runner.invoke(app, ["doctor"])
    finally:
        toolchain.find_toolchain.cache_clear()
    assert res.exit_code == 1
    fail = [ln for ln in res.output.splitlines() if "FAIL" in ln]
    assert len(fail) == 1 and "/nonexistent" in fail[0] and "scripts/bootstrap.sh" in fail[0]


def test_demo_converts_the_demo_model(tmp_path):
    res = runner.invoke(app, ["demo", "-o", str(tmp_path / "demo")])
    assert res.exit_code == 0, res.output
    gguf = tmp_path / "demo" / "qwen3_next-tiny-f16.gguf"
    assert gguf.is_file() and gguf.stat().st_size > 30 * 2**20
    assert "llama.cpp commit" in res.output
    mtime = gguf.stat().st_mtime_ns
    again = runner.invoke(app, ["demo", "-o", str(tmp_path / "demo")])     # rerun: nothing redone
    assert again.exit_code == 0 and gguf.stat().st_mtime_ns == mtime


def test_toolchain_run_reports_a_failing_tool_in_one_line(tmp_path):
    import pytest

    from reamkit.errors import ToolchainError
    from reamkit.toolchain import find_toolchain

    tc = find_toolchain()
    with pytest.raises(ToolchainError) as e:
        tc.run("llama-quantize", [tmp_path / "missing.gguf", tmp_path / "out.gguf", "Q4_K_M"])
    msg = str(e.value)
    assert msg.startswith("llama-quantize failed (exit") and "\n" not in msg
    assert not (tmp_path / "out.gguf").exists()
