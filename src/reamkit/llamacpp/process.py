"""The one place reamkit starts a llama.cpp process (a tool, the converter, llama-server), all hardened alike:

- it dies with reamkit: the kernel kills it when reamkit dies (SIGKILL for a tool, SIGTERM for llama-server,
  which shuts down cleanly), and Ctrl-C or SIGTERM in reamkit kills a running tool at once;
- an exit grace for its log thread (below), and a rerun where a summary the caller parses was lost anyway;
- an optional timeout; its log lines stream to a callback as they come;
- one error style: a one-line :class:`ToolchainError` naming the tool and quoting its last error line.

The exit grace: the pinned llama.cpp logs from a worker thread and deliberately never joins it at exit (its logger
is leaked on purpose, upstream issue 22142). The lines a tool logs just before it returns, which include the
summaries reamkit parses (``llama-perplexity``'s KLD statistics, ``llama-quantize``'s last tensors), are lost
whenever that thread does not get a CPU before the process ends: a few percent of runs on an idle machine, nearly
all of them on a loaded one. A tiny library preloaded into the tool (``LD_PRELOAD``) sleeps briefly in its exit
destructor, which gives the thread that CPU. It is compiled once with the system C compiler (the one that built
llama.cpp) into the reamkit cache.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ..cache import cache_root
from ..children import die_with_parent
from ..errors import ToolchainError

TAIL_LINES = 400          # the log lines searched for the error line quoted when a tool fails
LINGER_MS = 150
SOURCE = f"""
#include <time.h>
__attribute__((destructor)) static void reamkit_linger(void) {{
    struct timespec t = {{0, {LINGER_MS} * 1000L * 1000L}};
    nanosleep(&t, 0);
}}
"""


@dataclass
class Finished:
    """A process that ran to its end."""

    name: str
    returncode: int
    lines: list[str]                 # its log: stdout and stderr as they came, or stderr alone (separate_stdout)
    stdout: str = ""                 # its standard output, with separate_stdout
    cpu_s: float = 0.0               # its user + system CPU seconds
    peak_rss: int = 0                # its peak resident memory in bytes (VmHWM), with measure_memory

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    @property
    def last_error(self) -> str:
        return last_error_line("\n".join(self.lines[-TAIL_LINES:]))

    def check(self, on: str | None = None) -> Finished:
        """Itself, or a one-line ToolchainError for a non-zero exit (``on``: what it worked on)."""
        if self.returncode != 0:
            rc = self.returncode
            why = f"killed by signal {-rc}" if rc < 0 else f"exit {rc}"
            where = f" on {on}" if on else ""
            raise ToolchainError(f"{self.name} failed{where} ({why}): {self.last_error}")
        return self


def last_error_line(text: str) -> str:
    """The most informative line of a tool's output: the last one mentioning an error, else the last."""
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.search(r"error|failed|exception|not found|invalid", ln, re.I):
            return ln
    return lines[-1] if lines else "no output"


def run(cmd: Sequence, *, name: str, env: dict[str, str] | None = None, unset: Sequence[str] = (),
        cwd: Path | None = None, on_line: Callable[[str], None] | None = None, timeout: float | None = None,
        separate_stdout: bool = False, measure_memory: bool = False, grace: bool = True, check: bool = True,
        on: str | None = None, complete: Callable[[str], bool] | None = None, attempts: int = 1) -> Finished:
    """Run ``cmd`` to its end (``name``: the tool, as errors name it; ``env``: variables set over ours, ``unset``:
    ones removed). ``complete(log)`` says whether the log holds what the caller parses; when it does not, the run
    is repeated, ``attempts`` times at most (the tools are deterministic: a rerun is correct, only slower).
    A non-zero exit raises (unless ``check`` is false), naming ``on`` when given; a timeout always raises."""
    environment = {**os.environ, "LLAMA_LOG_COLORS": "0", **(linger_env() if grace else {}), **(env or {})}
    for key in unset:
        environment.pop(key, None)
    argv = [str(a) for a in cmd]
    done = None
    for _ in range(max(1, attempts)):
        done = _run_once(argv, name, environment, cwd, on_line, timeout, separate_stdout, measure_memory)
        if check:
            done.check(on)
        if complete is None or complete(done.text):
            break
    assert done is not None
    return done


def _run_once(argv: list[str], name: str, env: dict, cwd, on_line, timeout, separate_stdout: bool,
              measure_memory: bool) -> Finished:
    lines: list[str] = []
    with tempfile.TemporaryFile(mode="w+", errors="replace") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out if separate_stdout else subprocess.PIPE,
                                stderr=subprocess.PIPE if separate_stdout else subprocess.STDOUT, text=True,
                                errors="replace", bufsize=1, cwd=cwd, env=env, preexec_fn=die_with_parent)
        timed_out = threading.Event()
        timer = threading.Timer(timeout, lambda: (timed_out.set(), proc.kill())) if timeout else None
        peak = _MemoryWatch(proc.pid) if measure_memory else None
        log = proc.stderr if separate_stdout else proc.stdout
        assert log is not None
        try:
            if timer:
                timer.start()
            for line in log:
                line = line.rstrip("\n")
                lines.append(line)
                if on_line is not None:
                    on_line(line)
            os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)      # exited; still unreaped for its figures
            if peak:
                peak.stop()
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
        except BaseException:        # Ctrl-C, SIGTERM: the tool stops now, not when it is done
            proc.kill()
            proc.wait()
            raise
        finally:
            if timer:
                timer.cancel()
            if peak:
                peak.stop()
            log.close()
        if timed_out.is_set():
            raise ToolchainError(f"{name} did not finish within {timeout:g} s (stopped)")
        out.seek(0)
        stdout = out.read() if separate_stdout else ""
    return Finished(name, proc.returncode, lines, stdout, usage.ru_utime + usage.ru_stime,
                    peak.peak if peak else 0)


class _MemoryWatch:
    """The peak resident memory of a running child, polled from its ``VmHWM`` until it exits (``ru_maxrss``
    cannot serve: Linux carries the parent's RSS at fork time into it)."""

    def __init__(self, pid: int):
        self.peak, self._file, self._done = 0, Path(f"/proc/{pid}/status"), threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._done.wait(0.02):
            self.peak = max(self.peak, _vm_hwm(self._file))

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


def _vm_hwm(status_file: Path) -> int:
    try:
        for line in status_file.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def start(cmd: Sequence, *, log: IO[bytes], env: dict[str, str] | None = None,
          pass_fds: Sequence[int] = ()) -> subprocess.Popen:
    """Start a long-running llama.cpp process (llama-server): its own process group, its output into ``log``,
    SIGTERM when reamkit dies, the exit grace. Stop it with :func:`stop`."""
    environment = {**os.environ, "LLAMA_LOG_COLORS": "0", **linger_env(), **(env or {})}
    return subprocess.Popen([str(a) for a in cmd], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            pass_fds=tuple(pass_fds), start_new_session=True, env=environment,
                            preexec_fn=functools.partial(die_with_parent, signal.SIGTERM))


def stop(proc: subprocess.Popen, grace: float = 15.0, second_sigterm_after: float | None = None) -> None:
    """Stop a process from :func:`start` and its whole group: SIGTERM, then SIGKILL after ``grace`` seconds.
    With ``second_sigterm_after``, a second SIGTERM goes after that many seconds first: llama-server's SIGTERM
    handler can block for good while it generates (its main thread waits on a lock inside the handler, SIGTERM
    masked), and a second one makes it exit at once."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        if second_sigterm_after is not None:
            try:
                proc.wait(second_sigterm_after)
                return
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


@functools.cache
def linger_library() -> Path | None:
    """The exit-grace library (built on first use), or None where no C compiler is found (said once, on stderr)."""
    target = cache_root() / "native" / f"linger-{hashlib.sha256(SOURCE.encode()).hexdigest()[:12]}.so"
    if target.is_file():
        return target
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        print("reamkit: no C compiler found, so llama.cpp tools run without the exit grace; their last log lines "
              "can be lost on a loaded machine (reamkit then reruns them)", file=sys.stderr)
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src, lib = Path(tmp) / "linger.c", Path(tmp) / "linger.so"
        src.write_text(SOURCE)
        subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(lib), str(src)], check=True, capture_output=True)
        os.replace(lib, target)
    return target


def linger_env() -> dict[str, str]:
    """``LD_PRELOAD`` for a llama.cpp process's environment, keeping whatever the user preloads already."""
    lib = linger_library()
    if lib is None:
        return {}
    current = os.environ.get("LD_PRELOAD", "")
    return {"LD_PRELOAD": f"{current} {lib}".strip()}
