"""Where stages run: local worker processes, or the tasks of an existing Ray cluster.

Both take a stage, run :func:`reamkit.pipeline.stages.run_stage` somewhere, and report back ``(handle, outcome,
error)``. The scheduling (what may run at once, the memory budget) stays in the runner, so both executors run
exactly the same stages with the same parameters and produce the same files. With Ray, every node must see the
run folder at the same path (a shared filesystem), and the reamkit environment.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import sys
import tempfile
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor
from concurrent.futures import wait as wait_futures

from ..children import die_with_parent
from ..errors import ReamkitError, machine_error
from .stages import run_stage


def _error_text(e: BaseException) -> str:
    known = machine_error(e)
    if known is not None:
        return str(known)
    return " ".join(f"{type(e).__name__}: {e}".split())


def _worker_init() -> None:  # pragma: no cover - runs in the worker
    """A killed run leaves no stray writer; Ctrl-C reaches the run, which stops the workers itself (no worker
    prints a traceback of its own)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent()


class LocalExecutor:
    def __init__(self, workers: int):
        self.pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                                        initializer=_worker_init)

    def submit(self, stage, run_dir: str) -> Future:
        return self.pool.submit(run_stage, stage.kind, stage.id, stage.params, stage.outputs, run_dir)

    def wait(self, handles: list[Future]):
        finished, _ = wait_futures(handles, return_when=FIRST_COMPLETED)
        for f in finished:
            e = f.exception()
            yield f, (None if e else f.result()), (_error_text(e) if e else None)

    def stop(self) -> None:
        """Kill every worker now (their tools die with them), for an interrupted run."""
        procs = list((self.pool._processes or {}).values())
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.join(1)
        # The pool's manager thread closes its wake-up pipe as it ends; CPython's exit hook writing to that pipe
        # while it closes raced ("Bad file descriptor" after a Ctrl-C): wait for it (shutdown() forgets it).
        manager = getattr(self.pool, "_executor_manager_thread", None)
        self.pool.shutdown(wait=False, cancel_futures=True)
        if manager is not None:
            manager.join(5)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class RayExecutor:
    def __init__(self, address: str):
        # the driver asks the cluster 20 times, a second apart, before it gives up; 5 tell a refusal as well
        os.environ.setdefault("RAY_NUM_REDIS_GET_RETRIES", "5")
        # Ray gives a token only to address="auto"; a cluster joined by its address needs it as well (a local
        # ``ray.init()`` or ``ray start`` enables token authentication by default and saves the token there)
        if "RAY_AUTH_MODE" not in os.environ and (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get(
                "RAY_AUTH_TOKEN_PATH") or os.path.isfile(os.path.expanduser("~/.ray/auth_token"))):
            os.environ["RAY_AUTH_MODE"] = "token"
        try:
            import ray
        except ImportError:
            raise ReamkitError("--executor ray needs the ray package", fix="pip install 'reamkit[ray]'") from None
        self.ray = ray
        self.refs: set = set()
        if not ray.is_initialized():
            _probe(address)
            with _captured_stderr() as said:        # Ray's C++ client logs its retries there, many lines
                try:
                    ray.init(address=address, log_to_driver=False, include_dashboard=False)
                    failure = None
                except Exception as e:  # noqa: BLE001 - ConnectionError, AuthenticationError, ...: one line
                    failure = e
                logged = said()
            if failure is not None:
                text = " ".join(str(failure).split())
                if type(failure).__name__ == "AuthenticationError" or "Unauthenticated" in logged:
                    raise ReamkitError(f"the Ray cluster at {address!r} refused this client: its token "
                                       "authentication failed (token missing or different)",
                                       fix="set RAY_AUTH_MODE=token and the cluster's RAY_AUTH_TOKEN") from None
                raise ReamkitError(f"cannot join the Ray cluster at {address!r}: {text[:300]}",
                                   fix="start one (ray start --head) or pass its address") from None
        self.remote = ray.remote(max_retries=0)(run_stage)

    def submit(self, stage, run_dir: str):
        gpus = 1 if str(stage.params.get("device", "")).startswith("cuda") else 0
        ref = self.remote.options(num_gpus=gpus).remote(stage.kind, stage.id, stage.params, stage.outputs, run_dir)
        self.refs.add(ref)
        return ref

    def wait(self, handles: list):
        ready, _ = self.ray.wait(handles, num_returns=1)
        for ref in ready:
            self.refs.discard(ref)
            try:
                yield ref, self.ray.get(ref), None
            except self.ray.exceptions.RayTaskError as e:
                cause = getattr(e, "cause", None)
                yield ref, None, _error_text(cause) if cause is not None else _ray_failure(e)
            except self.ray.exceptions.RayError as e:         # the worker or its node died, the task was lost
                yield ref, None, _ray_failure(e)

    def stop(self) -> None:
        for ref in list(self.refs):
            try:
                self.ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001 - already finished or lost
                pass

    def close(self) -> None:
        pass        # the cluster is the user's: leave it running


@contextlib.contextmanager
def _captured_stderr():
    """File descriptor 2 into a temporary file for the block; yields a function returning what was written."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile("w+b") as f:
        os.dup2(f.fileno(), 2)
        try:
            yield lambda: (f.seek(0), f.read().decode(errors="replace"))[1]
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def _ray_failure(e: BaseException) -> str:
    what = {"WorkerCrashedError": "the Ray worker running it died", "NodeDiedError": "the Ray node running it died",
            "OutOfMemoryError": "Ray killed its worker for lack of memory"}.get(type(e).__name__)
    first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
    return f"{what} ({type(e).__name__})" if what else f"{type(e).__name__}: {first[:200]}"


def _probe(address: str, timeout: float = 5.0) -> None:
    """An explicit ``host:port`` must accept a connection within seconds (ray.init itself retries for minutes)."""
    import socket

    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return            # "auto", "local": ray.init answers those at once
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise ReamkitError(f"no Ray cluster listening at {address} ({e.strerror or e})",
                           fix="start one (ray start --head) or pass its address") from None


def make_executor(cfg):
    if cfg.kind == "ray":
        return RayExecutor(cfg.ray_address)
    return LocalExecutor(cfg.workers)
