"""Run one untrusted Python program (a model's HumanEval completion and its tests) without harming the host.

Design (the parts a reader must trust):

* **Processes.** Each program gets its own interpreter, started through ``sandbox_launcher.py`` in a new session
  (``start_new_session``), stdin ``/dev/null``, a scrubbed environment (``PATH``, ``LANG``, ``HOME`` only) and
  ``python -I -S -B``: the standard library only, no site-packages, no user paths.
* **Limits** (``rlimit``): address space, CPU seconds, file size, open files, no core dumps, process count; the
  parent enforces the wall-clock limit and reads stdout/stderr in bounded chunks, keeping at most
  ``output_bytes`` of each; past that the program is killed (so a 1 GB print neither fills memory nor disk).
* **Isolation, chosen once per process by probing, most isolated first:**

  - ``root`` (reamkit running as root, e.g. CI containers): new network, pid and mount namespaces; then the
    program drops to a **dedicated uid** (one per scorer process and parallel worker, no passwd entry). Root
    ignores ``RLIMIT_NPROC``, so dropping privileges is what makes the process limit (fork bombs) bite, and a
    dedicated uid (not ``nobody``) keeps a fork bomb from starving other daemons or workers. The program cannot
    signal root's processes, sees no network (loopback down), and writes only into fresh size-capped tmpfs
    mounts over ``/tmp``, ``/var/tmp``, ``/dev/shm`` and ``/run/lock`` (its working folder is ``/tmp/work``);
    everything else is root's and not writable to it.
  - ``userns`` (a normal user where unprivileged user namespaces are allowed): the same namespaces inside a user
    namespace that maps only the user's own uid. ``RLIMIT_NPROC`` (which counts all the user's processes) is set
    to what the user runs now plus ``processes``. The program keeps the user's uid, so outside the private tmpfs
    mounts it can write where the user can.
  - ``root-drop`` / ``plain`` (namespaces refused, e.g. a container without ``CAP_SYS_ADMIN``): limits and the
    dedicated uid (root) only, every process of that uid killed after each program. **The network is not
    isolated**; :func:`sandbox_facts` says so and the CLI prints
    it once.

  In every mode the pid-1 ``init`` of the sandbox (or the launcher) is the program's parent, so
  ``os.kill(os.getppid(), ...)`` or ``os.killpg`` hit the sandbox itself, never the scorer; when init exits the
  kernel kills whatever the program left in its pid namespace; the whole process group is killed at the end.
* **Interpreter.** A dropped uid must be able to run the interpreter: ``sys.executable`` if every folder on its
  real path is world-searchable (a venv under ``/root`` is not), else the first such system ``python3``
  (``/usr/bin/python3``). HumanEval programs need only the standard library.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

from ..errors import ReamkitError

LAUNCHER = Path(__file__).with_name("sandbox_launcher.py")
UID_BASE = 1_900_000_000          # dedicated uids UID_BASE + 64 * pid + slot: far above any allocated range
MAX_SLOTS = 64
SYSTEM_PYTHONS = ("/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3")


class SandboxError(ReamkitError):
    """The sandbox itself could not be set up (never a program's own failure)."""


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 10.0        # wall clock
    cpu_s: int = 10
    memory_mb: int = 1024          # RLIMIT_AS
    processes: int = 32            # RLIMIT_NPROC (per dedicated uid; on top of the user's own in userns/plain)
    file_mb: int = 16              # RLIMIT_FSIZE
    open_files: int = 64           # RLIMIT_NOFILE
    output_bytes: int = 64 * 1024  # kept of stdout and of stderr each; more kills the program
    tmpfs_mb: int = 64             # each private tmpfs (root and userns modes)


@dataclass(frozen=True)
class SandboxFacts:
    mode: str                      # root, userns, root-drop or plain
    network_isolated: bool
    pid_namespace: bool
    private_tmp: bool
    dedicated_uid: bool
    interpreter: str
    note: str = ""                 # what is not isolated, and why (empty when everything is)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class SandboxRun:
    """How a program ended: ``exit_code`` or ``signal``, or ``timed_out`` / ``output_exceeded`` (then killed)."""
    exit_code: int | None = None
    signal: int | None = None
    timed_out: bool = False
    output_exceeded: bool = False
    stdout: str = ""
    stderr: str = ""
    seconds: float = 0.0
    error: str | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out and not self.output_exceeded


_MODES = {   # mode -> (userns, netns, pidns, private_tmp, dedicated uid)
    "root": (False, True, True, True, True),
    "userns": (True, True, True, True, False),
    "root-drop": (False, False, False, False, True),
    "plain": (False, False, False, False, False),
}


def world_runnable(path: str) -> bool:
    """Whether a process of any uid can execute ``path``: every folder on its real path o+x, the file o+rx."""
    real = os.path.realpath(path)
    try:
        if not stat.S_IMODE(os.stat(real).st_mode) & 0o005 == 0o005:
            return False
        parts = Path(real).parents
        return all(os.stat(p).st_mode & 0o001 for p in parts)
    except OSError:
        return False


def pick_interpreter(dropping: bool) -> str:
    if not dropping:
        return sys.executable
    for cand in (sys.executable, *SYSTEM_PYTHONS):
        if os.path.isfile(cand) and world_runnable(cand):
            return os.path.realpath(cand)
    raise SandboxError("no Python interpreter that an unprivileged uid may run (the venv's is not world-readable)",
                       fix="install a system python3 (e.g. /usr/bin/python3)")


def _user_processes() -> int:
    uid = os.getuid()
    n = 0
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and p.stat().st_uid == uid:
                n += 1
        except OSError:
            pass
    return n


def _config(mode: str, workdir: Path, limits: SandboxLimits, slot: int, interpreter: str) -> dict:
    userns, netns, pidns, private_tmp, drop = _MODES[mode]
    if not 0 <= slot < MAX_SLOTS:
        raise SandboxError(f"at most {MAX_SLOTS} sandboxed programs at once (slot {slot})")
    uid = dedicated_uid(slot) if drop else None
    nproc = limits.processes if drop else _user_processes() + limits.processes
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/tmp/work" if private_tmp else str(workdir)}
    return {"userns": userns, "netns": netns, "pidns": pidns, "private_tmp": private_tmp, "uid": uid,
            "gid": uid, "nproc": nproc, "workdir": str(workdir), "interpreter": interpreter, "env": env,
            "tmpfs_mb": limits.tmpfs_mb, "limits": asdict(limits)}


def dedicated_uid(slot: int) -> int:
    """The uid a slot's programs run as (root modes): unique to this scorer process and slot, used by no one else."""
    return UID_BASE + MAX_SLOTS * os.getpid() + slot


def _kill_uid(uid: int, interpreter: str) -> None:
    """Kill every process of a dedicated uid: ``kill(-1)`` from a helper running as that uid (it spares itself).

    Without a pid namespace this is what catches a fork bomb's children that left the process group."""
    code = "import os, signal\ntry:\n    os.kill(-1, signal.SIGKILL)\nexcept ProcessLookupError:\n    pass\n"
    for _ in range(2):
        subprocess.run([interpreter, "-I", "-S", "-c", code], user=uid, group=uid, extra_groups=[],
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=30, cwd="/")


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _run(mode: str, source: str, limits: SandboxLimits, slot: int, interpreter: str) -> SandboxRun:
    workdir = Path(tempfile.mkdtemp(prefix="reamkit-sandbox-"))
    try:
        (workdir / "program.py").write_text(source, encoding="utf-8")
        cfg = _config(mode, workdir, limits, slot, interpreter)
        if cfg["uid"] is not None and not cfg["private_tmp"]:
            os.chown(workdir, cfg["uid"], cfg["gid"])
        return _supervise(cfg, limits)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _supervise(cfg: dict, limits: SandboxLimits) -> SandboxRun:
    status_r, status_w = os.pipe()
    start = time.monotonic()
    try:
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-B", str(LAUNCHER), json.dumps(cfg), str(status_w)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                pass_fds=(status_w,), start_new_session=True, cwd=cfg["workdir"],
                                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
    finally:
        os.close(status_w)
    run = SandboxRun()
    bufs = {"stdout": bytearray(), "stderr": bytearray(), "status": bytearray()}
    sel = selectors.DefaultSelector()
    for name, fd in (("stdout", proc.stdout.fileno()), ("stderr", proc.stderr.fileno()), ("status", status_r)):
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ, name)
    deadline = start + limits.timeout_s
    exited_at = None
    try:
        while sel.get_map():
            now = time.monotonic()
            if now >= deadline:
                run.timed_out = True
                break
            if proc.poll() is not None:           # init is gone: give stragglers' pipes a moment, then stop
                exited_at = exited_at or now
                if now - exited_at > 0.5:
                    break
            for key, _ in sel.select(timeout=min(0.05, max(0.0, deadline - now))):
                try:
                    chunk = os.read(key.fd, 65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                buf = bufs[key.data]
                room = limits.output_bytes - len(buf) if key.data != "status" else 65536 - len(buf)
                buf += chunk[:max(0, room)]
                if len(chunk) > room and key.data != "status":
                    run.output_exceeded = True
            if run.output_exceeded:
                break
    finally:
        _kill_group(proc.pid)
        proc.kill()
        proc.wait()
        _kill_group(proc.pid)
        sel.close()
        os.close(status_r)
        proc.stdout.close()
        proc.stderr.close()
        if cfg["uid"] is not None and not cfg["pidns"]:
            _kill_uid(cfg["uid"], cfg["interpreter"])
    run.seconds = time.monotonic() - start
    run.stdout = bufs["stdout"].decode("utf-8", "replace")
    run.stderr = bufs["stderr"].decode("utf-8", "replace")
    for line in bufs["status"].decode("utf-8", "replace").splitlines():
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        run.error = msg.get("error", run.error)
        run.exit_code = msg.get("exit", run.exit_code)
        run.signal = msg.get("signal", run.signal)
    if run.exit_code is None and run.signal is None and not run.timed_out and not run.output_exceeded \
            and run.error is None:
        run.signal = signal.SIGKILL          # init (or the launcher) was killed before it could report
    return run


def _probe(mode: str) -> tuple[bool, str]:
    try:
        interp = pick_interpreter(_MODES[mode][4])
    except SandboxError as e:
        return False, e.problem
    run = _run(mode, "print('sandbox-ok')\n", SandboxLimits(timeout_s=20), 0, interp)
    if run.ok and run.stdout.strip() == "sandbox-ok":
        return True, ""
    return False, run.error or (run.stderr.strip().splitlines() or [f"exit {run.exit_code}, signal {run.signal}"])[-1]


@lru_cache(maxsize=1)
def sandbox_facts() -> SandboxFacts:
    """The most isolated mode that works here (probed once per process with a one-line program)."""
    order = ("root", "root-drop") if os.geteuid() == 0 else ("userns", "plain")
    refused = ""
    for mode in order:
        ok, why = _probe(mode)
        if ok:
            userns, netns, pidns, private_tmp, drop = _MODES[mode]
            note = "" if netns else (f"network NOT isolated: namespaces are refused here ({refused}); sandboxed "
                                     "programs can reach the network")
            if mode == "userns":
                note = "programs run as your uid: outside the private /tmp they can write where you can"
            return SandboxFacts(mode, netns, pidns, private_tmp, drop, pick_interpreter(drop), note)
        refused = refused or why
    raise SandboxError(f"cannot start a sandboxed program here: {refused}")


def run_program(source: str, limits: SandboxLimits | None = None, *, slot: int = 0) -> SandboxRun:
    """Run ``source`` as a Python program in the sandbox; ``slot`` (0..workers-1) keeps parallel runs apart."""
    facts = sandbox_facts()
    run = _run(facts.mode, source, limits or SandboxLimits(), slot, facts.interpreter)
    if run.error is not None:
        raise SandboxError(f"the sandbox failed: {run.error}")
    return run
