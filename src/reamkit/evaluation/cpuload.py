"""How busy the machine is while we measure: CPU time other processes took, from ``/proc/stat``, and the cores
left free for a benchmark; and the last-level cache size, below which the memory-bandwidth bound does not apply.

Other processes' CPU = all CPU time spent on the CPUs we may run on (``/proc/stat``: user, nice, system, irq,
softirq, steal) minus our own process tree's (this process, ``getrusage``, and the benchmark child, from
``wait4``). Two llama.cpp threads on two cores spin at their barriers, so one descheduled thread stalls the
other: a small share taken by someone else slows a measurement far more than that share.

CPU time taken shows what others got, not what they wanted: a busy loop beside a one-thread benchmark on two
cores gets about one core and looks like it kept to the free one, while the benchmark's thread in fact waits
for a CPU a third of the time. So the watch also samples the run queue (``procs_running`` in ``/proc/stat``):
more runnable tasks than CPUs, on average over the measurement, means someone waited, and that is busy too.
"""

from __future__ import annotations

import os
import resource
import threading
import time
from dataclasses import dataclass
from pathlib import Path

BUSY_TOLERANCE_CORES = 0.2      # others may take this much more than the cores we left free
RUNQUEUE_TOLERANCE = 0.5        # runnable tasks beyond the CPUs, on average, before a measurement is busy
RUNQUEUE_PERIOD_S = 0.02


def our_cpus() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def busy_seconds(cpus: set[int] | None = None) -> float:
    """CPU seconds spent (not idle, not iowait) on ``cpus`` since boot, from ``/proc/stat``."""
    cpus = our_cpus() if cpus is None else cpus
    hz = os.sysconf("SC_CLK_TCK")
    total = 0
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return 0.0
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu":
            continue
        try:
            if int(name[3:]) not in cpus:
                continue
            v = [int(x) for x in fields[:8]]
        except ValueError:
            continue
        user, nice, system, _idle, _iowait, irq, softirq, steal = (v + [0] * 8)[:8]
        total += user + nice + system + irq + softirq + steal
    return total / hz


def self_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


@dataclass
class Load:
    wall_s: float
    others_cores: float          # cores' worth of CPU other processes took on our CPUs, on average
    ours_cores: float
    n_cpus: int
    runnable: float | None = None   # mean runnable tasks (the watch's sampler not counted); None: not sampled

    def busy(self, threads: int) -> bool:
        """Others took more than the cores the benchmark left free (plus a small tolerance), or more tasks wanted
        a CPU than there are, on average (someone, perhaps the benchmark, waited in the run queue)."""
        took = self.others_cores > max(0, self.n_cpus - threads) + BUSY_TOLERANCE_CORES
        queued = self.runnable is not None and self.runnable > self.n_cpus + RUNQUEUE_TOLERANCE
        return took or queued

    def as_dict(self) -> dict:
        return {"wall_s": round(self.wall_s, 3), "others_cores": round(self.others_cores, 3),
                "ours_cores": round(self.ours_cores, 3), "n_cpus": self.n_cpus,
                "runnable": None if self.runnable is None else round(self.runnable, 2)}


def runnable_tasks() -> int | None:
    """Tasks running or waiting for a CPU right now, machine-wide (``procs_running``), None where unreadable."""
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("procs_running "):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


class _RunQueue(threading.Thread):
    """Samples :func:`runnable_tasks` until stopped; the sampler itself is running while it reads, so it is not
    counted."""

    def __init__(self):
        super().__init__(daemon=True, name="reamkit-runqueue")
        self.samples: list[int] = []
        self.done = threading.Event()

    def run(self):
        while not self.done.wait(RUNQUEUE_PERIOD_S):
            n = runnable_tasks()
            if n is None:
                return
            self.samples.append(max(0, n - 1))

    def stop(self) -> float | None:
        self.done.set()
        self.join()
        return sum(self.samples) / len(self.samples) if self.samples else None


class CpuWatch:
    """Start before a measurement, :meth:`stop` after it with the children's CPU seconds (from ``wait4``)."""

    def __init__(self):
        self.cpus = our_cpus()
        self.t0 = time.monotonic()
        self.busy0 = busy_seconds(self.cpus)
        self.self0 = self_seconds()
        self.queue = _RunQueue()
        self.queue.start()

    def stop(self, children_s: float = 0.0) -> Load:
        runnable = self.queue.stop()
        wall = max(time.monotonic() - self.t0, 1e-6)
        busy = busy_seconds(self.cpus) - self.busy0
        ours = self_seconds() - self.self0 + children_s
        # ours may run on CPUs outside the set only if affinity changed meanwhile; never report negative others
        return Load(wall_s=wall, others_cores=max(0.0, busy - ours) / wall, ours_cores=ours / wall,
                    n_cpus=len(self.cpus), runnable=runnable)


def free_cores(sample_s: float = 0.5) -> int:
    """Cores not taken by other processes right now (at least 1), from a short ``/proc/stat`` sample."""
    w = CpuWatch()
    time.sleep(sample_s)
    load = w.stop()
    wanted = max(load.others_cores, load.runnable or 0.0)     # busy loops that share a core still want one each
    return max(1, min(load.n_cpus, int(load.n_cpus - wanted + 0.5)))


def last_level_cache_bytes() -> int | None:
    """Size of cpu0's largest-level cache (``/sys/devices/system/cpu/cpu0/cache``), None where not exposed."""
    best: tuple[int, int] | None = None
    for d in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            level = int((d / "level").read_text())
            if (d / "type").read_text().strip() == "Instruction":
                continue
            size = _size((d / "size").read_text().strip())
        except (OSError, ValueError):
            continue
        if best is None or level > best[0]:
            best = (level, size)
    return best[1] if best else None


def _size(text: str) -> int:
    units = {"K": 1024, "M": 1024**2, "G": 1024**3}
    return int(text[:-1]) * units[text[-1].upper()] if text and text[-1].upper() in units else int(text)
