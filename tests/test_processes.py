"""Exactly one module starts llama.cpp processes (reamkit.llamacpp.process): every use of subprocess, os.exec*,
os.fork, asyncio's subprocesses or multiprocessing in the package is found by walking its syntax trees, and only
that module and an explicit list of modules that start other processes may have one."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import reamkit

SRC = Path(reamkit.__file__).parent
RUNNER = "llamacpp/process.py"

# Modules that start processes other than llama.cpp's, each with what it starts. None of them may mention
# llama.cpp, a llama.cpp tool or the converter: those go through the runner.
OTHERS = {
    "evaluation/sandbox.py": "the HumanEval sandbox: a generated program's launcher, and a check of the sandbox user",
    "evaluation/sandbox_launcher.py": "inside the sandbox: forks the generated program and execs its interpreter",
    "pipeline/executors.py": "the run's local stage workers (a process pool)",
}
LLAMA_CPP = re.compile(r"llama|convert_hf_to_gguf|converter_entry", re.I)

_STARTERS = re.compile(
    r"^(subprocess\.(Popen|run|call|check_call|check_output|getoutput|getstatusoutput)"
    r"|os\.(exec\w*|spawn\w*|fork|forkpty|posix_spawn\w*|system|popen)"
    r"|asyncio\.create_subprocess_\w+|multiprocessing(\.\w+)*|concurrent\.futures\.ProcessPoolExecutor|pty\.spawn"
    r"|.*\.subprocess_(exec|shell))$")


def process_starts(source: str) -> list[tuple[int, str]]:
    """``(line, what)`` for each reference to a function or class that starts a process (annotations aside),
    with import aliases resolved (``import subprocess as sp``, ``from os import execv``)."""
    tree = ast.parse(source)
    alias: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                alias[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                alias[a.asname or a.name] = f"{node.module}.{a.name}"
    annotations = {id(n) for node in ast.walk(tree) for ann in _annotations(node) for n in ast.walk(ann)}
    found = []
    for node in ast.walk(tree):
        if id(node) in annotations or not isinstance(node, (ast.Attribute, ast.Name)):
            continue
        if not isinstance(getattr(node, "ctx", None), ast.Load):
            continue
        name = _dotted(node, alias)
        if name and _STARTERS.match(name):
            found.append((node.lineno, name))
    # an outer attribute (multiprocessing.get_context) and its inner name (multiprocessing) are one use
    return sorted({(line, max((n for ln, n in found if ln == line and n.startswith(name)), key=len))
                   for line, name in found})


def _annotations(node: ast.AST) -> list[ast.AST]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        args = [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs, node.args.vararg, node.args.kwarg]
        return [a.annotation for a in args if a is not None and a.annotation is not None] + (
            [node.returns] if node.returns else [])
    if isinstance(node, ast.AnnAssign):
        return [node.annotation]
    return []


def _dotted(node: ast.AST, alias: dict[str, str]) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([alias.get(node.id, node.id), *reversed(parts)])
    return "?." + ".".join(reversed(parts)) if parts else None


def starters() -> dict[str, list[tuple[int, str]]]:
    """``{module path relative to the package: its process starts}`` for every module that has one."""
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        found = process_starts(path.read_text())
        if found:
            out[path.relative_to(SRC).as_posix()] = found
    return out


def test_only_the_runner_starts_llama_cpp_processes():
    found = starters()
    stray = [f"src/reamkit/{mod}:{line} uses {what}" for mod, uses in found.items()
             if mod != RUNNER and mod not in OTHERS for line, what in uses]
    assert not stray, ("only reamkit.llamacpp.process starts processes (run llama.cpp tools through "
                       "reamkit.llamacpp.tools.run_tool; list a module that starts other processes in OTHERS):\n"
                       + "\n".join(stray))
    assert RUNNER in found, "the runner itself starts no process any more: is the walk still finding them?"
    stale = sorted(set(OTHERS) - set(found))
    assert not stale, f"listed in OTHERS but starting no process: {', '.join(stale)}"


def test_modules_starting_other_processes_do_not_touch_llama_cpp():
    mentions = [f"src/reamkit/{mod}:{n}: {line.strip()}" for mod in OTHERS
                for n, line in enumerate((SRC / mod).read_text().splitlines(), 1) if LLAMA_CPP.search(line)]
    assert not mentions, "a module that starts its own processes mentions llama.cpp:\n" + "\n".join(mentions)


def test_the_walk_finds_each_way_of_starting_a_process():
    source = """
import subprocess as sp
import os, asyncio
import multiprocessing as mp
from os import execv
from subprocess import Popen
from concurrent.futures import ProcessPoolExecutor

def f(p: subprocess.Popen) -> sp.Popen:
    sp.run(["llama-quantize"])
    Popen(["x"])
    os.execve("/bin/x", [], {})
    execv("/bin/x", [])
    asyncio.create_subprocess_exec("x")
    mp.get_context("spawn")
    ProcessPoolExecutor(2)
    os.fork()
    loop.subprocess_exec(None, "x")
    return sp.TimeoutExpired
"""
    assert [what for _, what in process_starts(source)] == [
        "subprocess.run", "subprocess.Popen", "os.execve", "os.execv", "asyncio.create_subprocess_exec",
        "multiprocessing.get_context", "concurrent.futures.ProcessPoolExecutor", "os.fork", "loop.subprocess_exec"]
