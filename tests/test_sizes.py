"""reamkit sizes: the config-only predictor on the published Qwen3-Coder-Next-REAM figures, and its CLI."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from reamkit.cli import app
from reamkit.errors import ReamkitError
from reamkit.quantization import predict_sizes
from reamkit.quantization.inventory import inventory_from_config
from reamkit.quantization.rules import ModelFacts, Tensor, choose_types

# Qwen3-Coder-Next (80B-A3B): the figures of the reference's qwen3next layout table (48 layers, 512 experts)
CODER_NEXT = {
    "model_type": "qwen3_next", "architectures": ["Qwen3NextForCausalLM"], "torch_dtype": "bfloat16",
    "hidden_size": 2048, "num_hidden_layers": 48, "vocab_size": 151936, "tie_word_embeddings": False,
    "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 256, "full_attention_interval": 4,
    "linear_num_key_heads": 16, "linear_key_head_dim": 128, "linear_num_value_heads": 32,
    "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4,
    "num_experts": 512, "num_experts_per_tok": 10, "moe_intermediate_size": 512,
    "shared_expert_intermediate_size": 512,
}
PUBLISHED_GB = {"Q2_K": 22.2, "Q6_K": 49.7, "Q8_0": 64.3}       # mradermacher/Qwen3-Coder-Next-REAM-GGUF


@pytest.fixture
def coder_next(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CODER_NEXT))
    return tmp_path / "config.json"


def test_coder_next_384_experts_matches_published_sizes(coder_next, figure):
    assert inventory_from_config(CODER_NEXT, experts=384).n_elements == 60_334_455_552
    assert inventory_from_config(CODER_NEXT).n_elements == 79_674_391_296
    rows = {r.type: r for r in predict_sizes(coder_next, experts=384, has_imatrix=False)}
    for t, gb in PUBLISHED_GB.items():
        assert rows[t].size_gb == pytest.approx(gb, rel=0.01), t
    for t in ("Q4_K_S", "Q4_K_M"):
        assert 34 <= rows[t].size_gb <= 37, t
    assert rows["Q4_K_M"].size_gib == pytest.approx(34.21, abs=0.01)      # llama.cpp's log of the REAM Q4_K_M
    figure("Qwen3-Coder-Next at 384 experts, predicted GB: " + ", ".join(
        f"{t} {r.size_gb:.2f}" for t, r in rows.items()))


def test_expert_count_and_ladder_change_the_prediction(coder_next):
    full = {r.type: r.size_gb for r in predict_sizes(coder_next, types=["Q4_K_M"])}
    cut = {r.type: r.size_gb for r in predict_sizes(coder_next, types=["Q4_K_M"], experts=384)}
    moe = {r.type: r.size_gb for r in predict_sizes(coder_next, types=["Q4_K_M"], experts=384, ladder="moe-aware")}
    assert full["Q4_K_M"] == pytest.approx(48.5, rel=0.01)                 # the 80B Q4_K_M is 48.5e9 bytes
    assert cut["Q4_K_M"] < full["Q4_K_M"]
    assert 0.5 < moe["Q4_K_M-moe"] - cut["Q4_K_M"] < 1.5      # ~4% of the weights lifted from ~4.9 to 8.5 bits


def test_imatrix_changes_only_iq4_xs(coder_next):
    a = {r.type: r.size_bytes for r in predict_sizes(coder_next, experts=384, has_imatrix=False)}
    b = {r.type: r.size_bytes for r in predict_sizes(coder_next, experts=384, has_imatrix=True)}
    assert [t for t in a if a[t] != b[t]] == ["IQ4_XS"] and b["IQ4_XS"] < a["IQ4_XS"]


def test_type_rules_special_cases():
    def types(file_type, n_expert=16, gqa=(4, 2), **kw):
        tensors = [Tensor(f"blk.{i}.{n}", s, "F16") for i in range(8) for n, s in (
            ("attn_k.weight", (256, 128)), ("attn_v.weight", (256, 128)), ("attn_output.weight", (256, 256)),
            ("ffn_down_exps.weight", (320, 256, n_expert)))]
        tensors.append(Tensor("token_embd.weight", (256, 1000), "F16"))     # tied: no output.weight
        return choose_types(tensors, file_type, ModelFacts(8, n_expert, *gqa), **kw)

    t = types("Q2_K")
    assert t["token_embd.weight"] == "Q6_K"                          # a tied embedding is treated as output
    assert t["blk.0.attn_v.weight"] == "Q3_K" and types("Q2_K", gqa=(8, 2))["blk.0.attn_v.weight"] == "Q4_K"
    assert t["blk.0.ffn_down_exps.weight"] == "Q4_0"                 # 320 is no multiple of 256: Q3_K falls back
    m = types("Q4_K_M", n_expert=8)                                  # Mixtral's 8-expert rules
    assert m["blk.0.attn_k.weight"] == m["blk.0.attn_v.weight"] == "Q8_0" and m["blk.0.attn_output.weight"] == "Q5_K"
    q = types("Q4_K_M")
    assert [q[f"blk.{i}.attn_v.weight"] for i in range(8)] == ["Q6_K", "Q4_K", "Q4_K", "Q6_K", "Q4_K", "Q4_K",
                                                                 "Q6_K", "Q6_K"]     # use_more_bits over 8
    assert types("IQ4_XS")["blk.0.ffn_down_exps.weight"] == "Q5_1"   # Q5_K bump, then 320 falls back
    assert types("IQ4_XS", has_imatrix=True)["blk.0.ffn_down_exps.weight"] == "IQ4_NL"
    assert types("Q4_K_M", overrides=[(r"attn_k", "Q8_0")])["blk.0.attn_k.weight"] == "Q8_0"


def test_sizes_cli_json(coder_next):
    res = CliRunner().invoke(app, ["sizes", str(coder_next), "--experts", "384", "--types", "q2_k,Q8_0", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert [r["type"] for r in rows] == ["Q2_K", "Q8_0"]
    assert set(rows[0]) == {"type", "size_gb", "size_gib", "bpw"}
    assert rows[0]["size_gb"] == pytest.approx(22.2, rel=0.01)
    assert rows[0]["size_gib"] == pytest.approx(rows[0]["size_gb"] * 1e9 / 2**30)
    table = CliRunner().invoke(app, ["sizes", str(coder_next.parent), "--ladder", "moe-aware", "--types", "Q4_K_M"])
    assert table.exit_code == 0 and "Q4_K_M-moe" in table.output


@pytest.mark.parametrize("args, message", [
    (["--types", "Q4_K_X"], "unknown quantization type Q4_K_X"),
    (["--ladder", "dynamic"], "unknown ladder 'dynamic'"),
    (["--experts", "0"], "expert count must be at least 1"),
])
def test_sizes_cli_errors_are_one_line(coder_next, args, message):
    res = CliRunner().invoke(app, ["sizes", str(coder_next), *args])
    assert res.exit_code == 2
    assert message in res.output and len(res.output.strip().splitlines()) == 1


def test_sizes_rejects_unsupported_or_missing_config(tmp_path):
    with pytest.raises(ReamkitError, match="no config.json"):
        predict_sizes(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ReamkitError, match="model_type='llama'"):
        predict_sizes(tmp_path)
