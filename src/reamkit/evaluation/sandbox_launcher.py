"""The sandbox's launcher: runs as a script (``python -I -S sandbox_launcher.py CONFIG STATUS_FD``), stdlib only.

Three processes, so the untrusted program never becomes the parent of anything we rely on::

    launcher (outside the namespaces) -- waits for init, exits with init's code
      └─ init  (pid 1 of a new pid namespace when available; keeps its privileges)
           └─ program (the untrusted interpreter: limits set, privileges dropped, exec'd)

Namespaces are created by ``unshare`` in the launcher, so init and program are inside them; when init exits the
kernel kills every process left in its pid namespace (fork bombs, ``setsid`` escapees). init and the program die
with their parent (``PR_SET_PDEATHSIG``), so killing the launcher tears everything down.

The launcher reports to the parent through ``STATUS_FD`` (close-on-exec, so the program never holds it), one JSON
object per line: ``{"error": "..."}`` when the sandbox could not be set up, ``{"exit": N}`` or ``{"signal": N}``
when the program ended.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import sys

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG = 1
PRIVATE_TMP = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")   # the usual world-writable places
_libc = ctypes.CDLL(None, use_errno=True)


class SetupError(Exception):
    pass


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise SetupError(f"{what}: {os.strerror(err)}")


def _report(fd: int, **msg) -> None:
    try:
        os.write(fd, (json.dumps(msg) + "\n").encode())
    except OSError:
        pass


def _die_with_parent(parent: int) -> None:
    """``parent`` is 0 for the init of a new pid namespace (its parent is outside: ``getppid()`` says 0)."""
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != parent:          # the parent died before the setting took effect
        os._exit(137)


def enter_namespaces(cfg: dict) -> None:
    flags = 0
    if cfg["userns"]:
        flags |= CLONE_NEWUSER
    if cfg["netns"]:
        flags |= CLONE_NEWNET
    if cfg["pidns"]:
        flags |= CLONE_NEWPID
    if cfg["private_tmp"]:
        flags |= CLONE_NEWNS
    if not flags:
        return
    _check(_libc.unshare(flags), f"unshare({flags:#x})")
    if cfg["userns"]:      # map our own uid/gid to themselves: nothing gains privileges outside
        uid, gid = os.getuid(), os.getgid()
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)


def _mount(src: str | None, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    enc = (lambda s: None if s is None else s.encode())
    _check(_libc.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {target}")


def private_workdir(cfg: dict, source: bytes) -> str:
    """Fresh size-capped tmpfs over every world-writable temp folder; the program's folder lives in one of them."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE, None)
    for d in PRIVATE_TMP:
        if os.path.isdir(d) and not os.path.islink(d):
            _mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, f"size={cfg['tmpfs_mb']}m,mode=1777")
    work = "/tmp/work"
    os.mkdir(work, 0o700)
    _write_program(work, source)
    if cfg["uid"] is not None:
        os.chown(work, cfg["uid"], cfg["gid"])
    return work


def _write_program(work: str, source: bytes) -> None:
    fd = os.open(os.path.join(work, "program.py"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(source)


def exec_program(cfg: dict, work: str, status: int, parent: int) -> None:
    """In the program's process: limits, privileges, exec. Never returns."""
    try:
        lim = cfg["limits"]
        cpu = max(1, int(lim["cpu_s"]))
        for res, value in ((resource.RLIMIT_AS, lim["memory_mb"] * 2**20), (resource.RLIMIT_FSIZE, lim["file_mb"] * 2**20),
                           (resource.RLIMIT_NOFILE, lim["open_files"]), (resource.RLIMIT_CORE, 0),
                           (resource.RLIMIT_NPROC, cfg["nproc"])):
            resource.setrlimit(res, (value, value))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        os.chdir(work)
        if cfg["uid"] is not None:
            os.setgroups([])
            os.setresgid(cfg["gid"], cfg["gid"], cfg["gid"])
            os.setresuid(cfg["uid"], cfg["uid"], cfg["uid"])
        _die_with_parent(parent)       # after the uid change, which clears it
        interp = cfg["interpreter"]
        os.execve(interp, [interp, "-I", "-S", "-B", "program.py"], cfg["env"])
    except (OSError, SetupError) as e:
        _report(status, error=f"starting the program: {e}")
    os._exit(125)


def run_init(cfg: dict, source: bytes, status: int, launcher: int) -> int:
    _die_with_parent(0 if cfg["pidns"] else launcher)
    if cfg["private_tmp"]:
        work = private_workdir(cfg, source)
    else:
        work = cfg["workdir"]
    me = os.getpid()
    child = os.fork()
    if child == 0:
        exec_program(cfg, work, status, me)
    while True:                         # as pid 1 we also reap orphans until our program is done
        pid, st = os.waitpid(-1, 0)
        if pid == child:
            break
    if os.WIFSIGNALED(st):
        _report(status, signal=os.WTERMSIG(st))
    else:
        _report(status, exit=os.WEXITSTATUS(st))
    return 0


def main() -> None:
    cfg = json.loads(sys.argv[1])
    status = int(sys.argv[2])
    os.set_inheritable(status, False)
    try:
        with open(os.path.join(cfg["workdir"], "program.py"), "rb") as f:
            source = f.read()
        enter_namespaces(cfg)
    except (OSError, SetupError) as e:
        _report(status, error=f"setting up the sandbox: {e}")
        sys.exit(125)
    launcher = os.getpid()
    init = os.fork()
    if init == 0:
        try:
            os._exit(run_init(cfg, source, status, launcher))
        except (OSError, SetupError) as e:
            _report(status, error=f"setting up the sandbox: {e}")
            os._exit(125)
    _, st = os.waitpid(init, 0)
    sys.exit(os.WEXITSTATUS(st) if os.WIFEXITED(st) else 128 + os.WTERMSIG(st))


if __name__ == "__main__":
    main()
