"""Loaded into llama.cpp's own server test suite (``pytest -p llama_suite_plugin``): the one change to it is how
a server starts. Its fixture would download a model from Hugging Face and start ``../../../build/bin/llama-server``;
here every preset's model is our GGUF, nothing is downloaded, and the binary is whatever
``LLAMA_SUITE_SERVER`` names: the pinned ``llama-server`` itself, or this file as a shim that turns the suite's
llama-server command line into ``reamkit serve`` (run as ``python llama_suite_plugin.py shim ARGS``).

Standard library only: it runs in the suite's own virtual environment (the shim runs in reamkit's).
"""

from __future__ import annotations

import json
import os
import signal
import sys

import pytest

# llama-server options (as the suite spells them) that take a value; every other one is a switch
VALUED = {"--port", "--temp", "--seed", "--host", "--model", "--model-url", "--model-draft", "--hf-repo", "--hf-file",
          "--models-dir", "--models-max", "--models-preset", "--cors-origins", "--batch-size", "--ubatch-size",
          "--threads", "--n-gpu-layers", "--pooling", "--alias", "--tags", "--ctx-size", "--parallel", "-ctk",
          "-ctv", "-fa", "--n-predict", "--slot-save-path", "--grp-attn-n", "--grp-attn-w", "--lora", "--spec-type",
          "--api-key", "--spec-draft-n-max", "--spec-draft-n-min", "--spec-synth-len", "--spec-synth-rates",
          "--reasoning-format", "--reasoning", "--chat-template", "--chat-template-file", "--mmproj-url",
          "--media-path", "--sleep-idle-seconds", "--cache-ram", "--tools", "--tools-runtime",
          "--mcp-servers-config", "--mcp-servers-json"}
# llama-server options that reamkit serve has too, meaning the same (llama-server's name -> reamkit serve's), used
# where this reamkit serve has them; any other option goes to llama-server (``--verbose`` too: reamkit's logs
# requests, llama-server's adds debug fields to answers)
SAME = {"--port": "--port", "--host": "--host", "--api-key": "--api-key", "--alias": "--alias",
        "--ctx-size": "--ctx", "--parallel": "--parallel", "--threads": "--threads", "-ctk": "--cache-type",
        "-ctv": "--cache-type", "--chat-template-file": "--chat-template-file", "--cors-origins": "--cors-origins"}


def pytest_configure(config):
    sys.path.insert(0, os.getcwd())
    import utils

    gguf, server = os.environ["LLAMA_SUITE_GGUF"], os.environ["LLAMA_SUITE_SERVER"]
    real_start = utils.ServerProcess.start

    def start(self, *args, **kwargs):
        self.model_hf_repo = self.model_hf_file = self.model_url = self.mmproj_url = None
        self.model_file, self.server_path = gguf, server
        return real_start(self, *args, **kwargs)

    utils.ServerProcess.start = start
    utils.ServerPreset.load_all = staticmethod(lambda: None)     # nothing to download


class TestTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise TestTimeout(f"over {os.environ['LLAMA_SUITE_TEST_TIMEOUT']} s")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Each test within ``LLAMA_SUITE_TEST_TIMEOUT`` seconds (the suite's requests may wait 600 s)."""
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(int(os.environ.get("LLAMA_SUITE_TEST_TIMEOUT", "120")))
    try:
        yield
    finally:
        signal.alarm(0)


def pytest_runtest_logreport(report):
    """Every phase's outcome, one JSON line each, written as it happens (a run cut short keeps what it did)."""
    message = ""
    if report.failed:
        lines = [ln for ln in str(report.longrepr).splitlines() if ln.strip()]
        message = next((ln for ln in reversed(lines) if ln.startswith("E ")), lines[-1] if lines else "")[:300]
    with open(os.environ["LLAMA_SUITE_RESULTS"], "a") as f:
        f.write(json.dumps({"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
                            "message": message}) + "\n")


def reamkit_command(argv: list[str], options: set[str], log_file: str) -> list[str]:
    """``reamkit serve`` arguments for a llama-server command line: the options ``reamkit serve`` has itself
    (``options``) go to it, every other one to llama-server through ``--llama-arg``."""
    out, model, i = [], None, 0
    while i < len(argv):
        name = argv[i]
        value = argv[i + 1] if name in VALUED and i + 1 < len(argv) else None
        i += 2 if value is not None else 1
        own = SAME.get(name)
        if name == "--model":
            model = value
        elif own in options and own not in out:
            out += [own] if value is None else [own, value]
        else:
            out.append(f"--llama-arg={name}")
            if value is not None:
                out.append(f"--llama-arg={value}")
    return [model or "", *out, "--log-file", log_file]


def shim(argv: list[str]) -> None:
    import typer.main

    from reamkit.cli import app

    command = typer.main.get_command(app).commands["serve"]
    options = {o for p in command.params for o in p.opts if o.startswith("--")} - {"--llama-arg", "--log-file"}
    log_file = os.path.join(os.environ.get("LLAMA_SUITE_LOGS", "."), f"llama-server-{os.getpid()}.log")
    cmd = [sys.executable, "-m", "reamkit.cli", "serve", *reamkit_command(argv, options, log_file)]
    print("reamkit serve shim:", " ".join(cmd), flush=True)
    os.execv(sys.executable, cmd)


if __name__ == "__main__" and sys.argv[1:2] == ["shim"]:
    shim(sys.argv[2:])
