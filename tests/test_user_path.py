"""The user's path through a run, on what the pipeline itself wrote: run -> status -> the printed `serve` line
answers a request -> fit picks a variant -> the run folder is moved -> status, fit, serve, compare still work ->
every link of every card resolves, and the release folders hold the run's files as hard links.

Everything runs as the shell would run it: the venv's ``reamkit`` script, called by a relative path from the
folder the run was started in (as the README's ``.venv/bin/reamkit``), and the printed command run as printed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from reamkit.zoo import write_zoo_model

from .serving_helpers import free_port

CONFIG = """
model = "model"
name = "tiny"

[compress]
methods = ["ream"]
ratio = 0.25
samples = 8
seq_len = 64
batch_size = 4

[quantize]
types = ["Q4_K_M", "Q8_0"]
imatrix_chunks = 2
imatrix_ctx = 64

[evaluate]
tokens = 128
ctx = 128
humaneval_limit = 0
speed = false

[executor]
workers = 2
"""
STAGES = 16      # compress, 2 prepare, 4 quantize, reference, 6 evaluate (2 models x 3), compare, card


def _env() -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin)
    return env


def _sh(cmd: str, cwd: Path, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, shell=True, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=900, **kw)
    assert res.returncode == 0, f"{cmd}: {res.stdout[-2000:]} {res.stderr[-2000:]}"
    return res


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """A folder like the repository root: ``.venv`` and a model; the run started there, as the README does."""
    home = tmp_path_factory.mktemp("user")
    (home / ".venv").symlink_to(Path(sys.executable).parent.parent)
    write_zoo_model("qwen3_next", home / "model")
    (home / "run.toml").write_text(CONFIG)
    res = _sh(".venv/bin/reamkit run run.toml -o out/run", home)
    (home / "run-stdout.txt").write_text(res.stdout)
    return home


def _try_it(home: Path) -> str:
    lines = (home / "run-stdout.txt").read_text().splitlines()
    return next(ln for ln in lines if ln.startswith("try it: ")).removeprefix("try it: ")


def _serve_answers(cmd: str, cwd: Path) -> str:
    """Run ``cmd`` (a ``reamkit serve`` line) in the shell, ask one question, stop it; returns the answer."""
    port = free_port()
    env = {**_env(), "REAMKIT_PORT": str(port)}
    proc = subprocess.Popen(cmd, shell=True, cwd=cwd, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"{cmd} exited: {proc.stderr.read()[-2000:]}"
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"{cmd} did not become healthy"
            time.sleep(0.5)
        body = json.dumps({"prompt": "def add(a, b):", "max_tokens": 4, "temperature": 0}).encode()
        req = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            data = json.loads(r.read())
        assert data["choices"] and data["usage"]["completion_tokens"] >= 1
        return data["model"]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _card_links(card: Path) -> list[str]:
    return re.findall(r"\]\(([^)\s]+)\)", card.read_text())


def test_the_printed_serve_line_works_as_pasted(home):
    cmd = _try_it(home)
    assert cmd.startswith(".venv/bin/reamkit serve out/run --variant "), cmd
    assert "out/run/out/run" not in cmd
    variant = shlex.split(cmd)[-1]
    assert variant in ("none:Q4_K_M", "none:Q8_0", "ream:Q4_K_M", "ream:Q8_0", "none:F16", "ream:F16")
    served = _serve_answers(cmd, home)
    assert served.endswith(variant.split(":")[1])


def test_status_fit_serve_compare_and_the_cards_work_on_the_run_folder_after_a_move(home, tmp_path):
    run = home / "out" / "run"
    res = _sh(".venv/bin/reamkit status out/run", home)
    assert f"{STAGES} of {STAGES} stages done" in res.stdout
    picked = _sh(".venv/bin/reamkit fit out/run --memory 16GB --context 4k", home).stdout
    assert re.search(r"^pick: tiny\S*\.(F16|Q8_0|Q4_K_M) ", picked, re.M), picked
    variants = json.loads((run / "variants.json").read_text())
    assert all(not Path(v["path"]).is_absolute() for v in variants.values())

    moved = home / "elsewhere" / "moved-run"
    moved.parent.mkdir()
    os.rename(run, moved)
    res = _sh(".venv/bin/reamkit status elsewhere/moved-run", home)
    assert f"{STAGES} of {STAGES} stages done" in res.stdout
    assert _sh(".venv/bin/reamkit fit elsewhere/moved-run --memory 16GB --context 4k", home).stdout \
        .splitlines()[-1].split(";")[0] == picked.splitlines()[-1].split(";")[0]
    res = _sh(f"{shlex.quote(str(Path(sys.executable)))} -m reamkit.cli fit {moved} --memory 16GB --context 4k",
              tmp_path)                                   # absolute path, from another folder
    assert "pick: " in res.stdout
    res = _sh(".venv/bin/reamkit compare elsewhere/moved-run", home)
    assert "n/a" not in json.dumps([r["kld_mean"] for r in
                                   json.loads((moved / "report" / "compare.json").read_text())["rows"]])
    # an ambiguous choice names the candidates on one line
    amb = subprocess.run(".venv/bin/reamkit serve elsewhere/moved-run --variant Q8_0", shell=True, cwd=home,
                         env=_env(), capture_output=True, text=True, timeout=60)
    assert amb.returncode == 2 and len(amb.stderr.strip().splitlines()) == 1
    assert "none:Q8_0" in amb.stderr and "ream:Q8_0" in amb.stderr
    assert _serve_answers(".venv/bin/reamkit serve elsewhere/moved-run --variant ream:Q4_K_M", home) \
        .endswith("Q4_K_M")
    _check_cards(moved)                                  # as the pipeline wrote them, moved
    _sh(".venv/bin/reamkit card elsewhere/moved-run", home)
    _check_cards(moved)                                  # and written again in the new place


def _check_cards(moved: Path) -> None:
    cards = [moved / "report" / "README.md", *sorted(moved.glob("release/*-GGUF/README.md"))]
    assert [c.parent.name for c in cards[1:]] == ["tiny-GGUF", "tiny-ream-12e-GGUF"]
    for card in cards:
        links = _card_links(card)
        assert sum(ln.endswith(".gguf") for ln in links) >= 3 and any(ln.endswith(".png") for ln in links)
        for link in links:
            assert (card.parent / link).is_file(), f"{card}: {link}"
    for folder in (c.parent for c in cards[1:]):
        model = folder.name.removesuffix("-GGUF")
        names = sorted(p.name for p in folder.iterdir())
        assert f"{model}.imatrix.gguf" in names and "size_vs_kld.png" in names
        for name in names:
            if name.endswith(".gguf"):
                assert os.stat(folder / name).st_ino == os.stat(moved / "gguf" / model / name).st_ino  # linked
        in_card = {Path(ln).name for ln in _card_links(folder / "README.md")}
        assert in_card == set(names) - {"README.md"}         # every file shown, nothing else
