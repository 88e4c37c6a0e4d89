"""llama.cpp's own server tests as a conformance test of ``reamkit serve`` (:mod:`tests.llama_suite`): a subset of
them runs against plain ``llama-server`` and through ``reamkit serve`` on the demo model's GGUF, and reamkit must
pass every test the plain server passes, except the deliberate differences. ``bench/serve_conformance.py`` runs
the four whole files (test_basic, test_chat_completion, test_completion, test_security).

The first run fetches the pinned llama-cpp-python sdist with pip (the tests are in it) and makes the suite's
virtual environment (its own pinned requirements); both are cached.
"""

from __future__ import annotations

from .llama_suite import DIFFERENCES, Outcome, compare, deliberate, run_both, table
from .llama_suite_plugin import reamkit_command

# One or more tests of each kind (each starts its own server, so a few): start and models, the API key (three
# ways), completions streamed and not, a JSON prompt, chat with a JSON schema or grammar, invalid requests,
# log-probabilities, usage, timings.
SUBSET = ("test_server_start_simple or test_server_models or test_incorrect_api_key "
          "or test_correct_api_key_anthropic_header or test_openai_library_correct_api_key "
          "or test_completion_stream_vs_non_stream or test_json_prompt_no_mtmd or test_json_prompt_mtm_error "
          "or (test_completion_with_response_format and (format0 or format4)) "
          "or (test_invalid_chat_completion_req and (None or messages2)) "
          "or test_logprobs_stream or test_chat_completions_token_count or test_chat_completion_with_timings_per_token")


def test_shim_gives_reamkit_its_own_options_and_llama_server_the_rest():
    argv = ["--port", "8081", "--temp", "0.8", "--seed", "42", "--host", "127.0.0.1", "--model", "/m.gguf",
            "--ctx-size", "512", "--parallel", "2", "--no-slots", "-ctk", "q8_0", "-ctv", "q8_0",
            "--api-key", "k", "--n-predict", "-1", "--no-jinja", "--alias", "a,b", "--verbose"]
    options = {"--port", "--host", "--ctx", "--parallel", "--cache-type", "--api-key", "--alias", "--verbose"}
    cmd = reamkit_command(argv, options, "/tmp/l.log")
    assert cmd[0] == "/m.gguf" and cmd[-2:] == ["--log-file", "/tmp/l.log"]
    pairs = " ".join(cmd[1:-2])
    assert pairs == ("--port 8081 --llama-arg=--temp --llama-arg=0.8 --llama-arg=--seed --llama-arg=42 "
                     "--host 127.0.0.1 --ctx 512 --parallel 2 --llama-arg=--no-slots --cache-type q8_0 "
                     "--llama-arg=-ctv --llama-arg=q8_0 --api-key k --llama-arg=--n-predict --llama-arg=-1 "
                     "--llama-arg=--no-jinja --alias a,b --llama-arg=--verbose")


def test_a_test_only_reamkit_fails_is_a_difference_unless_listed():
    pattern, why = next(iter(DIFFERENCES.items()))
    listed = pattern.replace("*", "x")
    plain = {"a.py::t1": Outcome("passed"), "a.py::t2": Outcome("passed"), "a.py::t3": Outcome("failed"),
             listed: Outcome("passed")}
    served = {"a.py::t1": Outcome("passed"), "a.py::t2": Outcome("failed", "E assert 400 == 200"),
              "a.py::t3": Outcome("failed"), listed: Outcome("failed")}
    c = compare(plain, served)
    assert c.unexplained == [("a.py::t2", "E assert 400 == 200")]
    assert c.explained == [(listed, why)]
    assert c.per_file["a.py"] == (3, 2, 1)


def test_a_parametrized_id_is_listed_exactly_and_each_listed_difference_says_why():
    """Ids with ``[...]`` and ``*`` (fnmatch's own syntax) match as written, and only themselves."""
    cors = "test_security.py::test_cors_options[web.mydomain.fr-Access-Control-Allow-Headers-*]"
    assert "Authorization" in deliberate(cors)
    assert deliberate(cors.replace("Headers", "Methods")) is None
    assert deliberate("test_security.py::test_cors_options[w]") is None
    assert deliberate("test_chat_completion.py::test_context_size_exceeded_stream") == deliberate(
        "test_basic.py::test_server_props").split("; and ")[1]
    assert all(len(why) > 40 for why in DIFFERENCES.values())


def test_reamkit_serve_passes_what_llama_server_passes(tmp_path, figure):
    sides, times = run_both(tmp_path, select=SUBSET, timeout=1200)
    plain, served = sides["llama-server"], sides["reamkit"]
    assert set(plain) == set(served) and len(plain) >= 12, (sorted(plain), sorted(served))
    passed = sum(o.outcome == "passed" for o in plain.values())
    assert passed >= 10, (tmp_path / "llama-server.out").read_text()[-5000:]    # the suite itself ran
    c = compare(plain, served)
    figure(f"llama.cpp server tests, a subset of {len(plain)}: llama-server passes {passed}, reamkit serve "
           f"{sum(o.outcome == 'passed' for o in served.values())} ({times['llama-server']:.0f} s / "
           f"{times['reamkit']:.0f} s)")
    assert not c.unexplained, table(c) + "\n" + (tmp_path / "reamkit.out").read_text()[-5000:]
