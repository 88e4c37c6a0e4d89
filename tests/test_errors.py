"""Bad input: a one-line error naming the problem, a non-zero exit, and no half-written output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from reamkit.checkpoint import Checkpoint, write_checkpoint
from reamkit.cli import app
from reamkit.fsutil import atomic_file, clean_stale_temps

runner = CliRunner()


def run_cli(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, *needles: str) -> str:
    assert result.exit_code != 0, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def assert_nothing_written(folder: Path, keep: set[str]) -> None:
    assert {p.name for p in folder.iterdir()} == keep


@pytest.fixture
def qwen3_moe_copy(tmp_path):
    from reamkit.zoo import build_cached

    src = Checkpoint.open(build_cached("qwen3_moe"))
    return write_checkpoint(src, tmp_path / "model", max_shard_bytes=16 * 2**20)


def test_missing_shard(qwen3_moe_copy, tmp_path):
    shards = sorted(qwen3_moe_copy.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[1].unlink()
    res = run_cli("convert", qwen3_moe_copy, "-o", tmp_path / "out.gguf")
    assert_one_line_error(res, "missing", shards[1].name)
    assert_nothing_written(tmp_path, {"model"})


def test_truncated_safetensors(qwen3_moe_copy, tmp_path):
    shard = sorted(qwen3_moe_copy.glob("model-*.safetensors"))[-1]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 4096)
    res = run_cli("convert", qwen3_moe_copy, "-o", tmp_path / "out.gguf")
    assert_one_line_error(res, "truncated", shard.name)
    assert_nothing_written(tmp_path, {"model"})


def test_config_expert_count_disagrees_with_weights(qwen3_moe_copy, tmp_path):
    cfg_path = qwen3_moe_copy / "config.json"
    cfg = json.loads(cfg_path.read_text())
    key = "num_experts" if "num_experts" in cfg else "num_local_experts"
    cfg[key] = 12
    cfg_path.write_text(json.dumps(cfg))
    res = run_cli("convert", qwen3_moe_copy, "-o", tmp_path / "out.gguf")
    assert_one_line_error(res, f"{key}=12", "16 experts")
    assert_nothing_written(tmp_path, {"model"})


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_is_refused_with_its_name(qwen3_moe_copy, tmp_path, bad):
    """One NaN (or Inf) in one tensor: convert refuses, naming the tensor, and so does every stage that reads
    weights (copying a checkpoint, running it layer by layer)."""
    import torch
    from safetensors.torch import load_file, save_file

    from reamkit.compression.layerwise import LayerwiseModel
    from reamkit.errors import CheckpointError
    from reamkit.models import open_model

    name = "model.layers.2.mlp.experts.5.down_proj.weight"
    index = json.loads((qwen3_moe_copy / "model.safetensors.index.json").read_text())
    shard = qwen3_moe_copy / index["weight_map"][name]
    tensors = load_file(str(shard))
    tensors[name][17, 3] = bad
    save_file(tensors, str(shard), metadata={"format": "pt"})

    res = run_cli("convert", qwen3_moe_copy, "-o", tmp_path / "out.gguf")
    assert_one_line_error(res, f"tensor '{name}'", "1 NaN/Inf value(s)", shard.name)
    assert_nothing_written(tmp_path, {"model"})

    model = open_model(qwen3_moe_copy)                   # opening reads headers only
    with pytest.raises(CheckpointError, match=name):
        write_checkpoint(model.checkpoint, tmp_path / "copy")
    assert not (tmp_path / "copy").exists()
    with pytest.raises(CheckpointError, match=name):
        LayerwiseModel(model).forward(torch.tensor([[1, 2, 3]]))


def test_unsupported_architecture(qwen3_moe_copy, tmp_path):
    cfg_path = qwen3_moe_copy / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model_type"] = "llama"
    cfg_path.write_text(json.dumps(cfg))
    res = run_cli("convert", qwen3_moe_copy, "-o", tmp_path / "out.gguf")
    from reamkit.models import ADAPTERS

    assert {"mixtral", "qwen3_moe", "qwen3_next"} <= set(ADAPTERS)
    assert_one_line_error(res, "unsupported architecture", "'llama'", ", ".join(sorted(ADAPTERS)))
    assert_nothing_written(tmp_path, {"model"})


def test_output_folder_holding_a_different_model(tmp_path):
    out = tmp_path / "m"
    assert run_cli("zoo", "qwen3_moe", "-o", out).exit_code == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert run_cli("zoo", "qwen3_moe", "-o", out).exit_code == 0          # same model: a no-op
    res = run_cli("zoo", "mixtral", "-o", out)
    assert_one_line_error(res, "already holds a different model", str(out))
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen3_moe"
    assert_nothing_written(tmp_path, {"m"})


def test_output_gguf_holding_a_different_model(tmp_path):
    from reamkit.zoo import build_cached

    gguf = tmp_path / "model.gguf"
    assert run_cli("convert", build_cached("qwen3_moe"), "-o", gguf, "--dtype", "f16").exit_code == 0
    data = gguf.read_bytes()
    res = run_cli("convert", build_cached("mixtral"), "-o", gguf, "--dtype", "f16")
    assert_one_line_error(res, "already holds a different GGUF", str(gguf))
    assert gguf.read_bytes() == data
    res = run_cli("convert", build_cached("qwen3_moe"), "-o", gguf, "--dtype", "f32")   # other params too
    assert_one_line_error(res, "already holds a different GGUF")
    assert_nothing_written(tmp_path, {"model.gguf", "model.gguf.manifest.json"})


def test_not_a_model_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run_cli("convert", tmp_path / "empty", "-o", tmp_path / "x.gguf"), "no config.json")
    assert_one_line_error(run_cli("convert", tmp_path / "nope", "-o", tmp_path / "x.gguf"), "no such folder")


def test_missing_relative_path_is_no_such_folder_not_a_hub_id(tmp_path, monkeypatch):
    """``runs/does-not-exist`` looks like a Hub repo id, but without ``hf:`` it is a path: never sent to the Hub."""
    import huggingface_hub

    def no_network(*a, **k):
        raise AssertionError("the Hub was contacted")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    monkeypatch.chdir(tmp_path)
    res = run_cli("convert", "runs/does-not-exist", "-o", "x.gguf")
    line = assert_one_line_error(res, "no such folder: runs/does-not-exist", "hf:runs/does-not-exist")
    assert "Hub repo" in line
    assert_nothing_written(tmp_path, set())


def test_hub_download_announces_size_and_destination_first(tmp_path, monkeypatch):
    """A Hub model says how big it is and where it goes before any byte is fetched (mocked Hub, no network)."""
    import huggingface_hub
    from huggingface_hub.file_download import DryRunFileInfo

    from reamkit.zoo import build_cached

    snapshot = tmp_path / "hf" / "models--Qwen--Tiny" / "snapshots" / "abc123"
    src = build_cached("qwen3_moe")
    events: list[str] = []

    def fake_snapshot_download(repo_id, *, allow_patterns=None, dry_run=False, **kw):
        assert repo_id == "Qwen/Tiny"
        files = sorted(p.name for p in src.iterdir() if p.suffix in (".json", ".safetensors", ".jinja", ".txt"))
        if dry_run:
            events.append("dry_run")
            return [DryRunFileInfo(commit_hash="abc123", file_size=(src / f).stat().st_size, filename=f,
                                   local_path=str(snapshot / f), is_cached=False, will_download=True)
                    for f in files]
        events.append("download")
        snapshot.mkdir(parents=True)
        for f in files:
            (snapshot / f).write_bytes((src / f).read_bytes())
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    from reamkit.models import open_model

    announced: list[str] = []
    model = open_model("hf:Qwen/Tiny", announce=lambda line: announced.append(line) or events.append("announce"))
    assert model.path == snapshot and model.adapter.model_type == "qwen3_moe"
    assert events == ["dry_run", "announce", "download"]
    total = sum(p.stat().st_size for p in src.iterdir() if p.suffix in (".json", ".safetensors", ".jinja", ".txt"))
    assert announced == [f"downloading Qwen/Tiny: {total / 1e6:.1f} MB in {len(list(snapshot.iterdir()))} file(s) "
                         f"into {snapshot}"]


def test_killed_writer_leaves_no_output_and_next_run_cleans_up(tmp_path):
    """SIGKILL in the middle of an atomic write: the target never appears; the leftover temp is removed."""
    target = tmp_path / "out.gguf"
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from reamkit.fsutil import atomic_file
        with atomic_file(Path({str(target)!r})) as tmp:
            tmp.write_bytes(b"x" * 100000)
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script])
    assert proc.returncode == -9
    assert not target.exists()
    leftovers = list(tmp_path.iterdir())
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".out.gguf.tmp-")
    with atomic_file(target) as tmp:
        tmp.write_bytes(b"ok")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gguf"]
    assert clean_stale_temps(target) == []
    assert os.path.getsize(target) == 2


def test_hub_id_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    res = run_cli("convert", "hf:no-such-org/no-such-model", "-o", tmp_path / "x.gguf")
    assert_one_line_error(res, "no-such-org/no-such-model", "Hugging Face Hub")
    assert not (tmp_path / "x.gguf").exists()


def test_config_layer_count_disagrees_with_weights(qwen3_moe_copy, tmp_path):
    cfg_path = qwen3_moe_copy / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["num_hidden_layers"] = 6
    cfg_path.write_text(json.dumps(cfg))
    res = run_cli("convert", qwen3_moe_copy, "-o", tmp_path / "out.gguf")
    assert_one_line_error(res, "num_hidden_layers=6", "layers 0..3 (4 in all)")
