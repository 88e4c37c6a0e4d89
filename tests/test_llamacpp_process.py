"""The one process runner (reamkit.llamacpp.process), on small stand-in commands: the error line, reruns until the
log is complete, the timeout, separate stdout with the child's figures, and dying with its parent."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil
import pytest

from reamkit.errors import ToolchainError
from reamkit.llamacpp.process import run


def py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_failure_is_one_line_naming_the_tool_and_its_last_error_line():
    code = "import sys; print('loading'); print('error: no such tensor'); print('bye'); sys.exit(3)"
    with pytest.raises(ToolchainError) as e:
        run(py(code), name="llama-quantize", on="model.gguf")
    assert str(e.value) == "llama-quantize failed on model.gguf (exit 3): error: no such tensor"
    killed = run(py("import os, signal; os.kill(os.getpid(), signal.SIGKILL)"), name="llama-bench", check=False)
    assert killed.returncode == -9
    with pytest.raises(ToolchainError, match=r"^llama-bench failed \(killed by signal 9\): no output$"):
        killed.check()


def test_lines_stream_to_the_callback_and_a_lost_summary_is_run_again(tmp_path):
    counter = tmp_path / "runs"
    code = (f"from pathlib import Path; p = Path({str(counter)!r}); n = int(p.read_text()) + 1 if p.exists() else 1;"
            "p.write_text(str(n)); print('line', n); print('Final estimate' if n == 2 else 'cut short')")
    seen: list[str] = []
    done = run(py(code), name="llama-perplexity", on_line=seen.append,
               complete=lambda log: "Final estimate" in log, attempts=4)
    assert counter.read_text() == "2" and done.lines == ["line 2", "Final estimate"]
    assert seen == ["line 1", "cut short", "line 2", "Final estimate"]


def test_a_timeout_stops_the_tool_and_says_so_in_one_line():
    t0 = time.monotonic()
    with pytest.raises(ToolchainError, match=r"^llama-imatrix did not finish within 0.5 s \(stopped\)$"):
        run(["sleep", "30"], name="llama-imatrix", timeout=0.5)
    assert time.monotonic() - t0 < 10


def test_stdout_apart_from_the_log_with_cpu_time_and_peak_memory():
    code = ("import sys, time; x = b'x' * (64 << 20); sys.stderr.write('progress\\n'); print('{\"rows\": 1}');"
            "t = time.process_time() + 0.3\nwhile time.process_time() < t: pass")
    done = run(py(code), name="llama-bench", separate_stdout=True, measure_memory=True)
    assert done.stdout.strip() == '{"rows": 1}' and done.lines == ["progress"]
    assert done.cpu_s >= 0.3 and done.peak_rss >= 64 << 20


def test_the_tool_dies_with_reamkit(tmp_path):
    parent = subprocess.Popen(py("from reamkit.llamacpp.process import run; run(['sleep', '60'], name='sleep')"))
    try:
        deadline = time.monotonic() + 30
        kids: list[psutil.Process] = []
        while not kids and time.monotonic() < deadline:
            kids = [c for c in psutil.Process(parent.pid).children() if c.name() == "sleep"]
            time.sleep(0.05)
        assert kids, "the runner never started its child"
        parent.kill()
        parent.wait()
        _, alive = psutil.wait_procs(kids, timeout=10)
        assert not alive, "the tool outlived the process that ran it"
    finally:
        parent.kill()
