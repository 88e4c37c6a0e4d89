"""The llama.cpp tools get a grace at exit for their log thread (see reamkit.llamacpp.process)."""

from __future__ import annotations

import os
import subprocess
import time

from reamkit.llamacpp.process import LINGER_MS, linger_env, linger_library


def _wall(env: dict) -> float:
    t0 = time.monotonic()
    subprocess.run(["/bin/true"], env=env, check=True)
    return time.monotonic() - t0


def test_the_preloaded_library_lingers_at_exit_and_keeps_the_users_preload(monkeypatch):
    lib = linger_library()
    assert lib is not None and lib.is_file()
    monkeypatch.setenv("LD_PRELOAD", "")
    env = {**os.environ, **linger_env()}
    assert env["LD_PRELOAD"] == str(lib)
    plain = min(_wall(dict(os.environ)) for _ in range(3))
    lingering = min(_wall(env) for _ in range(3))
    assert lingering - plain > 0.8 * LINGER_MS / 1000        # its exit destructor ran
    monkeypatch.setenv("LD_PRELOAD", "/some/user.so")
    assert linger_env()["LD_PRELOAD"] == f"/some/user.so {lib}"
