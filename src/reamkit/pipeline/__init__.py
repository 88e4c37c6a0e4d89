"""The release pipeline: compress -> convert -> imatrix -> quantize ladder(s) -> evaluate -> compare -> card, as
one resumable run in a run folder (see :mod:`.plan` for its layout), on local processes or a Ray cluster."""

from .config import RunConfig, load_config, validate
from .plan import Plan, Stage, build_plan
from .runner import RunResult, plan_for, run_pipeline, stage_rows

__all__ = ["Plan", "RunConfig", "RunResult", "Stage", "build_plan", "load_config", "plan_for", "run_pipeline",
           "stage_rows", "validate"]
