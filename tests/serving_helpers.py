"""Shared pieces of the serve tests: a tiny Qwen3-Coder-style GGUF and a real ``reamkit serve`` process.

The GGUF is the zoo's ``qwen3_next`` model with Qwen3-Coder's chat template (``data/qwen3_coder_chat_template.jinja``,
the copy llama.cpp keeps in ``models/templates/Qwen3-Coder.jinja``) and a 64k training context, so llama-server
picks its Qwen3-Coder tool-call parser and lets a slot hold an agent's long prompt. It is converted once into
the reamkit cache. Servers run as ``reamkit serve`` subprocesses in their own process group on a free loopback
port and are always killed with their group.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
TEMPLATE = DATA / "qwen3_coder_chat_template.jinja"
KEY = "test-key-123"
EOS_ID = 2   # <|im_end|> in the zoo tokenizer


def cached_conversion(model: Path, out: Path) -> Path:
    """``model`` converted to an F16 GGUF kept in the reamkit cache across test runs; a cached file that an
    earlier reamkit made from other inputs (or under other keys) is made again, not refused."""
    from reamkit.errors import OutputExistsError
    from reamkit.gguf import convert_to_gguf
    from reamkit.manifest import manifest_path_for

    try:
        return convert_to_gguf(model, out, dtype="f16")[0]
    except OutputExistsError:
        out.unlink(missing_ok=True)
        manifest_path_for(out, folder=False).unlink(missing_ok=True)
        return convert_to_gguf(model, out, dtype="f16")[0]


def tiny_coder_gguf_path() -> Path:
    from reamkit.zoo import build_cached, cache_root

    out = cache_root() / "serve-tests" / "tiny-coder.F16.gguf"
    src = build_cached("qwen3_next")
    model = cache_root() / "serve-tests" / "tiny-coder-hf"
    if not (model / "config.json").is_file() or (model / "chat_template.jinja").read_text() != TEMPLATE.read_text():
        shutil.rmtree(model, ignore_errors=True)
        shutil.copytree(src, model, ignore=shutil.ignore_patterns("reamkit-manifest.json"))
        config = json.loads((model / "config.json").read_text())
        config["max_position_embeddings"] = 65536
        (model / "config.json").write_text(json.dumps(config, indent=2))
        shutil.copy(TEMPLATE, model / "chat_template.jinja")
    return cached_conversion(model, out)


@pytest.fixture(scope="session")
def tiny_coder_gguf() -> Path:
    return tiny_coder_gguf_path()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """A running ``reamkit serve``; ``url`` is its root, ``log`` its stderr so far."""

    def __init__(self, gguf: Path, tmp: Path, *args: str, key: str | None = KEY, ctx: int = 4096,
                 parallel: int = 2, threads: int = 1, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.key = key
        self.log_path = tmp / f"serve-{self.port}.log"
        self.llama_log = tmp / f"llama-server-{self.port}.log"
        cmd = [sys.executable, "-m", "reamkit.cli", "serve", str(gguf), "--port", str(self.port),
               "--ctx", str(ctx), "--parallel", str(parallel), "--threads", str(threads), "--alias", "tiny-coder",
               "--log-file", str(self.llama_log), "-v", *args]
        if key:
            cmd += ["--api-key", key]
        self._err = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self._err, stdin=subprocess.DEVNULL,
                                     start_new_session=True, env={**os.environ, **(env or {})})
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"reamkit serve exited {self.proc.returncode}:\n{self.log}")
            if "serving " in self.log:
                return
            time.sleep(0.1)
        raise TimeoutError(f"reamkit serve not ready:\n{self.log}")

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def post(self, path: str, body: dict | bytes, headers: dict | None = None, timeout: float = 60):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method="POST",
                                     headers={"Content-Type": "application/json", **self.headers(), **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                return e.code, json.loads(raw)
            except ValueError:
                return e.code, raw.decode(errors="replace")

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)    # anything left in the group
        except ProcessLookupError:
            pass
        self._err.close()
        return self.proc.returncode


def weather_tool() -> dict:
    """A tool whose arguments the grammar bounds (a small integer, a boolean), so even a random model ends the
    call in a few dozen tokens."""
    return {"type": "function", "function": {
        "name": "get_weather", "description": "Weather forecast for the coming days",
        "parameters": {"type": "object", "properties": {
            "days": {"type": "integer", "minimum": 1, "maximum": 7},
            "metric": {"type": "boolean"}}, "required": ["days", "metric"]}}}


def write_tool() -> dict:
    return {"type": "function", "function": {
        "name": "write_file", "description": "Write a file",
        "parameters": {"type": "object", "properties": {"path": {"type": "string"}, "content": {"type": "string"}},
                       "required": ["path", "content"]}}}


def anthropic_tool(tool: dict) -> dict:
    fn = tool["function"]
    return {"name": fn["name"], "description": fn["description"], "input_schema": fn["parameters"]}


def npm_agent(package: str, version: str, binary: str) -> Path:
    """A coding agent's pinned npm ``package``, installed once (atomically) under the reamkit cache; the path of
    its ``binary``."""
    from reamkit.zoo import cache_root

    home = cache_root() / "agents" / f"{package.rsplit('/', 1)[-1]}-{version}"
    path = home / "node_modules" / ".bin" / binary
    if path.exists():
        return path
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip(f"npm is not installed: the agent test installs {package} from the npm registry")
    home.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{home.name}.tmp-", dir=home.parent))
    try:
        subprocess.run([npm, "install", "--prefix", str(tmp), "--no-audit", "--no-fund", "--loglevel=error",
                        f"{package}@{version}"], check=True, timeout=900)
        os.replace(tmp, home)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def agent_env(exports: str, home: Path, drop: tuple[str, ...]) -> dict:
    """This process's environment less the variables starting with ``drop``, plus the ``export NAME=value`` lines
    of a printed client configuration, with ``HOME`` in the test's folder."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    for line in exports.splitlines():
        if line.startswith("export "):
            key, value = line[len("export "):].split("#")[0].strip().split("=", 1)
            env[key] = value
    home.mkdir(parents=True, exist_ok=True)
    env["HOME"] = str(home)
    return env
