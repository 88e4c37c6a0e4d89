"""The ``reamkit`` command."""

from __future__ import annotations

import atexit
import functools
import gc
import os
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from . import defaults as d
from .errors import Interrupted, ReamkitError, Terminated, machine_error

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# The interpreter's last collections at exit walk every object torch and transformers made (over a second after a
# compression); the memory goes back to the system anyway, so the objects are taken out of their sight first.
atexit.register(gc.freeze)

app = typer.Typer(
    name="reamkit",
    help="Compress giant MoE coding models (REAM/REAP), convert and quantize them to GGUF, evaluate and serve them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out = Console()
err = Console(stderr=True)

RUN_DIR = Path("reamkit-run")            # default run folder of ``run`` and ``release``
EVAL_DIR = Path("reamkit-eval")          # default run folder of ``evaluate``, ``humaneval`` and ``speed``


def _zoo_families() -> type[Enum]:
    from .zoo import FAMILIES

    return Enum("Family", {name: name for name in ("demo", *FAMILIES)}, type=str)


Family = _zoo_families()          # "demo" and every zoo family


class Executor(str, Enum):
    local = "local"
    ray = "ray"


class GGUFType(str, Enum):
    f32 = "f32"
    f16 = "f16"
    bf16 = "bf16"


def user_errors(fn):
    """Turn every error a user or the machine can cause (a ReamkitError, an OSError such as a full disk, Ctrl-C,
    SIGTERM) into one line on stderr and a non-zero exit; no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        restore = _sigterm_unwinds()
        try:
            return fn(*args, **kwargs)
        except ReamkitError as e:
            _fail(e)
        except KeyboardInterrupt as e:
            stopped = Interrupted("interrupted" + (" (SIGTERM)" if isinstance(e, Terminated) else ""),
                                  fix="finished work is kept: rerun the same command to resume")
            if isinstance(e, Terminated):
                stopped.exit_code = 143
            _fail(stopped)
        except Exception as e:
            known = machine_error(e)         # a full disk, a read-only folder: one line; anything else is a bug
            if known is None:
                raise
            _fail(known)
        finally:
            restore()

    return wrapper


def _fail(e: ReamkitError) -> None:
    err.print(f"[bold red]error:[/] {e}", markup=True, highlight=False, soft_wrap=True)
    raise typer.Exit(e.exit_code) from None


def _sigterm_unwinds():
    """While a command runs, SIGTERM unwinds the main process like Ctrl-C (children stopped, one line)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def raise_terminated(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    return lambda: signal.signal(signal.SIGTERM, previous)


@app.command()
@user_errors
def doctor() -> None:
    """Print the versions of the pinned toolchain and the paths of the llama.cpp tools."""
    from .llamacpp.doctor import doctor_checks

    checks = doctor_checks()
    width = max(len(c.name) for c in checks)
    for c in checks:
        mark = "[green]ok[/]  " if c.ok else "[red]FAIL[/]"
        line = f"{mark} {c.name.ljust(width)}  {c.detail}"
        if not c.ok and c.fix:
            line += f"  [yellow]-> {c.fix}[/]"
        out.print(line, highlight=False, soft_wrap=True)
    if not all(c.ok for c in checks):
        raise typer.Exit(1)


@app.command()
@user_errors
def zoo(
    family: Annotated[Family, typer.Argument(help="model family of the tiny model")],
    output: Annotated[Path, typer.Option("-o", "--output", help="folder to write the model to")],
    seed: Annotated[int, typer.Option(help="random seed of the weights")] = 0,
    mtp: Annotated[bool, typer.Option("--mtp", help="add a Hub-style mtp.* block (qwen3_next only)")] = False,
) -> None:
    """Write a tiny model of FAMILY as a Hugging Face model folder: ``demo`` is the built-in trained coding
    model (real, specialised experts); the families are deterministic random-weight models for tests."""
    from .zoo import write_demo_model, write_zoo_model

    if family is Family.demo:
        if mtp or seed:
            raise ReamkitError("the trained demo model has fixed weights: --seed and --mtp apply to the families")
        path = write_demo_model(output)
        out.print(f"wrote the trained demo model (demo-coder) to {path}")
        return
    with err.status(f"building tiny {family.value} model"):
        path = write_zoo_model(family.value, output, seed=seed, mtp=mtp)
    out.print(f"wrote {family.value} model to {path}")


@app.command()
@user_errors
def convert(
    model: Annotated[str, typer.Argument(help="Hugging Face model folder, or hf:ORG/NAME for a Hub repo")],
    output: Annotated[Path, typer.Option("-o", "--output", help="GGUF file to write")],
    dtype: Annotated[GGUFType, typer.Option("--dtype", help="tensor type of the GGUF")] = GGUFType(d.GGUF_DTYPE),
    fallback_pre: Annotated[str, typer.Option(help="pre-tokenizer for tokenizers the converter does not know")] = d.FALLBACK_PRE,
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="show the converter's log")] = False,
) -> None:
    """Convert a checkpoint to GGUF with the pinned llama.cpp converter."""
    from .gguf import convert_to_gguf

    def show(line: str) -> None:
        if verbose:
            err.print(line, markup=False, highlight=False, soft_wrap=True)
        else:
            status.update(f"converting {model} -> {output} ({dtype.value}): {line[:90]}")

    with err.status(f"converting {model} -> {output}") as status:
        path, done = convert_to_gguf(model, output, dtype=dtype.value, fallback_pre=fallback_pre, on_line=show)
    size = path.stat().st_size / 2**20
    out.print(f"{'wrote' if done else 'up to date:'} {path} ({size:.1f} MiB, {dtype.value})")


@app.command(help=f"The main job on the built-in trained demo model: REAM and REAP at {d.RUN_RATIO:.0%} fewer "
             "experts plus the uncompressed model, each through the 11-type ladder, evaluated, compared and carded "
             "(resumable: rerun to continue).")
@user_errors
def demo(
    output: Annotated[Path, typer.Option("-o", "--output", help="folder for the demo outputs")] = Path("demo-out"),
    executor: Annotated[Executor, typer.Option(help="local processes or an existing Ray cluster")] = Executor(d.EXECUTOR),
) -> None:
    from .pipeline import validate
    from .pipeline.demo import demo_config
    from .zoo import write_demo_model

    model_dir = write_demo_model(output / "demo-coder")
    out.print(f"model: {model_dir} (the trained demo model; its card: {model_dir / 'README.md'})", highlight=False)
    cfg = validate(demo_config(model_dir, executor=executor.value), source="demo")
    _run_and_summarize(cfg, output / "run")


class AgentClient(str, Enum):
    claude_code = "claude-code"
    codex = "codex"
    cline = "cline"
    continue_ = "continue"
    aider = "aider"


@app.command()
@user_errors
def serve(
    model: Annotated[str | None, typer.Argument(help="GGUF file, a pipeline's run folder, or a folder of <name>.<TYPE>.gguf files")] = None,
    variant: Annotated[str | None, typer.Option(help="variant of a run folder: Q4_K_M, ream:Q4_K_M or the full name (default: the recommended one)")] = None,
    host: Annotated[str, typer.Option(help="address to listen on (loopback by default)")] = d.HOST,
    port: Annotated[int, typer.Option(envvar="REAMKIT_PORT", help="port to listen on (0: a free one)")] = d.PORT,
    api_key: Annotated[str | None, typer.Option(envvar="REAMKIT_API_KEY", help="key clients must send (Bearer or x-api-key)")] = None,
    ctx: Annotated[int, typer.Option(help="context size in tokens, shared by the parallel slots")] = d.CONTEXT,
    parallel: Annotated[int, typer.Option(help="requests decoded at once")] = d.PARALLEL,
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: llama.cpp's choice)")] = None,
    cache_type: Annotated[str, typer.Option(help="KV cache type (f16, q8_0, ...)")] = d.CACHE_TYPE,
    alias: Annotated[str | None, typer.Option(help="model name reported to clients (default: the file name)")] = None,
    chat_template_file: Annotated[Path | None, typer.Option(help="Jinja chat template instead of the GGUF's")] = None,
    log_file: Annotated[Path | None, typer.Option(help="llama-server's log (default: in the reamkit cache)")] = None,
    max_body_mb: Annotated[float, typer.Option(help="largest request body accepted, in MiB")] = d.MAX_BODY_MB,
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="log each request's question and answer")] = False,
    allow_unknown_fields: Annotated[bool, typer.Option(help="pass every request field the API does not define through to llama-server, likely typos (max_token) too")] = False,
    strict_fields: Annotated[bool, typer.Option(help="refuse (400) every request field the API does not define, not only likely typos")] = False,
    cors_origins: Annotated[str, typer.Option(help="origins browsers may call from: * (any, as llama-server), localhost, or a comma-separated list")] = d.CORS_ORIGINS,
    layer_nice: Annotated[int, typer.Option(help="nice value of reamkit's own HTTP layer, so it does not preempt generation on busy cores (0: llama-server's priority)")] = d.LAYER_NICE,
    print_client_config: Annotated[AgentClient | None, typer.Option(help="print a client's settings and exit")] = None,
    llama_arg: Annotated[list[str] | None, typer.Option("--llama-arg", help="extra llama-server option (repeatable)")] = None,
) -> None:
    """Serve MODEL to coding agents: OpenAI and Anthropic endpoints of the pinned llama-server."""
    from .serving import ServeOptions, client_config
    from .serving import serve as run_server
    from .serving.server import check_options, setup_logging

    opts = ServeOptions(host=host, port=port, api_key=api_key, ctx=ctx, parallel=parallel, threads=threads,
                        cache_type=cache_type, alias=alias, chat_template_file=chat_template_file,
                        log_file=log_file, verbose=verbose, max_body_mb=max_body_mb, extra_args=list(llama_arg or []),
                        allow_unknown_fields=allow_unknown_fields, strict_fields=strict_fields,
                        cors_origins=cors_origins, layer_nice=layer_nice)
    check_options(opts)
    if print_client_config is not None:
        name = alias or "reamkit"
        if model:
            from .serving import resolve_model

            name = alias or resolve_model(model, variant).name.removesuffix(".gguf")
        url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        out.print(client_config(print_client_config.value, url, name, ctx, api_key), markup=False,
                  highlight=False, soft_wrap=True)
        return
    if model is None:
        raise ReamkitError("give the GGUF file or run folder to serve")
    setup_logging(verbose)

    def ready(url: str, name: str, n_ctx: int, log_path: Path) -> None:
        err.print(f"serving {name} on {url} (context {n_ctx}, llama-server log: {log_path})", markup=False,
                  highlight=False, soft_wrap=True)
        err.print(f"  OpenAI:    {url}/v1   Anthropic: {url}   key: {'required' if api_key else 'none'}",
                  markup=False, highlight=False, soft_wrap=True)
        err.print("  client settings: reamkit serve --print-client-config claude-code|codex|cline|continue|aider",
                  markup=False, highlight=False, soft_wrap=True)

    code = run_server(model, opts, variant=variant, on_ready=ready)
    raise typer.Exit(code)


@app.command()
@user_errors
def quantize(
    model: Annotated[str, typer.Argument(help="Hugging Face model folder, or an F16/BF16/F32 GGUF")],
    output: Annotated[Path, typer.Option("-o", "--output", help="folder for the reference GGUF and the variants")],
    ladder: Annotated[str, typer.Option(help="static (llama.cpp's mixes) or moe-aware (always-active tensors kept high)")] = d.LADDER_KIND,
    types: Annotated[str | None, typer.Option(help="comma-separated types (default: the 11-type ladder)")] = None,
    imatrix: Annotated[str, typer.Option(help="auto (compression statistics, else llama-imatrix), none, or a file")] = d.IMATRIX,
    keep_type: Annotated[str, typer.Option(help="moe-aware ladder: type of the always-active tensors")] = d.KEEP_TYPE,
    calibration: Annotated[str | None, typer.Option(help=f"imatrix calibration mixture (default {d.CALIB_MIX})")] = None,
    imatrix_chunks: Annotated[int, typer.Option(help="imatrix: chunks of --imatrix-ctx tokens")] = d.IMATRIX_CHUNKS,
    imatrix_ctx: Annotated[int, typer.Option(help="imatrix: tokens per chunk")] = d.IMATRIX_CTX,
    name: Annotated[str | None, typer.Option(help="file name stem (default: the model's name)")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: all)")] = None,
) -> None:
    """Quantize MODEL into a ladder of GGUF types with the pinned llama-quantize."""
    from .quantization import QuantizeOptions, quantize_model, variants_table

    opts = QuantizeOptions(types=types, ladder=ladder, imatrix=imatrix, keep_type=keep_type, name=name,
                           threads=threads, calibration=calibration, imatrix_chunks=imatrix_chunks,
                           imatrix_ctx=imatrix_ctx)
    result = quantize_model(model, output, opts)
    for line in result.warnings:
        err.print(f"[yellow]warning:[/] {line}", highlight=False, soft_wrap=True)
    out.print(variants_table(result))


@app.command()
@user_errors
def sizes(
    model: Annotated[str, typer.Argument(help="model folder, its config.json, or a reference GGUF")],
    types: Annotated[str | None, typer.Option(help="comma-separated types (default: the 11-type ladder)")] = None,
    experts: Annotated[int | None, typer.Option(help="predict for this many experts per layer")] = None,
    ladder: Annotated[str, typer.Option(help="static or moe-aware")] = d.LADDER_KIND,
    keep_type: Annotated[str, typer.Option(help="moe-aware ladder: type of the always-active tensors")] = d.KEEP_TYPE,
    imatrix: Annotated[bool, typer.Option("--imatrix/--no-imatrix", help="quantized with an importance matrix")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="print a JSON list")] = False,
) -> None:
    """Predict each GGUF variant's size from the config alone (no weights needed)."""
    import json

    from .quantization import predict_sizes, rows_as_dicts, sizes_table

    rows = predict_sizes(model, types=types, experts=experts, ladder=ladder, has_imatrix=imatrix,
                         keep_type=keep_type)
    if as_json:
        out.print(json.dumps(rows_as_dicts(rows), indent=2), markup=False, highlight=False, soft_wrap=True)
    else:
        out.print(sizes_table(rows))


@app.command()
@user_errors
def compress(
    model: Annotated[str, typer.Argument(help="Hugging Face model folder (or hf:org/name)")],
    output: Annotated[Path, typer.Option("-o", "--output", help="folder for the compressed model")],
    method: Annotated[str, typer.Option(help="auto (per layer, REAP or REAM, whichever measures better), ream, reap, frequency, hc-smoe or m-smoe")] = d.COMPRESS_METHOD,
    experts: Annotated[int | None, typer.Option(help="experts kept per layer")] = None,
    ratio: Annotated[float | None, typer.Option(help="or: fraction of experts removed (0.25: 512 -> 384)")] = None,
    calib: Annotated[str, typer.Option(help="calibration mix: built-in code/math, local paths, datasets")] = d.CALIB_MIX,
    samples: Annotated[int, typer.Option(help="calibration sequences")] = d.CALIB_SAMPLES,
    seq_len: Annotated[int, typer.Option(help="tokens per calibration sequence")] = d.CALIB_SEQ_LEN,
    batch_size: Annotated[int, typer.Option(help="sequences per calibration batch")] = d.CALIB_BATCH_SIZE,
    seed: Annotated[int, typer.Option(help="seed of the calibration sampling and the method")] = d.CALIB_SEED,
    ream_variant: Annotated[str | None, typer.Option(help="REAM: paper, or reference (the released code's behaviour)")] = None,
    group_size: Annotated[str | None, typer.Option(help="REAM: largest merge group (0: every expert joins its nearest centroid; auto: chosen per layer by measured error)")] = None,
    merging: Annotated[str | None, typer.Option(help="REAM: logits+weights, weights, logits, avg or none")] = None,
    sequential: Annotated[bool | None, typer.Option("--sequential/--no-sequential", help="next layer sees the compressed layer (default: REAM yes, pruning no)")] = None,
    drop_mtp: Annotated[bool, typer.Option("--drop-mtp", help="remove the multi-token-prediction block")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N")] = d.DEVICE,
    dtype: Annotated[str, typer.Option(help="compute dtype: float32, bfloat16, float16")] = d.COMPUTE_DTYPE,
    output_dtype: Annotated[str | None, typer.Option(help="dtype of the written weights (default: the input's)")] = None,
    memory_budget: Annotated[float, typer.Option(help="GiB of hidden states kept in RAM before spilling to disk")] = d.MEMORY_BUDGET_GB,
    observations: Annotated[str | None, typer.Option(help="plan from an earlier non-sequential run's compression/ folder instead of calibrating (reap, frequency)")] = None,
) -> None:
    """Cut the routed experts of every MoE layer (and of Qwen3-Next's MTP block, unless --drop-mtp) by REAM
    merging or REAP/frequency pruning (or HC-SMoE/M-SMoE)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from .compression import CompressOptions
    from .compression import compress as run_compress

    # the method options given, by their names in the method's Options model (which holds their defaults and
    # refuses one the method does not take)
    given = {k: v for k, v in (("variant", ream_variant), ("group_size", group_size), ("merging", merging))
             if v is not None}
    opts = CompressOptions(method=method, experts=experts, ratio=ratio, method_options=given, calib=calib,
                           samples=samples, seq_len=seq_len, batch_size=batch_size, seed=seed, device=device,
                           compute_dtype=dtype, output_dtype=output_dtype, sequential=sequential, drop_mtp=drop_mtp,
                           memory_budget_gb=memory_budget, observations=observations)
    with Progress(TextColumn("[bold]compress[/] layer {task.completed}/{task.total}"), BarColumn(),
                  TextColumn("{task.fields[speed]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                  console=err, transient=False) as bar:
        task = bar.add_task("layers", total=None, speed="")

        def progress(info: dict) -> None:
            bar.update(task, completed=info["layer"], total=info["layers"],
                       speed=f"{info['tokens_per_s']:,.0f} tok/s")

        try:
            result = run_compress(model, output, opts, progress=progress,
                                  announce=lambda m: err.print(m, markup=False, highlight=False, soft_wrap=True))
        except BaseException:
            bar.live.transient = True        # a failure is its one line, without the bar's last state
            raise
    rep = result.report
    verb = "up to date:" if result.skipped else "wrote"
    out.print(f"{verb} {result.output} ({rep['method']}: {rep['experts_before']} -> {rep['experts_after']} experts "
              f"per layer); report: {result.output / 'compression' / 'report.md'}", highlight=False, soft_wrap=True)



@app.command()
@user_errors
def evaluate(
    variants: Annotated[list[Path], typer.Argument(help="GGUF variants to score")],
    reference: Annotated[Path, typer.Option("--reference", help="F16/BF16 GGUF of the uncompressed model")],
    output: Annotated[Path, typer.Option("-o", "--output", help="run folder (reference logits, results)")] = EVAL_DIR,
    sets: Annotated[str, typer.Option(help="held-out sets: code, math or both (comma-separated)")] = ",".join(d.EVAL_SETS),
    text: Annotated[Path | None, typer.Option(help="your own evaluation text instead of the held-out sets")] = None,
    tokens: Annotated[int, typer.Option(help="scored tokens per set")] = d.EVAL_TOKENS,
    ctx: Annotated[int, typer.Option(help="context window (its second half is scored)")] = d.EVAL_CTX,
    disk_budget_gb: Annotated[float, typer.Option(help="largest size of the stored reference logits")] = d.DISK_BUDGET_GB,
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: the cores other processes leave free)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print a JSON list")] = False,
) -> None:
    """Score variants against the reference: KLD (mean, 99%), same top-1 %, perplexity on held-out code and math."""
    import json

    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from .evaluation import FidelityOptions, evaluate_fidelity, fidelity_table

    opts = FidelityOptions(sets=tuple(s.strip() for s in sets.split(",") if s.strip()), tokens=tokens, ctx=ctx,
                           text=text, disk_budget_gb=disk_budget_gb, threads=threads)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err,
                  transient=True) as bar:
        task = bar.add_task("checking inputs")
        results = evaluate_fidelity(variants, reference, output, opts,
                                    progress=lambda m: bar.update(task, description=m))
    if as_json:
        out.print(json.dumps([r.as_dict() for r in results], indent=2, default=str), markup=False,
                  highlight=False, soft_wrap=True)
    else:
        out.print(fidelity_table(results))
        out.print(f"results: {output / 'fidelity'}", highlight=False, soft_wrap=True)


@app.command()
@user_errors
def humaneval(
    model: Annotated[Path | None, typer.Argument(help="GGUF to complete the problems with (greedy, raw prompt)")] = None,
    completions: Annotated[Path | None, typer.Option("--completions", help="score task_id/completion JSONL made elsewhere")] = None,
    limit: Annotated[int | None, typer.Option(help="only the first N problems")] = None,
    max_tokens: Annotated[int, typer.Option(help="most tokens generated per problem")] = d.HUMANEVAL_MAX_TOKENS,
    output: Annotated[Path, typer.Option("-o", "--output", help="run folder (results in humaneval/)")] = EVAL_DIR,
    workers: Annotated[int, typer.Option(help="sandboxed programs run at once")] = d.HUMANEVAL_WORKERS,
    timeout: Annotated[float, typer.Option(help="wall-clock seconds per program")] = d.HUMANEVAL_TIMEOUT_S,
    threads: Annotated[int | None, typer.Option(help="llama.cpp threads (default: the cores other processes leave free)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print a JSON list, one object per task")] = False,
) -> None:
    """HumanEval pass@1: generate with MODEL then score, or score --completions; every program runs sandboxed."""
    import json

    from .evaluation.humaneval import HumanEvalOptions, mean_pass_at_k, run_humaneval, score_completions_file
    from .evaluation.sandbox import sandbox_facts

    if (model is None) == (completions is None):
        raise ReamkitError("give either a GGUF to generate with or --completions FILE.jsonl (not both)")
    if completions is not None and limit is not None:
        raise ReamkitError("--limit applies to generation; trim the completions file instead")
    opts = HumanEvalOptions(limit=limit, max_tokens=max_tokens, workers=workers, timeout_s=timeout, threads=threads)
    with err.status("sandboxed HumanEval") as status:
        show = lambda what, i, n: status.update(f"HumanEval: {what} {i}/{n}")  # noqa: E731
        if completions is not None:
            results = score_completions_file(completions, opts, progress=lambda i, n: show("scoring", i, n))
            pass_at_k, where = mean_pass_at_k(results), None
        else:
            res = run_humaneval(model, output, opts, progress=show)
            results, pass_at_k, where = res.results, res.pass_at_k, res.output
            if res.skipped:
                where = f"{where} (up to date)"
    if sandbox_facts().note:
        err.print(f"[yellow]sandbox:[/] {sandbox_facts().note}", highlight=False, soft_wrap=True)
    if as_json:
        out.print(json.dumps([r.as_dict() for r in results], indent=2), markup=False, highlight=False, soft_wrap=True)
        return
    tasks = len({r.task_id for r in results})
    figures = ", ".join(f"pass@{k} {v:.4f}" for k, v in pass_at_k.items())
    out.print(f"HumanEval {figures} ({sum(r.passed for r in results)}/{len(results)} passed, {tasks} tasks)"
              + (f"; results: {where}" if where else ""), highlight=False, soft_wrap=True)


def _run_and_summarize(cfg, output: Path) -> None:
    from .pipeline import run_pipeline
    from .pipeline.summary import print_summary
    from .pipeline.view import LiveView

    with LiveView(err) as view:
        result = run_pipeline(cfg, output, view=view)
    print_summary(result, out)


@app.command("run")
@user_errors
def run_cmd(
    config: Annotated[Path, typer.Argument(help="run configuration (TOML); see reamkit.pipeline.config")],
    output: Annotated[Path, typer.Option("-o", "--output", help="run folder (resumable: rerun to continue)")] = RUN_DIR,
) -> None:
    """Run the release pipeline from a config file: compress, convert, imatrix, quantize, evaluate, compare, card."""
    from .pipeline import load_config

    _run_and_summarize(load_config(config), output)


@app.command()
@user_errors
def release(
    model: Annotated[str, typer.Argument(help="Hugging Face model folder, or hf:ORG/NAME")],
    output: Annotated[Path, typer.Option("-o", "--output", help="run folder (resumable: rerun to continue)")] = RUN_DIR,
    name: Annotated[str | None, typer.Option(help="file-name stem of the outputs (default: the model folder's name)")] = None,
    methods: Annotated[str, typer.Option(help="compression methods to compare, comma-separated ('' for none)")] = ",".join(d.RUN_METHODS),
    experts: Annotated[int | None, typer.Option(help="experts kept per layer")] = None,
    ratio: Annotated[float | None, typer.Option(help=f"fraction of experts removed (default {d.RUN_RATIO})")] = None,
    calib: Annotated[str, typer.Option(help="calibration mixture")] = d.CALIB_MIX,
    samples: Annotated[int, typer.Option(help="calibration sequences")] = d.CALIB_SAMPLES,
    seq_len: Annotated[int, typer.Option(help="calibration sequence length")] = d.CALIB_SEQ_LEN,
    types: Annotated[str | None, typer.Option(help="quantization types, comma-separated (default: the 11-type ladder)")] = None,
    tokens: Annotated[int, typer.Option(help="scored tokens per held-out set")] = d.EVAL_TOKENS,
    humaneval_limit: Annotated[int, typer.Option(help="HumanEval problems per variant (0: none)")] = d.HUMANEVAL_PROBLEMS,
    speed: Annotated[bool, typer.Option(help="measure prompt and generation speed")] = True,
    executor: Annotated[Executor, typer.Option(help="local processes or an existing Ray cluster")] = Executor(d.EXECUTOR),
    workers: Annotated[int, typer.Option(help="parallel per-variant jobs")] = d.WORKERS,
    memory_gb: Annotated[float | None, typer.Option(help=f"memory budget for parallel jobs (default: {d.MEMORY_SHARE:.0%} of free)")] = None,
    ray_address: Annotated[str, typer.Option(help="Ray cluster address")] = d.RAY_ADDRESS,
) -> None:
    """The release pipeline from flags (the same fields as a config file for ``reamkit run``)."""
    from .pipeline import validate

    fields = {"name": name or None, "compress.methods": [m.strip() for m in methods.split(",") if m.strip()],
              "compress.experts": experts, "compress.ratio": ratio, "compress.calib": calib,
              "compress.samples": samples, "compress.seq_len": seq_len,
              "quantize.types": [t for t in types.split(",") if t.strip()] if types else None,
              "evaluate.tokens": tokens, "evaluate.humaneval_limit": humaneval_limit, "evaluate.speed": speed,
              "executor.kind": executor.value, "executor.workers": workers, "executor.memory_gb": memory_gb,
              "executor.ray_address": ray_address}
    data: dict = {"model": model if model.startswith("hf:") else str(Path(model).resolve())}
    for key, value in fields.items():         # a flag left out (None) takes the run configuration's default
        if value is not None:
            table, _, field = key.rpartition(".")
            (data.setdefault(table, {}) if table else data)[field] = value
    cfg = validate(data, source="options")
    _run_and_summarize(cfg, output)


@app.command()
@user_errors
def status(run_dir: Annotated[Path, typer.Argument(help="run folder")]) -> None:
    """Where a run stands: each stage done, to do, or stale (its inputs or parameters changed)."""
    from .pipeline import stage_rows
    from .pipeline.runner import is_running
    from .pipeline.view import status_table

    rows = stage_rows(run_dir)
    out.print(status_table(rows, is_running(run_dir)))
    done = sum(r[1] == "done" for r in rows)
    out.print(f"{done} of {len(rows)} stages done; log: {run_dir / 'pipeline.log'}", highlight=False)


@app.command()
@user_errors
def speed(
    variants: Annotated[list[Path], typer.Argument(help="GGUF variants to benchmark")],
    output: Annotated[Path, typer.Option("-o", "--output", help="run folder (results in speed/)")] = EVAL_DIR,
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: the cores other processes leave free)")] = None,
    prompt: Annotated[int, typer.Option(help="prompt tokens of the pp test")] = d.SPEED_PROMPT,
    gen: Annotated[int, typer.Option(help="generated tokens of the tg test")] = d.SPEED_GEN,
    repetitions: Annotated[int, typer.Option(help="runs of each test")] = d.SPEED_REPETITIONS,
) -> None:
    """Prompt and generation tokens/s (llama-bench), load time, peak memory and the share of the memory-bandwidth
    bound reached, per variant."""
    from .evaluation.speed import SpeedOptions, measure_speed

    opts = SpeedOptions(prompt=prompt, gen=gen, repetitions=repetitions, threads=threads)
    for v in variants:
        with err.status(f"benchmarking {v.name}"):
            r = measure_speed(v, output, opts)
        share = (f"{r.bandwidth_share:.0%} of the {r.bound_tps:.0f} t/s bandwidth bound at {r.bandwidth_gbps:.1f} GB/s"
                 if r.bandwidth_share is not None else
                 f"share of the bandwidth bound n/a: {r.bytes_per_token / 1e6:.2f} MB per token fits in the "
                 f"{(r.llc_bytes or 0) / 2**20:.0f} MiB last-level cache")
        out.print(f"{r.variant}: pp{opts.prompt} {r.pp_tps:.1f} ± {r.pp_tps_se:.1f} t/s, tg{opts.gen} {r.tg_tps:.1f} "
                  f"± {r.tg_tps_se:.1f} t/s (median of {r.tg_samples}, spread {r.tg_spread or 0:.0%}"
                  f"{'; busy machine: other processes took the cores' if r.busy else ''}; {share}), "
                  f"load {r.load_s:.2f} s, peak {r.peak_rss_bytes / 1e9:.2f} GB, "
                  f"{r.threads} threads{' (up to date)' if r.skipped else ''}", highlight=False, soft_wrap=True)
    out.print(f"results: {output / 'speed'}", highlight=False, soft_wrap=True)


@app.command()
@user_errors
def compare(run_dir: Annotated[Path, typer.Argument(help="run folder")]) -> None:
    """One row per variant (size, bits/weight, KLD, top-1, PPL, pass@1, speed, notes) in report/compare.{md,csv,json},
    plus size-vs-KLD and size-vs-pass@1 plots."""
    from .report import compare as run_compare
    from .report import comparison_table

    comp = run_compare(run_dir)
    out.print(comparison_table(comp))
    out.print(f"report: {comp.files['md']} (+ .csv, .json, {comp.files['kld_png'].name}, "
              f"{comp.files['pass_png'].name})", highlight=False, soft_wrap=True)


@app.command()
@user_errors
def card(
    run_dir: Annotated[Path, typer.Argument(help="run folder")],
    model_name: Annotated[str | None, typer.Option(help="model name in the card's title")] = None,
    repo: Annotated[str | None, typer.Option(help="Hub repository ORG/NAME the links point to (default: file names)")] = None,
) -> None:
    """A model card (report/README.md) in the style of mradermacher's GGUF cards, with the measured figures."""
    from .report import write_card, write_release

    out.print(f"wrote {write_card(run_dir, model_name=model_name, repo=repo)}", highlight=False, soft_wrap=True)
    for folder in write_release(run_dir):
        out.print(f"release: {folder} (hf upload ORG/{folder.name} {folder})", highlight=False, soft_wrap=True)


@app.command()
@user_errors
def fit(
    target: Annotated[str, typer.Argument(help="run folder, or a built-in model (Qwen3-Coder-Next-REAM)")],
    memory: Annotated[str, typer.Option(help="system RAM, e.g. 24GB (1e9 bytes) or 24GiB")],
    context: Annotated[str, typer.Option(help="context tokens, e.g. 32k")] = str(d.CONTEXT),
    gpu_memory: Annotated[str | None, typer.Option(help="GPU memory; routed experts that do not fit stay in RAM")] = None,
    cache_type: Annotated[str, typer.Option(help="KV cache type (f16, q8_0, ...)")] = d.CACHE_TYPE,
    parallel: Annotated[int, typer.Option(help="parallel slots (-np), each with its own recurrent state; as reamkit serve")] = d.PARALLEL,
) -> None:
    """The best-fidelity variant whose weights + KV cache + state + overhead fit, with the arithmetic."""
    from .report import fit as run_fit
    from .report import fit_lines

    res = run_fit(target if not Path(target).is_dir() else Path(target), memory, context=context,
                  gpu_memory=gpu_memory, cache_type=cache_type, parallel=parallel)
    for line in fit_lines(res):
        out.print(line, highlight=False, soft_wrap=True, markup=False)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
