"""The sandbox that runs HumanEval programs: hostile programs are contained, reported as failures, and the scorer
(this test process) goes on. Each hostile program runs as a HumanEval/0 completion through ``score_completions``
next to a correct one, so the scorer's parallel workers see it exactly as they would see a model's output."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import pytest

from reamkit.evaluation.humaneval import HumanEvalOptions, load_problems, score_completions
from reamkit.evaluation.sandbox import SandboxLimits, run_program, sandbox_facts

QUICK = SandboxLimits(timeout_s=3.0, cpu_s=3)
TASK = "HumanEval/0"


@pytest.fixture(scope="module")
def problems():
    return load_problems()


def sandbox_programs() -> list[int]:
    """Live processes running a sandboxed program (the interpreter on ``program.py``)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if cmd[-1:] == ["program.py"] and "-I" in cmd:
            found.append(p.pid)
    return found


def hostile(problems, code: str, timeout: float = 3.0):
    """Score ``code`` (top-level statements after a wrong body) as TASK's completion beside the canonical
    solution; returns the hostile one's result after checking the scorer still scored the good one."""
    bad = {"task_id": TASK, "completion": "    return None\n" + code}
    good = {"task_id": TASK, "completion": problems[TASK]["canonical_solution"]}
    results = score_completions([bad, good, good], problems, HumanEvalOptions(workers=2, timeout_s=timeout))
    assert [r.passed for r in results[1:]] == [True, True], results
    assert not results[0].passed
    assert not sandbox_programs()
    return results[0]


def test_the_isolation_this_machine_allows_is_used():
    """No silent fallback: where namespaces work (checked here with util-linux unshare), they are in use."""
    facts = sandbox_facts()
    unshare = shutil.which("unshare")
    can = unshare is not None and subprocess.run(
        [unshare, "-n", *([] if os.geteuid() == 0 else ["-r"]), "true"], capture_output=True).returncode == 0
    assert facts.network_isolated == can, facts
    if not facts.network_isolated:
        assert "network NOT isolated" in facts.note
    if os.geteuid() == 0:
        assert facts.dedicated_uid, "as root the program must drop privileges (RLIMIT_NPROC needs it)"
    run = run_program("import os; print(os.getuid())")
    assert run.ok and (int(run.stdout) != 0 or os.geteuid() != 0)


def test_fork_bomb(problems):
    code = ("import os\n"
            "while True:\n"
            "    try:\n        os.fork()\n        os.setsid()\n"
            "    except OSError:\n        pass\n")
    r = hostile(problems, code)
    assert r.result in ("timed out",) or r.result.startswith("failed"), r


def test_infinite_loop(problems):
    t0 = time.monotonic()
    r = hostile(problems, "while True:\n    pass\n", timeout=2.0)
    assert r.result == "timed out" or "signal" in r.result     # wall clock or RLIMIT_CPU, whichever first
    assert time.monotonic() - t0 < 10


def test_memory_hog(problems):
    r = hostile(problems, "hog = []\nwhile True:\n    hog.append(bytearray(64 * 2**20))\n", timeout=10.0)
    assert r.result in ("failed: MemoryError",) or "signal" in r.result, r


def test_a_gigabyte_print_is_capped_and_stopped(figure):
    limits = SandboxLimits(timeout_s=60.0, cpu_s=60)
    t0 = time.monotonic()
    run = run_program("import sys\nfor _ in range(1024):\n    sys.stdout.write('x' * 2**20)\n", limits)
    took = time.monotonic() - t0
    figure(f"sandbox: a 1 GB print stopped after {took:.2f} s with {len(run.stdout)} bytes kept")
    assert run.output_exceeded and not run.ok and not run.timed_out
    assert len(run.stdout) == limits.output_bytes
    assert took < 30                                     # killed at the cap, not left to run for a minute


def test_scored_gigabyte_print_fails(problems):
    r = hostile(problems, "import sys\nfor _ in range(1024):\n    sys.stdout.write('x' * 2**20)\n", timeout=30)
    assert r.result == "failed: printed more than the output limit"


def test_writing_outside_the_working_folder(problems, tmp_path):
    shared_tmp = Path(tempfile.gettempdir()) / f"reamkit-escape-{uuid.uuid4().hex}"
    home = Path.home() / f"reamkit-escape-{uuid.uuid4().hex}"
    repo = Path(__file__).resolve().parents[1] / f"reamkit-escape-{uuid.uuid4().hex}"
    code = "".join(f"try:\n    open({str(p)!r}, 'w').write('x')\nexcept OSError:\n    pass\n"
                   for p in (shared_tmp, home, repo))
    try:
        hostile(problems, code)
        if sandbox_facts().private_tmp:
            assert not shared_tmp.exists()
        if sandbox_facts().dedicated_uid:                 # as the user itself (userns mode) it may write home
            assert not home.exists() and not repo.exists()
    finally:
        for p in (shared_tmp, home, repo):
            p.unlink(missing_ok=True)
    run = run_program("open('inside.txt', 'w').write('ok')\nprint(open('inside.txt').read())\n", QUICK)
    assert run.ok and run.stdout.strip() == "ok"          # its own folder is writable


@pytest.mark.parametrize("code", [
    "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n",
    "import os, signal\nos.killpg(os.getpgid(os.getppid()), signal.SIGKILL)\n",
    "import os, signal\nos.killpg(0, signal.SIGKILL)\n",
], ids=["kill-parent", "killpg-parent", "killpg-own"])
def test_killing_the_parent(problems, code):
    me = os.getpid()
    hostile(problems, code)
    assert psutil.pid_exists(me) and os.getpid() == me
    assert run_program("print('still scoring')", QUICK).stdout.strip() == "still scoring"


def test_kill_everything_it_may():
    """``kill(-1)`` signals every process the sender may: in a pid namespace or as a dedicated uid, only itself."""
    facts = sandbox_facts()
    if not (facts.pid_namespace or facts.dedicated_uid):
        pytest.fail(f"the sandbox ({facts.mode}) would let kill(-1) reach this user's processes")
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        run_program("import os, signal\nos.kill(-1, signal.SIGKILL)\n", QUICK)
        assert sleeper.poll() is None                      # this user's (root's) other processes live on
        assert run_program("print('still scoring')", QUICK).stdout.strip() == "still scoring"
    finally:
        sleeper.kill()
        sleeper.wait()


def test_network_connection_does_not_arrive(problems):
    facts = sandbox_facts()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        port = listener.getsockname()[1]
        code = (f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'x')\n"
                "except OSError:\n    pass\n")
        hostile(problems, code)
        listener.settimeout(0.5)
        try:
            conn, _ = listener.accept()
            conn.close()
            arrived = True
        except TimeoutError:
            arrived = False
    assert arrived is not facts.network_isolated, facts
    assert not arrived or "network NOT isolated" in facts.note


def test_environment_stdin_and_file_limits(monkeypatch):
    monkeypatch.setenv("REAMKIT_TEST_SECRET", "hunter2")
    run = run_program("import os, sys\nprint(sorted(os.environ))\nprint(repr(sys.stdin.read()))\n", QUICK)
    assert run.ok and "REAMKIT_TEST_SECRET" not in run.stdout and "hunter2" not in run.stdout
    assert run.stdout.splitlines()[1] == "''"            # stdin is /dev/null: no hang, nothing to read
    big = run_program(f"open('big', 'wb').write(b'x' * {(QUICK.file_mb + 1) * 2**20})\n", QUICK)
    assert not big.ok                                    # RLIMIT_FSIZE: SIGXFSZ or EFBIG
    fds = run_program("import os\nfds = [os.open('/dev/null', os.O_RDONLY) for _ in range(1000)]\n", QUICK)
    assert not fds.ok and "Too many open files" in fds.stderr
