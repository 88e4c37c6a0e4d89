"""A small byte-level BPE tokenizer, trained offline and deterministically for the tiny models.

Corpus: the Python standard library's own source (always on disk) plus generated worked arithmetic,
the same two kinds of text as the calibration mix. Pre-tokenization uses the Qwen2 split regex so that
llama.cpp's ``tokenizer.ggml.pre = qwen2`` tokenizes identically to Hugging Face.
"""

from __future__ import annotations

import random
import sysconfig
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 4096
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
_CODE_BYTES = 1_500_000


def code_corpus(limit: int = _CODE_BYTES) -> list[str]:
    """Standard-library Python files in a fixed (sorted) order, up to ``limit`` bytes."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts, total = [], 0
    for p in sorted(stdlib.glob("*.py")):
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(text)
        total += len(text)
        if total >= limit:
            break
    return texts


def math_corpus(n: int = 3000, seed: int = 0) -> list[str]:
    """Deterministic worked arithmetic and algebra, one short solution per item."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b, c = rng.randint(2, 999), rng.randint(2, 99), rng.randint(1, 50)
        kind = rng.randrange(4)
        if kind == 0:
            out.append(f"Problem: What is {a} * {b}?\nSolution: {a} * {b} = {a * b}. The answer is {a * b}.\n")
        elif kind == 1:
            out.append(f"Problem: Solve {b}x + {c} = {b * a + c}.\nSolution: Subtract {c}: {b}x = {b * a}. "
                       f"Divide by {b}: x = {a}.\n")
        elif kind == 2:
            out.append(f"Problem: A box holds {b} pens. How many pens are in {c} boxes?\n"
                       f"Solution: {c} boxes * {b} pens = {b * c} pens.\n")
        else:
            out.append(f"Problem: Compute {a} + {b} - {c}.\nSolution: {a} + {b} = {a + b}; "
                       f"{a + b} - {c} = {a + b - c}. The answer is {a + b - c}.\n")
    return out


def train_tokenizer(out_dir: Path, texts: list[str] | None = None, vocab_size: int = VOCAB_SIZE):
    """Train the BPE (by default on the zoo corpus) and save it as a transformers fast tokenizer with a
    ChatML template; returns the tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2,
    )
    tok.train_from_iterator(texts if texts is not None else code_corpus() + math_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None,
        clean_up_tokenization_spaces=False, model_max_length=4096,
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return fast
