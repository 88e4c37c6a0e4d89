"""The run configuration: one TOML file (``reamkit run CONFIG.toml``) or the same fields as flags
(``reamkit release MODEL ...``), validated in full before any work starts.

Every table forbids unknown keys, and every error names the offending key as a dotted path
(``compress.experts: ...``), so a typo is one clear line instead of a silently ignored setting. Every key but
``model`` has a default (from :mod:`reamkit.defaults`, as the stages' own commands):

    model = "path/to/model"            # a Hugging Face folder, or hf:org/name
    name = "my-model"                  # file-name stem of the outputs (default: the folder's name)

    [compress]                         # leave out, or methods = [], for no compression
    methods = ["reap"]
    experts = 384                      # or: ratio, the fraction of experts removed
    calib = "code=1"

    [quantize]
    types = ["Q4_K_M", "Q8_0"]         # default: the 11-type ladder

    [evaluate]
    tokens = 2048                      # scored tokens per held-out set
    humaneval_limit = 0                # 0: no HumanEval

    [executor]
    kind = "local"                     # or "ray"
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .. import defaults
from ..errors import ReamkitError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CompressConfig(_Strict):
    methods: list[str] = list(defaults.RUN_METHODS)
    experts: int | None = None
    ratio: float | None = defaults.RUN_RATIO
    calib: str = defaults.CALIB_MIX
    samples: int = Field(defaults.CALIB_SAMPLES, ge=1)
    seq_len: int = Field(defaults.CALIB_SEQ_LEN, ge=8)
    batch_size: int = Field(defaults.CALIB_BATCH_SIZE, ge=1)
    seed: int = defaults.CALIB_SEED
    device: str = defaults.DEVICE
    drop_mtp: bool = False

    @model_validator(mode="before")
    @classmethod
    def _one_target(cls, data):
        if isinstance(data, dict) and data.get("experts") is not None and "ratio" not in data:
            data = {**data, "ratio": None}       # experts given: the default ratio steps aside
        return data

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, v: list[str]) -> list[str]:
        from ..compression.methods import METHODS

        unknown = [m for m in v if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method {', '.join(unknown)}; choose from {', '.join(METHODS)}")
        if len(set(v)) != len(v):
            raise ValueError("a method is listed twice")
        return v


class QuantizeConfig(_Strict):
    types: list[str] | None = None            # None: the 11-type ladder
    ladder: Literal["static", "moe-aware"] = defaults.LADDER_KIND
    imatrix: Literal["auto", "none"] = defaults.IMATRIX
    reference_dtype: Literal["auto", "f16", "bf16", "f32"] = defaults.REFERENCE_DTYPE
    imatrix_chunks: int = Field(defaults.IMATRIX_CHUNKS, ge=1)
    imatrix_ctx: int = Field(defaults.IMATRIX_CTX, ge=32)

    @field_validator("types")
    @classmethod
    def _known_types(cls, v: list[str] | None) -> list[str] | None:
        from ..quantization import parse_types

        if v is None:
            return v
        try:
            return parse_types(v)
        except ReamkitError as e:
            raise ValueError(e.problem) from None


class EvaluateConfig(_Strict):
    tokens: int = Field(defaults.EVAL_TOKENS, ge=100)
    ctx: int = Field(defaults.EVAL_CTX, ge=32)
    sets: list[Literal["code", "math"]] = list(defaults.EVAL_SETS)
    humaneval_limit: int = Field(defaults.HUMANEVAL_PROBLEMS, ge=0, le=defaults.HUMANEVAL_PROBLEMS)
    humaneval_max_tokens: int = Field(defaults.RUN_HUMANEVAL_MAX_TOKENS, ge=1)
    speed: bool = True
    speed_prompt: int = Field(defaults.SPEED_PROMPT, ge=1)
    speed_gen: int = Field(defaults.SPEED_GEN, ge=1)
    speed_repetitions: int = Field(defaults.RUN_SPEED_REPETITIONS, ge=1)
    threads: int | None = Field(None, ge=1)


class ExecutorConfig(_Strict):
    kind: Literal["local", "ray"] = defaults.EXECUTOR
    workers: int = Field(defaults.WORKERS, ge=1)   # parallel per-variant jobs (quantize, evaluate)
    memory_gb: float | None = Field(None, gt=0)   # default: MEMORY_SHARE of the available memory
    ray_address: str = defaults.RAY_ADDRESS


class RunConfig(_Strict):
    model: str
    name: str | None = None
    description: str | None = None             # a paragraph for the model card (what this model is)
    compress: CompressConfig = CompressConfig()
    quantize: QuantizeConfig = QuantizeConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    executor: ExecutorConfig = ExecutorConfig()

    @property
    def model_name(self) -> str:
        return self.name or Path(self.model.removeprefix("hf:")).name


def _where(loc: tuple) -> str:
    return ".".join(str(p) for p in loc if not isinstance(p, int)) or "config"


def validate(data: dict, *, source: str = "config") -> RunConfig:
    """A :class:`RunConfig` from plain data, or one :class:`ReamkitError` naming the first bad key."""
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        msg = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            msg = "unknown key"
        elif first["type"] == "missing":
            msg = "missing"
        raise ReamkitError(f"{source}: {_where(first['loc'])}: {msg}") from None
    check_against_model(cfg, source)
    return cfg


def load_config(path: Path) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise ReamkitError(f"no such config file: {path}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ReamkitError(f"{path} is not valid TOML: {e}") from None
    model = data.get("model")
    if isinstance(model, str) and not model.startswith("hf:") and not Path(model).is_absolute():
        data["model"] = str((path.parent / model).resolve())     # relative to the config file
    return validate(data, source=str(path))


def check_against_model(cfg: RunConfig, source: str) -> None:
    """What only the model can tell: that it exists and that the compression target is possible."""
    from ..calibration.mixture import check_tokenizer
    from ..compression.driver import resolve_target
    from ..models import open_model

    if not cfg.model.startswith("hf:") and not (Path(cfg.model) / "config.json").is_file():
        raise ReamkitError(f"{source}: model: no model folder with a config.json at {cfg.model}")
    try:
        opened = open_model(cfg.model)
        check_tokenizer(opened.path)
    except ReamkitError as e:
        raise ReamkitError(f"{source}: model: {e.problem}", fix=e.fix) from None
    if not cfg.compress.methods:
        return
    adapter, config = opened.adapter, opened.config
    if not adapter.moe_layers(config):
        raise ReamkitError(f"{source}: compress.methods: the model has no MoE layers; use methods = []")
    try:
        resolve_target(adapter.num_experts(config), adapter.routing(config).top_k,
                       cfg.compress.experts, cfg.compress.ratio)
    except ReamkitError as e:
        key = "compress.experts" if cfg.compress.experts is not None else "compress.ratio"
        raise ReamkitError(f"{source}: {key}: {e.problem}") from None


def to_toml(cfg: RunConfig) -> str:
    """The validated configuration as TOML (what ``RUN/run.toml`` holds; ``reamkit run`` reads it back)."""
    import tomli_w

    def drop_none(d):
        return {k: drop_none(v) if isinstance(v, dict) else v for k, v in d.items() if v is not None}

    return tomli_w.dumps(drop_none(cfg.model_dump(mode="json")))
