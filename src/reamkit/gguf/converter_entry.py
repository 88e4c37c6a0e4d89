"""Run the pinned ``convert_hf_to_gguf.py`` with reamkit's workarounds applied.

Executed as a script in a subprocess (never imported by reamkit): it puts the vendored ``gguf-py`` ahead
of PyPI's ``gguf`` (the two differ despite the same version number), and replaces the converter's
"BPE pre-tokenizer was not recognized" failure for custom tokenizers with a configured pre-tokenizer
(``REAMKIT_FALLBACK_PRE``, default ``qwen2``), announcing it on stderr. Known tokenizers, such as the real
Qwen3-Coder-Next one, are recognised by the converter and unaffected.
"""

import os
import runpy
import sys


def main() -> None:
    src = os.environ["REAMKIT_LLAMA_CPP_SRC"]
    sys.path[:1] = [os.path.join(src, "gguf-py"), src]   # drop this file's folder, vendored first
    import conversion.base as base

    original = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            pre = os.environ.get("REAMKIT_FALLBACK_PRE", "qwen2")
            print(f"reamkit: tokenizer hash not known to the converter; using pre-tokenizer {pre!r}", file=sys.stderr)
            return pre

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    converter = os.path.join(src, "convert_hf_to_gguf.py")
    sys.argv = [converter, *sys.argv[1:]]
    runpy.run_path(converter, run_name="__main__")


if __name__ == "__main__":
    main()
