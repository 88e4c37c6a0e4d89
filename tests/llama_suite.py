"""llama.cpp's own server unit tests (the pinned source's ``tools/server/tests/unit/``) as a conformance test of
``reamkit serve``: the same tests run against plain ``llama-server`` and against ``reamkit serve`` on the same
GGUF, and every test the plain server passes must pass through reamkit too, except the deliberate differences
listed in :data:`DIFFERENCES` (each with its reason; the README's serving section lists them).

Nothing of the suite is kept in this repository. Its files come from the pinned llama-cpp-python sdist (sha256
checked against ``constraints.txt``), fetched once with pip and extracted into the reamkit cache; each run
copies them to a temporary folder. They run in a virtual environment of their own (the suite's requirements,
pinned in ``data/llama_server_tests_requirements.txt``), with one plugin of ours (``llama_suite_plugin.py``)
that changes only how a server starts: every preset's model becomes the demo model's F16 GGUF, and the binary
is ``llama-server`` or a shim that starts ``reamkit serve`` with the same options. Many tests assert the text of
the suite's own model (stories260K); those fail on both sides alike and are not differences.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
PLUGIN = HERE / "llama_suite_plugin.py"
REQUIREMENTS = HERE / "data" / "llama_server_tests_requirements.txt"
FILES = ("test_basic.py", "test_chat_completion.py", "test_completion.py", "test_security.py")
# what a run needs from the llama.cpp source: the suite, the templates and media files its tests name
MEMBERS = ("tools/server/tests/", "models/templates/", "tools/mtmd/test-")

# Tests reamkit serve fails on purpose where plain llama-server passes (test ids, or fnmatch patterns of them): why.
ONE_HOST = "reamkit serve listens on one address (--host); llama-server's comma-separated list is not taken"
KV_UNIFIED = ("reamkit serve starts llama-server with --kv-unified: the slots share one KV cache, so a slot's "
              "n_ctx is the whole context (one agent's long prompt may use all of it), not the context divided "
              "by the slots")
TEMPLATE_FILE = ("reamkit serve takes a chat template from the GGUF or a file (--chat-template-file) only; "
                 "llama-server's --chat-template (a built-in name or an inline template) is refused at start")
UNSAFE = ("reamkit serve refuses llama-server's options that let a request act on the machine: --tools "
          "(server-side tools: shell, files) and --ui-mcp-proxy (/cors-proxy fetches any URL for the caller)")
NOT_SERVED = ("reamkit serve serves only its documented endpoints: llama-server's /props, /slots and /metrics "
              "answer 404 (/slots shows every slot's prompt, /props the model's path and settings; the owner reaches "
              "them on the private port)")
ALLOW_HEADERS = ("a preflight's Access-Control-Allow-Headers echoes its Access-Control-Request-Headers, not '*': "
                 "browsers do not let '*' cover Authorization, so a browser client could not send the API key")
DIFFERENCES: dict[str, str] = {
    "test_basic.py::test_server_multiple_addresses": ONE_HOST,
    "test_basic.py::test_server_props": f"{NOT_SERVED}; and {KV_UNIFIED}",
    "test_basic.py::test_server_slots": f"{NOT_SERVED}; and {KV_UNIFIED}",
    # reads /slots to see the abandoned request stopped; tests/test_serve_hardening.py shows it stops through reamkit
    "test_completion.py::test_cancel_request": NOT_SERVED,
    "test_security.py::test_cors_options[web.mydomain.fr-Access-Control-Allow-Headers-*]": ALLOW_HEADERS,
    "test_chat_completion.py::test_context_size_exceeded*": KV_UNIFIED,
    "test_completion.py::test_nocache_long_input_prompt": KV_UNIFIED,       # fits the whole context, not a slot's
    "test_chat_completion.py::test_chat_template": TEMPLATE_FILE,
    "test_chat_completion.py::test_chat_template_continue_final_message_mutual_exclusion": TEMPLATE_FILE,
    "test_chat_completion.py::test_apply_chat_template": TEMPLATE_FILE,
    "test_security.py::test_cors_origins_defaults_to_localhost_with_tools_enabled": UNSAFE,
    "test_security.py::test_cors_proxy_only_forwards_explicit_proxy_headers": UNSAFE,
}


def cache_root() -> Path:
    from reamkit.cache import cache_root as root

    return root()


def suite_source() -> Path:
    """The pinned llama.cpp source's server tests (with the templates and media they read), extracted once."""
    from reamkit.fsutil import atomic_dir
    from reamkit.llamacpp.toolchain import pins

    p = pins()
    target = cache_root() / f"llama-server-tests-{p.llama_cpp_commit}"
    if (target / "tools" / "server" / "tests" / "unit").is_dir():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "-d", tmp,
                        f"llama-cpp-python=={p.llama_cpp_python}"], check=True, timeout=900)
        sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        sha = hashlib.sha256(sdist.read_bytes()).hexdigest()
        if sha != p.sdist_sha256:
            raise RuntimeError(f"{sdist.name} has sha256 {sha}, constraints.txt pins {p.sdist_sha256}")
        prefix = f"llama_cpp_python-{p.llama_cpp_python}/vendor/llama.cpp/"
        with tarfile.open(sdist) as tar, atomic_dir(target) as out:
            members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith(prefix)
                       and m.name[len(prefix):].startswith(MEMBERS)]
            for m in members:
                m.name = m.name[len(prefix):]
            tar.extractall(out, members=members, filter="data")
    return target


def suite_python() -> Path:
    """A virtual environment with the suite's pinned requirements, made once."""
    key = hashlib.sha256(REQUIREMENTS.read_bytes() + sys.version.encode()).hexdigest()[:12]
    venv = cache_root() / f"llama-server-tests-venv-{key}"
    python = venv / "bin" / "python"
    if python.is_file():
        return python
    from reamkit.fsutil import atomic_dir

    with atomic_dir(venv) as tmp:
        subprocess.run([sys.executable, "-m", "venv", str(tmp)], check=True)
        subprocess.run([str(tmp / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        "-r", str(REQUIREMENTS)], check=True, timeout=900)
    # (its entry-point scripts name the temporary folder; runs use ``python -m pytest``)
    return python


def demo_gguf() -> Path:
    from reamkit.zoo import DEMO_MODEL

    from .serving_helpers import cached_conversion

    return Path(cached_conversion(DEMO_MODEL, cache_root() / "serve-conformance" / "demo.F16.gguf"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Outcome:
    outcome: str          # passed / failed / skipped
    message: str = ""     # the failure's last line


def run_side(side: str, work: Path, files: tuple[str, ...] = FILES, select: str | None = None,
             test_timeout: int = 120, timeout: float = 3600) -> dict[str, Outcome]:
    """Run the suite's ``files`` (``-k select``) against ``side`` ("llama-server" or "reamkit") in ``work``;
    returns each test id's outcome."""
    from reamkit.llamacpp.repack import repack_env
    from reamkit.llamacpp.toolchain import find_toolchain

    import reamkit

    src, python, gguf = suite_source(), suite_python(), demo_gguf()
    root = work / side
    shutil.copytree(src, root)
    tests = root / "tools" / "server" / "tests"
    shutil.copy(PLUGIN, tests / PLUGIN.name)
    logs = work / f"{side}-logs"
    logs.mkdir()
    if side == "llama-server":
        server = str(find_toolchain().tool("llama-server"))
    else:
        server = str(work / "reamkit-serve-shim")
        Path(server).write_text(f"#!/bin/sh\nPYTHONPATH={Path(reamkit.__file__).parents[1]} "
                                f"exec {sys.executable} {tests / PLUGIN.name} shim \"$@\"\n")
        os.chmod(server, 0o755)
    results = work / f"{side}.jsonl"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LLAMA_ARG_HOST", "DEBUG")}
    env.update(repack_env("llama-server"), LLAMA_SUITE_GGUF=str(gguf), LLAMA_SUITE_SERVER=server,
               LLAMA_SUITE_LOGS=str(logs), LLAMA_SUITE_RESULTS=str(results),
               LLAMA_SUITE_TEST_TIMEOUT=str(test_timeout), PORT=str(_free_port()), LLAMA_CACHE=str(work / "hf"))
    cmd = [str(python), "-m", "pytest", "-p", "llama_suite_plugin", "-p", "no:cacheprovider", "-q", "-m",
           "not slow", *[f"unit/{f}" for f in files]]
    if select:
        cmd += ["-k", select]
    with open(work / f"{side}.out", "wb") as out:
        try:
            subprocess.run(cmd, cwd=tests, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
        except subprocess.TimeoutExpired:          # what ran is in the results file; the rest counts as missing
            out.write(f"\nstopped after {timeout:.0f} s\n".encode())
    outcomes: dict[str, Outcome] = {}
    rank = {"passed": 0, "skipped": 1, "failed": 2}
    for line in results.read_text().splitlines() if results.exists() else []:
        rec = json.loads(line)             # one per phase (setup, call, teardown): the worst one counts
        test_id = rec["nodeid"].removeprefix("unit/")
        seen = outcomes.get(test_id)
        if seen is None or rank[rec["outcome"]] > rank[seen.outcome]:
            outcomes[test_id] = Outcome(rec["outcome"], rec.get("message", ""))
    return outcomes


def run_both(work: Path, files: tuple[str, ...] = FILES, select: str | None = None, test_timeout: int = 120,
             timeout: float = 3600) -> tuple[dict[str, dict[str, Outcome]], dict[str, float]]:
    """Both sides at once, each on its own port (so a neighbour's load hits them alike): their outcomes and
    the seconds each took."""
    import threading
    import time

    sides: dict[str, dict[str, Outcome]] = {}
    times: dict[str, float] = {}

    def run(side: str) -> None:
        start = time.monotonic()
        sides[side] = run_side(side, work, files, select, test_timeout, timeout)
        times[side] = time.monotonic() - start

    suite_source(), suite_python(), demo_gguf()      # made (once) before the sides share them
    threads = [threading.Thread(target=run, args=(side,)) for side in ("llama-server", "reamkit")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sides, times


def deliberate(test_id: str) -> str | None:
    if test_id in DIFFERENCES:                       # an exact id first: parametrized ids hold [ ] and *
        return DIFFERENCES[test_id]
    return next((why for pattern, why in DIFFERENCES.items() if fnmatch.fnmatchcase(test_id, pattern)), None)


@dataclass
class Comparison:
    per_file: dict[str, tuple[int, int, int]]     # file -> (tests, passed by llama-server, passed by reamkit serve)
    explained: list[tuple[str, str]]                # (test id, reason) failed through reamkit on purpose
    unexplained: list[tuple[str, str]]              # (test id, reamkit's failure) the plain server passes
    only_reamkit: list[str]                         # passed through reamkit, failed by plain llama-server


def compare(plain: dict[str, Outcome], served: dict[str, Outcome]) -> Comparison:
    per_file: dict[str, list[int]] = {}
    explained, unexplained, only_reamkit = [], [], []
    for test_id in sorted(set(plain) | set(served)):
        a = plain.get(test_id, Outcome("missing")).outcome
        b = served.get(test_id, Outcome("missing")).outcome
        row = per_file.setdefault(test_id.split("::")[0], [0, 0, 0])
        row[0] += 1
        row[1] += a == "passed"
        row[2] += b == "passed"
        if a == "passed" and b != "passed":
            why = deliberate(test_id)
            if why:
                explained.append((test_id, why))
            else:
                unexplained.append((test_id, served.get(test_id, Outcome("missing")).message or b))
        elif b == "passed" and a != "passed":
            only_reamkit.append(test_id)
    return Comparison({f: tuple(r) for f, r in per_file.items()}, explained, unexplained, only_reamkit)


def table(c: Comparison) -> str:
    lines = ["| file | tests | llama-server passes | reamkit serve passes |", "|---|---|---|---|"]
    lines += [f"| {f} | {n} | {a} | {b} |" for f, (n, a, b) in sorted(c.per_file.items())]
    lines += [f"deliberate: {t}: {why}" for t, why in c.explained]
    lines += [f"UNEXPLAINED: {t}: {msg}" for t, msg in c.unexplained]
    lines += [f"only through reamkit serve: {t}" for t in c.only_reamkit]
    return "\n".join(lines)
