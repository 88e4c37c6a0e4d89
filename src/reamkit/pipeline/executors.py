"""Where stages run: local worker processes, or the tasks of an existing Ray cluster.

Both take a stage, run :func:`reamkit.pipeline.stages.run_stage` somewhere, and report back ``(handle, outcome,
error)``. The scheduling (what may run at once, the memory budget) stays in the runner, so both executors run
exactly the same stages with the same parameters and produce the same files. With Ray, every node must see the
run folder at the same path (a shared filesystem), and the reamkit environment.
"""

from __future__ import annotations

import multiprocessing as mp
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor
from concurrent.futures import wait as wait_futures

from ..children import die_with_parent
from ..errors import ReamkitError
from .stages import run_stage


def _error_text(e: BaseException) -> str:
    return getattr(e, "problem", None) or f"{type(e).__name__}: {e}"


class LocalExecutor:
    def __init__(self, workers: int):
        self.pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                                        initializer=die_with_parent)   # a killed run leaves no stray writer

    def submit(self, stage, run_dir: str) -> Future:
        return self.pool.submit(run_stage, stage.kind, stage.id, stage.params, stage.outputs, run_dir)

    def wait(self, handles: list[Future]):
        finished, _ = wait_futures(handles, return_when=FIRST_COMPLETED)
        for f in finished:
            e = f.exception()
            yield f, (None if e else f.result()), (_error_text(e) if e else None)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class RayExecutor:
    def __init__(self, address: str):
        try:
            import ray
        except ImportError:
            raise ReamkitError("--executor ray needs the ray package", fix="pip install 'reamkit[ray]'") from None
        self.ray = ray
        if not ray.is_initialized():
            try:
                ray.init(address=address, log_to_driver=False, include_dashboard=False)
            except ConnectionError as e:
                raise ReamkitError(f"no Ray cluster at {address!r}: {e}",
                                   fix="start one (ray start --head) or pass its address") from None
        self.remote = ray.remote(max_retries=0)(run_stage)

    def submit(self, stage, run_dir: str):
        gpus = 1 if str(stage.params.get("device", "")).startswith("cuda") else 0
        return self.remote.options(num_gpus=gpus).remote(stage.kind, stage.id, stage.params, stage.outputs, run_dir)

    def wait(self, handles: list):
        ready, _ = self.ray.wait(handles, num_returns=1)
        for ref in ready:
            try:
                yield ref, self.ray.get(ref), None
            except self.ray.exceptions.RayTaskError as e:
                yield ref, None, _error_text(e.cause) if getattr(e, "cause", None) else str(e)

    def close(self) -> None:
        pass        # the cluster is the user's: leave it running


def make_executor(cfg):
    if cfg.kind == "ray":
        return RayExecutor(cfg.ray_address)
    return LocalExecutor(cfg.workers)
