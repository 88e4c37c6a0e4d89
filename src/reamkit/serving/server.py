"""``reamkit serve``: start the pinned llama-server on a private port, put the thin layer of :mod:`.proxy` in
front of it, wait until both answer, and take both down on Ctrl-C / SIGTERM (or when llama-server dies)."""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import secrets
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from .. import defaults
from ..cache import cache_root
from ..errors import ReamkitError
from ..llamacpp import process
from ..llamacpp.process import last_error_line
from ..llamacpp.toolchain import find_toolchain
from ..llamacpp.tools import start_server
from .models import resolve_model

log = logging.getLogger("reamkit.serve")
# seconds answers in flight may take to finish on Ctrl-C / SIGTERM; then they are cut and llama-server stopped
SHUTDOWN_GRACE = 0.5
SECOND_SIGTERM_AFTER = 1.0     # seconds llama-server has to exit on SIGTERM before it gets a second one
CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")


@dataclass
class ServeOptions:
    host: str = defaults.HOST
    port: int = defaults.PORT
    api_key: str | None = None
    ctx: int = defaults.CONTEXT
    parallel: int = defaults.PARALLEL
    threads: int | None = None
    cache_type: str = defaults.CACHE_TYPE
    alias: str | None = None
    chat_template_file: Path | None = None
    max_body_mb: float = defaults.MAX_BODY_MB
    log_file: Path | None = None
    verbose: bool = False
    allow_unknown_fields: bool = False
    strict_fields: bool = False
    cors_origins: str = defaults.CORS_ORIGINS
    startup_timeout: float = 600.0
    layer_nice: int = defaults.LAYER_NICE
    extra_args: list[str] = field(default_factory=list)


def check_options(opts: ServeOptions) -> None:
    """Refuse bad settings in one line before anything starts."""
    if not 0 <= opts.port <= 65535:
        raise ReamkitError(f"--port {opts.port} is not a TCP port (0-65535)")
    if opts.ctx < 256:
        raise ReamkitError(f"--ctx {opts.ctx} is too small; agents need {defaults.CONTEXT} or more")
    if opts.parallel < 1:
        raise ReamkitError(f"--parallel {opts.parallel} must be at least 1")
    if opts.cache_type not in CACHE_TYPES:
        raise ReamkitError(f"--cache-type {opts.cache_type} is not one of {', '.join(CACHE_TYPES)}")
    if not 0 <= opts.layer_nice <= 19:
        raise ReamkitError(f"--layer-nice {opts.layer_nice} must be between 0 and 19")
    if opts.max_body_mb <= 0:
        raise ReamkitError(f"--max-body-mb {opts.max_body_mb} must be positive")
    if opts.api_key is not None and not opts.api_key.strip():
        raise ReamkitError("--api-key is empty")
    if opts.allow_unknown_fields and opts.strict_fields:
        raise ReamkitError("--allow-unknown-fields and --strict-fields contradict each other; pass one")
    if not opts.cors_origins.strip():
        raise ReamkitError("--cors-origins is empty; pass '*', 'localhost' or a comma-separated list of origins")
    if opts.chat_template_file and not Path(opts.chat_template_file).is_file():
        raise ReamkitError(f"chat template file {opts.chat_template_file} not found")
    forbidden = {"--tools", "--agent", "-ag", "--slot-save-path", "--rpc", "--mcp-servers-config",
                 "--mcp-servers-json", "--ui-mcp-proxy", "--webui-mcp-proxy", "--host", "--port", "--api-key",
                 "--api-key-file", "--chat-template"}
    bad = [a for a in opts.extra_args if a.split("=")[0] in forbidden]
    if bad:
        raise ReamkitError(f"llama-server option {bad[0]} cannot be passed through (reamkit sets it, or it is unsafe)")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def llama_server_command(binary: Path, model: Path, opts: ServeOptions, port: int, key_file: str,
                         alias: str) -> list[str]:
    """The command line, with the private port's key as a file name (never the key: command lines are
    world-readable in /proc). ``/slots`` and ``/metrics`` are on for the owner; the layer serves neither."""
    cmd = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "--api-key-file", key_file,
           "--alias", alias, "-c", str(opts.ctx), "-np", str(opts.parallel), "--kv-unified",
           "--jinja", "--no-webui", "--cors-origins", "localhost", "--metrics",
           "-ctk", opts.cache_type, "-ctv", opts.cache_type]
    if opts.threads:
        cmd += ["-t", str(opts.threads), "-tb", str(opts.threads)]
    if opts.chat_template_file:
        cmd += ["--chat-template-file", str(opts.chat_template_file)]
    return cmd + list(opts.extra_args)


def key_pipe(key: str) -> int:
    """The read end of a pipe holding ``key``: llama-server reads it as ``/dev/fd/N``, which only processes of
    the same user can open; once read, the key is nowhere but in the two processes' memory."""
    read, write = os.pipe()
    os.write(write, key.encode() + b"\n")
    os.close(write)
    return read


class LlamaServer:
    """The llama-server child: its own process group, its log in a file, stopped with the whole group.
    ``cmd`` is its command line, or ``cmd(key_file)`` gives it, the key reaching it through :func:`key_pipe`."""

    def __init__(self, cmd, log_path: Path, port: int, key: str):
        self.log_path, self.port, self.key = log_path, port, key
        self.url = f"http://127.0.0.1:{port}"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "ab")
        fd = key_pipe(key)
        try:
            self.cmd = cmd(f"/dev/fd/{fd}") if callable(cmd) else cmd
            self.proc = start_server(self.cmd, log=self._log, pass_fds=(fd,))
        finally:
            os.close(fd)

    def get(self, path: str) -> dict:
        req = urllib.request.Request(self.url + path, headers={"Authorization": f"Bearer {self.key}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.load(r)

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ReamkitError(f"llama-server exited (code {self.proc.returncode}): {self.last_error()}",
                                   fix=f"see {self.log_path}")
            try:
                if self.get("/health").get("status") == "ok":
                    return
            except (urllib.error.URLError, OSError, ValueError):
                pass
            time.sleep(0.2)
        self.stop()
        raise ReamkitError(f"llama-server did not become healthy within {timeout:.0f} s", fix=f"see {self.log_path}")

    def last_error(self) -> str:
        try:
            return last_error_line(self.log_path.read_text(errors="replace")[-20000:])
        except OSError:
            return "no log"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace: float = 15.0) -> None:
        process.stop(self.proc, grace, second_sigterm_after=SECOND_SIGTERM_AFTER)
        self._log.close()


def lower_own_priority(increment: int) -> None:
    """Give every thread of this process (and the threads it starts later, which inherit it) a nice value of
    ``increment``: when llama-server's threads use every core, the layer's few microseconds per streamed chunk
    then wait for a gap instead of preempting a generation thread, which holds up its peers at each of the
    graph's barriers (2 threads on 2 cores: serve / direct 0.91 -> 1.03). With spare cores it changes nothing."""
    if increment <= 0:
        return
    tasks = Path("/proc/self/task")
    for task in tasks.iterdir() if tasks.is_dir() else []:
        try:
            tid = int(task.name)
            os.setpriority(os.PRIO_PROCESS, tid, max(increment, os.getpriority(os.PRIO_PROCESS, tid)))
        except (OSError, ValueError):          # a thread that just ended
            pass


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def default_log_path(port: int) -> Path:
    return cache_root() / "logs" / f"llama-server-{port}-{os.getpid()}.log"


def serve(model: str | Path, opts: ServeOptions, *, variant: str | None = None, on_ready=None) -> int:
    """Serve until Ctrl-C / SIGTERM. ``on_ready(url, alias, n_ctx)`` is called once both layers answer."""
    import uvicorn

    from .proxy import Settings, build_app
    from .wire import CapitalisedHeaders

    check_options(opts)
    if not is_loopback(opts.host) and not opts.api_key:
        log.warning("serving on %s without an API key: anyone who can reach this address can use the model "
                    "(pass --api-key)", opts.host)
    gguf = resolve_model(model, variant)
    tc = find_toolchain()
    port = opts.port or free_port()
    with socket.socket() as s:             # fail fast, before loading a model, if the port is taken
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((opts.host, port))
        except OSError as e:
            raise ReamkitError(f"cannot listen on {opts.host}:{port}: {e.strerror}") from None
    alias = opts.alias or gguf.name.removesuffix(".gguf")
    key = secrets.token_urlsafe(24)
    inner = free_port()
    log_path = Path(opts.log_file) if opts.log_file else default_log_path(port)
    child = LlamaServer(partial(llama_server_command, tc.tool("llama-server"), gguf, opts, inner, alias=alias),
                        log_path, inner, key)
    lower_own_priority(opts.layer_nice)          # after the fork: llama-server keeps the normal priority
    try:
        child.wait_healthy(opts.startup_timeout)
        props = child.get("/props")
        n_ctx = int((props.get("default_generation_settings") or {}).get("n_ctx") or opts.ctx)
        if n_ctx < opts.ctx:
            log.warning("llama-server caps the context at %d tokens (the model's training context), not --ctx %d",
                        n_ctx, opts.ctx)
        template = props.get("chat_template") or ""
        if not template:
            log.warning("the GGUF has no chat template: chat requests will use llama-server's fallback format")
        from .qwen3_coder import is_qwen3_coder_template

        settings = Settings(child.url, key, opts.api_key, n_ctx, is_qwen3_coder_template(template),
                            int(opts.max_body_mb * 2**20), opts.verbose, int(props.get("total_slots") or opts.parallel),
                            "strict" if opts.strict_fields else "off" if opts.allow_unknown_fields else "typos",
                            opts.cors_origins)
        config = uvicorn.Config(build_app(settings, child.alive), host=opts.host, port=port, log_level="warning",
                                access_log=False, timeout_keep_alive=30, lifespan="on", http=CapitalisedHeaders,
                                timeout_graceful_shutdown=SHUTDOWN_GRACE)
        server = uvicorn.Server(config)

        async def watch():
            import asyncio

            while not server.should_exit:
                if not child.alive():
                    log.error("llama-server exited (code %s): %s", child.proc.returncode, child.last_error())
                    server.should_exit = True
                    return
                if server.started and on_ready:
                    on_ready(f"http://{_url_host(opts.host)}:{port}", alias, n_ctx, log_path)
                    ready_sent.append(True)
                    break
                await asyncio.sleep(0.05)
            while not server.should_exit:
                if not child.alive():
                    log.error("llama-server exited (code %s): %s", child.proc.returncode, child.last_error())
                    server.should_exit = True
                    return
                await asyncio.sleep(0.5)

        ready_sent: list[bool] = []

        async def main():
            import asyncio

            task = asyncio.create_task(watch())
            await server.serve()
            task.cancel()

        import asyncio

        # uvicorn shuts down gracefully on SIGINT/SIGTERM and then re-raises the signal; make that a
        # KeyboardInterrupt so the llama-server child is always stopped below.
        signal.signal(signal.SIGTERM, _interrupt)
        try:
            asyncio.run(main())
        except KeyboardInterrupt:
            pass
        return 0 if child.alive() else 1
    finally:
        child.stop()


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    logger = logging.getLogger("reamkit.serve")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
