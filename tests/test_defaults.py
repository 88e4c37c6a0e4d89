"""Each default is defined once: the command line, ``release`` and the run configuration take theirs from the
same place as the stages' own options, so none of them can drift apart."""

from __future__ import annotations

import dataclasses

import pytest
import typer
from typer.testing import CliRunner

from reamkit.cli import app


def _cli_defaults(command: str) -> dict:
    params = typer.main.get_command(app).commands[command].params
    return {p.name: p.default for p in params}


def _stage_options():
    from reamkit.compression import CompressOptions
    from reamkit.evaluation.fidelity import FidelityOptions
    from reamkit.evaluation.humaneval import HumanEvalOptions
    from reamkit.evaluation.speed import SpeedOptions
    from reamkit.quantization import QuantizeOptions
    from reamkit.serving import ServeOptions

    return {  # command: (options class, {command-line parameter: options field})
        "compress": (CompressOptions, {"calib": "calib", "samples": "samples", "seq_len": "seq_len",
                                       "batch_size": "batch_size", "seed": "seed", "device": "device",
                                       "dtype": "compute_dtype", "output_dtype": "output_dtype",
                                       "drop_mtp": "drop_mtp", "memory_budget": "memory_budget_gb"}),
        "quantize": (QuantizeOptions, {"ladder": "ladder", "imatrix": "imatrix", "keep_type": "keep_type",
                                       "calibration": "calibration", "imatrix_chunks": "imatrix_chunks",
                                       "imatrix_ctx": "imatrix_ctx", "types": "types", "threads": "threads"}),
        "evaluate": (FidelityOptions, {"tokens": "tokens", "ctx": "ctx", "disk_budget_gb": "disk_budget_gb",
                                       "threads": "threads"}),
        "humaneval": (HumanEvalOptions, {"max_tokens": "max_tokens", "workers": "workers", "timeout": "timeout_s",
                                         "limit": "limit", "threads": "threads"}),
        "speed": (SpeedOptions, {"prompt": "prompt", "gen": "gen", "repetitions": "repetitions",
                                 "threads": "threads"}),
        "serve": (ServeOptions, {"host": "host", "port": "port", "ctx": "ctx", "parallel": "parallel",
                                 "cache_type": "cache_type", "max_body_mb": "max_body_mb",
                                 "cors_origins": "cors_origins", "layer_nice": "layer_nice",
                                 "allow_unknown_fields": "allow_unknown_fields", "strict_fields": "strict_fields"}),
    }


@pytest.mark.parametrize("command", ["compress", "quantize", "evaluate", "humaneval", "speed", "serve"])
def test_each_command_line_default_is_the_stage_options_default(command):
    cls, names = _stage_options()[command]
    fields = {f.name: f.default for f in dataclasses.fields(cls)}
    cli = _cli_defaults(command)
    got = {param: cli[param] for param in names}
    assert got == {param: fields[field] for param, field in names.items()}
    if command == "evaluate":
        assert tuple(cli["sets"].split(",")) == fields["sets"]


def test_fit_sizes_what_serve_starts_by_default():
    from reamkit.report.fit import parse_context
    from reamkit.serving import ServeOptions

    fit, serve = _cli_defaults("fit"), ServeOptions()
    assert (parse_context(fit["context"]), fit["parallel"], fit["cache_type"]) == \
        (serve.ctx, serve.parallel, serve.cache_type)


def test_the_run_configuration_shares_the_stages_defaults():
    """Where a run and a stage's own command mean the same setting, they default to the same value."""
    from reamkit.compression import CompressOptions
    from reamkit.evaluation.fidelity import FidelityOptions
    from reamkit.evaluation.speed import SpeedOptions
    from reamkit.pipeline.config import CompressConfig, EvaluateConfig, QuantizeConfig
    from reamkit.quantization import QuantizeOptions

    def same(config, options, names):
        return {n: getattr(config, n) for n in names} == {n: getattr(options, n) for n in names}

    assert same(CompressConfig(), CompressOptions(), ("calib", "samples", "seq_len", "batch_size", "seed", "device",
                                                      "drop_mtp"))
    assert same(QuantizeConfig(), QuantizeOptions(), ("ladder", "imatrix", "reference_dtype", "imatrix_chunks",
                                                      "imatrix_ctx"))
    ev = EvaluateConfig()
    assert same(ev, FidelityOptions(), ("tokens", "ctx"))
    assert tuple(ev.sets) == FidelityOptions().sets
    assert (ev.speed_prompt, ev.speed_gen) == (SpeedOptions().prompt, SpeedOptions().gen)


def test_release_without_flags_is_the_run_configurations_defaults(monkeypatch, tmp_path):
    """``reamkit release MODEL`` runs exactly what a config file holding only ``model`` runs; each flag given
    lands in its key."""
    import reamkit.cli as cli
    from reamkit.pipeline import validate
    from reamkit.zoo import build_cached

    model = build_cached("qwen3_moe")
    seen = []
    monkeypatch.setattr(cli, "_run_and_summarize", lambda cfg, output: seen.append(cfg))
    runner = CliRunner()
    res = runner.invoke(app, ["release", str(model), "-o", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    assert seen[0] == validate({"model": str(model)})

    res = runner.invoke(app, ["release", str(model), "-o", str(tmp_path / "run"), "--experts", "12", "--samples",
                              "64", "--types", "Q4_K_M", "--workers", "3", "--no-speed", "--name", "x"])
    assert res.exit_code == 0, res.output
    cfg = seen[1]
    assert (cfg.compress.experts, cfg.compress.ratio, cfg.compress.samples, cfg.quantize.types,
            cfg.executor.workers, cfg.evaluate.speed, cfg.name) == (12, None, 64, ["Q4_K_M"], 3, False, "x")
