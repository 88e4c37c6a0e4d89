"""Every failure a user or the machine can cause is one line with the right exit code and leaves nothing but
resumable work; damaged files are noticed by their content, not their dates."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from reamkit.checkpoint import Checkpoint, write_checkpoint

from .signals_support import as_terminal_job

REAMKIT = [sys.executable, "-m", "reamkit.cli"]
TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("reliability")


@pytest.fixture(scope="module")
def model(work) -> Path:
    from reamkit.zoo import build_cached

    return write_checkpoint(Checkpoint.open(build_cached("qwen3_moe")), work / "model", max_shard_bytes=16 * 2**20)


@pytest.fixture(scope="module")
def f16(work, model) -> Path:
    from reamkit.gguf import convert_to_gguf

    return convert_to_gguf(model, work / "gguf" / "model.F16.gguf", dtype="f16")[0]


@pytest.fixture(scope="module")
def q8(work, f16) -> Path:
    from reamkit.quantization import QuantizeOptions, quantize_model

    res = quantize_model(f16, work / "gguf", QuantizeOptions(types=["Q8_0"], imatrix="none", progress=False))
    return res.variants[0].path


def flip_byte(p: Path, offset: int) -> None:
    with open(p, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def tensor_data_middle(gguf: Path) -> int:
    from gguf import GGUFReader

    t = max(GGUFReader(str(gguf)).tensors, key=lambda t: int(t.n_bytes))
    return int(t.data_offset) + int(t.n_bytes) // 2


def cli(*args, cwd: Path | None = None, timeout: float = 300) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    res = subprocess.run([*REAMKIT, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=cwd)
    return res, time.monotonic() - t0


def one_line(res, code: int, *needles: str) -> str:
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in res.stderr + res.stdout, res.stderr
    assert res.returncode == code, (res.returncode, res.stderr)
    assert len(lines) == 1, res.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def leftovers(folder: Path) -> list[Path]:
    """What a failed command must not leave: temporaries, half-written outputs, lone manifests."""
    return [p for p in folder.rglob("*") if ".tmp-" in p.name or (
        p.name.endswith(".manifest.json") and not p.with_name(p.name.removesuffix(".manifest.json")).exists())]


@contextlib.contextmanager
def tmpfs(where: Path, size: str, *, readonly: bool = False):
    """A small (or read-only) file system mounted at ``where``; skips when this process may not mount one."""
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs (full disk, read-only folder) needs root")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}" + (",ro" if readonly else ""), "tmpfs",
                          str(where)], capture_output=True, text=True)
    if res.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------- the table
def case_missing_tokenizer(tmp, stack, model, f16, q8):
    m = tmp / "model"
    shutil.copytree(model, m)
    for name in TOKENIZER:
        (m / name).unlink(missing_ok=True)
    return ["compress", m, "-o", tmp / "out", "--samples", 8, "--seq-len", 32, "--batch-size", 4, "--ratio", 0.25], 2, ["no tokenizer"]


def case_release_onto_a_file(tmp, stack, model, f16, q8):
    (tmp / "taken").write_text("mine")
    return ["release", model, "-o", tmp / "taken", "--types", "Q8_0"], 2, ["taken is a file"]


def case_quantize_into_read_only_folder(tmp, stack, model, f16, q8):
    ro = stack.enter_context(tmpfs(tmp / "ro", "8m", readonly=True))
    return ["quantize", f16, "-o", ro, "--types", "Q8_0", "--imatrix", "none"], 2, ["read-only", str(ro)]


def case_compress_onto_full_disk(tmp, stack, model, f16, q8):
    full = stack.enter_context(tmpfs(tmp / "full", "1m"))
    return (["compress", model, "-o", full / "out", "--samples", 8, "--seq-len", 32, "--batch-size", 4, "--ratio", 0.25], 1,
            ["MB are free", "compressed model"])


def case_compress_fills_the_disk_midway(tmp, stack, model, f16, q8):
    """Room for the layers' work files but not for the published model as well: the work folder stays, for a
    rerun with more room to reuse."""
    full = stack.enter_context(tmpfs(tmp / "full", "60m"))
    return (["compress", model, "-o", full / "out", "--samples", 8, "--seq-len", 32, "--batch-size", 4, "--ratio",
             0.25], 1, ["no space left on the device"])


def case_compress_inf_in_layer_2(tmp, stack, model, f16, q8):
    from safetensors.torch import load_file, save_file

    m = tmp / "model"
    shutil.copytree(model, m)
    name = "model.layers.2.mlp.experts.5.down_proj.weight"
    shard = m / json.loads((m / "model.safetensors.index.json").read_text())["weight_map"][name]
    tensors = load_file(str(shard))
    tensors[name][3, 1] = float("inf")
    save_file(tensors, str(shard), metadata={"format": "pt"})
    return ["compress", m, "-o", tmp / "out", "--samples", 8, "--seq-len", 32, "--batch-size", 4, "--ratio", 0.25], 2, [name, "NaN/Inf"]


def case_evaluate_truncated_gguf(tmp, stack, model, f16, q8):
    bad = tmp / "cut.Q8_0.gguf"
    shutil.copy(q8, bad)
    os.truncate(bad, bad.stat().st_size // 2)
    return ["evaluate", bad, "--reference", f16, "-o", tmp / "eval", "--tokens", 128, "--ctx", 64], 2, \
        ["truncated", str(bad)]


def case_quantize_from_truncated_reference(tmp, stack, model, f16, q8):
    bad = tmp / "cut.F16.gguf"
    shutil.copy(f16, bad)
    os.truncate(bad, bad.stat().st_size - 4096)
    return ["quantize", bad, "-o", tmp / "q", "--types", "Q8_0", "--imatrix", "none"], 2, ["truncated", str(bad)]


def case_evaluate_gguf_with_a_flipped_byte(tmp, stack, model, f16, q8):
    bad = tmp / "gguf" / q8.name
    bad.parent.mkdir()
    shutil.copy(q8, bad)
    shutil.copy(q8.with_name(q8.name + ".manifest.json"), bad.with_name(bad.name + ".manifest.json"))
    flip_byte(bad, tensor_data_middle(bad))
    return ["evaluate", bad, "--reference", f16, "-o", tmp / "eval", "--tokens", 128, "--ctx", 64], 2, \
        ["changed after it was written", str(bad)]


def case_convert_onto_full_disk(tmp, stack, model, f16, q8):
    full = stack.enter_context(tmpfs(tmp / "full", "1m"))
    return ["convert", model, "-o", full / "m.gguf"], 1, ["MB are free", "GGUF"]


def case_ray_address_where_nothing_listens(tmp, stack, model, f16, q8):
    pytest.importorskip("ray")
    return (["release", model, "-o", tmp / "run", "--types", "Q8_0", "--executor", "ray", "--ray-address",
             f"127.0.0.1:{free_port()}"], 2, ["no Ray cluster listening"])


CASES = [case_missing_tokenizer, case_release_onto_a_file, case_quantize_into_read_only_folder,
         case_compress_onto_full_disk, case_compress_fills_the_disk_midway, case_compress_inf_in_layer_2, case_evaluate_truncated_gguf,
         case_quantize_from_truncated_reference, case_evaluate_gguf_with_a_flipped_byte, case_convert_onto_full_disk,
         case_ray_address_where_nothing_listens]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__.removeprefix("case_") for c in CASES])
def test_every_failure_is_one_line_with_its_exit_code_and_leaves_nothing(case, tmp_path, model, f16, q8):
    with contextlib.ExitStack() as stack:
        args, code, needles = case(tmp_path, stack, model, f16, q8)
        before = {p for p in tmp_path.rglob("*")}
        res, seconds = cli(*args, timeout=600)
        one_line(res, code, *needles)
        if case is case_ray_address_where_nothing_listens:
            assert seconds < 30, seconds
        new = [p for p in tmp_path.rglob("*") if p not in before]
        assert not [p for p in new if not p.name.endswith(".work") and ".work/" not in str(p)], new
        assert not leftovers(tmp_path), leftovers(tmp_path)


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "SIGTERM")])
def test_a_signal_during_convert_is_one_line_and_stops_the_converter(tmp_path, model, sig, code, word):
    """Ctrl-C reaches the whole foreground process group (as a terminal sends it); SIGTERM only reamkit."""
    out = tmp_path / "m.gguf"
    proc = subprocess.Popen([*REAMKIT, "convert", str(model), "-o", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=as_terminal_job)
    me = psutil.Process(proc.pid)
    deadline = time.monotonic() + 120
    children = []
    while not children and time.monotonic() < deadline and proc.poll() is None:
        children = me.children(recursive=True)
        time.sleep(0.05)
    assert children, "the converter never started"
    time.sleep(0.5)
    if sig == signal.SIGINT:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    t0 = time.monotonic()
    stdout, stderr = proc.communicate(timeout=30)
    _, alive = psutil.wait_procs(children, timeout=1)
    assert not alive, alive
    assert time.monotonic() - t0 < 5
    one_line(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), code, word, "rerun")
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------- Ray
RAY_CONFIG = """
model = "{model}"
name = "tiny"

[compress]
methods = ["reap"]
ratio = 0.25
samples = 8
seq_len = 64
batch_size = 4

[quantize]
types = ["Q8_0"]
imatrix = "none"

[evaluate]
tokens = 128
ctx = 128
humaneval_limit = 0
speed = false

[executor]
kind = "ray"
workers = 2
ray_address = "{address}"
"""

_CLUSTER = """
import sys, ray
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()
ray.shutdown()
"""


@contextlib.contextmanager
def ray_cluster(env: dict | None = None):
    """A local Ray cluster owned by a child process: it ends with the child, whatever else runs Ray here."""
    pytest.importorskip("ray")
    proc = subprocess.Popen([sys.executable, "-c", _CLUSTER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env={**os.environ, **(env or {})})
    try:
        address = proc.stdout.readline().strip()
        assert address, "the Ray cluster did not start"
        yield proc, address
    finally:
        proc.stdin.close()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def _stage_workers(root: int) -> list[psutil.Process]:
    found = []
    for p in psutil.Process(root).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if " ".join(p.cmdline()).startswith("ray::run_stage"):
                found.append(p)
    return found


def test_ray_a_killed_worker_fails_its_stage_in_one_line_and_the_rerun_completes(tmp_path, model):
    with ray_cluster() as (cluster, address):
        cfg = tmp_path / "run.toml"
        cfg.write_text(RAY_CONFIG.format(model=model, address=address))
        run = tmp_path / "run"
        proc = subprocess.Popen([*REAMKIT, "run", str(cfg), "-o", str(run)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 180
        workers = []
        while not workers and time.monotonic() < deadline and proc.poll() is None:
            workers = _stage_workers(cluster.pid)
            time.sleep(0.2)
        assert workers, "no stage started on the cluster"
        time.sleep(1)
        for w in workers:
            w.kill()
        t0 = time.monotonic()
        stdout, stderr = proc.communicate(timeout=60)
        assert time.monotonic() - t0 < 30
        last = stderr.strip().splitlines()[-1]
        assert proc.returncode == 2 and "Traceback" not in stderr, stderr
        assert "failed: the Ray worker running it died (WorkerCrashedError)" in last and "rerun" in last, last
        log = (run / "pipeline.log").read_text()
        assert "failed compress:reap: the Ray worker running it died" in log
        from reamkit.pipeline.runner import is_running

        assert not is_running(run)
        res, _ = cli("run", cfg, "-o", run, timeout=900)
        assert res.returncode == 0, res.stderr
        assert "run finished" in (run / "pipeline.log").read_text()


def test_ray_a_cluster_with_token_authentication_is_one_line_naming_the_cause(tmp_path, model):
    import secrets

    token = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    with ray_cluster(token) as (_, address):
        res, seconds = cli("release", model, "-o", tmp_path / "run", "--types", "Q8_0", "--executor", "ray",
                           "--ray-address", address, timeout=120)
    one_line(res, 2, "token authentication failed", address)
    assert seconds < 30
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------- identity
def test_a_file_hash_sees_every_byte_is_cached_and_survives_a_copy(tmp_path, monkeypatch):
    import hashlib

    from reamkit import identity

    monkeypatch.setenv("REAMKIT_CACHE_DIR", str(tmp_path / "cache"))
    p = tmp_path / "shard.bin"
    data = bytearray(os.urandom(3 << 20))
    p.write_bytes(data)
    first = identity.file_hash(p)
    assert first == hashlib.sha256(data).hexdigest()
    reads = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda *a, **k: reads.append(a[0]) or real_open(*a, **k))
    assert identity.file_hash(p) == first and not reads          # unchanged: answered from the cache
    monkeypatch.setattr("builtins.open", real_open)
    st = p.stat()
    _flip = data[len(data) // 2] ^ 1
    with open(p, "r+b") as f:                                    # one byte in the middle, dates put back
        f.seek(len(data) // 2)
        f.write(bytes([_flip]))
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert identity.file_hash(p) != first
    copy = tmp_path / "copy.bin"
    shutil.copy(p, copy)
    assert identity.file_hash(copy) == identity.file_hash(p)
