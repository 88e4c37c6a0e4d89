"""Built-in GGUF families for ``reamkit fit MODEL``: a model's config and its variants' file sizes, with sources.

Sizes are GB (1e9 bytes). Where mradermacher published a file, its size is used; the rest are reamkit's
config-only prediction (``reamkit sizes``), which matches the published files within about 0.1 GB.
"""

from __future__ import annotations

from dataclasses import dataclass

PUBLISHED = "mradermacher/Qwen3-Coder-Next-REAM-GGUF (published file size)"
PREDICTED = "reamkit sizes, 384 experts, static ladder, no imatrix (matches the published files within 0.1 GB)"


@dataclass(frozen=True)
class Family:
    name: str
    aliases: tuple[str, ...]
    config: dict                                 # config.json of the model the files were made from
    sizes_gb: dict[str, tuple[float, str]]       # type -> (GB, source)


# Qwen3-Coder-Next (hf: Qwen/Qwen3-Coder-Next) cut to 384 experts by REAM; 60.33B parameters.
QWEN3_CODER_NEXT_REAM = Family(
    name="Qwen3-Coder-Next-REAM",
    aliases=("qwen3-coder-next-ream", "qwen3-coder-next-ream-gguf", "mradermacher/qwen3-coder-next-ream-gguf"),
    config={
        "model_type": "qwen3_next", "torch_dtype": "bfloat16", "hidden_size": 2048, "num_hidden_layers": 48,
        "vocab_size": 151936, "tie_word_embeddings": False, "num_attention_heads": 16, "num_key_value_heads": 2,
        "head_dim": 256, "full_attention_interval": 4, "linear_num_key_heads": 16, "linear_key_head_dim": 128,
        "linear_num_value_heads": 32, "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4,
        "num_experts": 384, "num_experts_per_tok": 10, "moe_intermediate_size": 512,
        "shared_expert_intermediate_size": 512,
    },
    sizes_gb={
        "Q2_K": (22.2, PUBLISHED), "Q3_K_S": (26.19, PREDICTED), "Q3_K_M": (29.01, PREDICTED),
        "Q3_K_L": (31.37, PREDICTED), "IQ4_XS": (32.75, PREDICTED), "Q4_K_S": (34.46, PREDICTED),
        "Q4_K_M": (36.73, PREDICTED), "Q5_K_S": (41.65, PREDICTED), "Q5_K_M": (42.98, PREDICTED),
        "Q6_K": (49.7, PUBLISHED), "Q8_0": (64.3, PUBLISHED),
    },
)

FAMILIES = (QWEN3_CODER_NEXT_REAM,)


def find_family(name: str) -> Family | None:
    key = name.strip().lower().removeprefix("hf:")
    return next((f for f in FAMILIES if key == f.name.lower() or key in f.aliases), None)
