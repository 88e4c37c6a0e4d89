"""HF -> GGUF through the pinned converter: the F32 GGUF computes what transformers computes."""

from __future__ import annotations

import inspect
import shutil

import numpy as np
import pytest
import torch

from reamkit.gguf import convert_to_gguf
from reamkit.manifest import read_manifest
from reamkit.llamacpp.toolchain import find_toolchain

from .conftest import constraints_pin, hf_logits, reference_ids

N_POSITIONS = 200


@pytest.fixture(scope="module")
def f32_gguf(zoo_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "model-f32.gguf"
    path, converted = convert_to_gguf(zoo_path, out, dtype="f32")
    assert converted
    return path


def llama_logits(gguf_path, ids: list[int]) -> np.ndarray:
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf_path), logits_all=True, n_ctx=512, n_batch=512, n_threads=2,
                type_k=0, type_v=0, verbose=False)   # type 0 = F32 KV cache (the default F16 one is lossy)
    llm.eval(ids)
    scores = np.array(llm.scores[: len(ids)], dtype=np.float64)
    llm.close()
    return scores


def test_f32_gguf_matches_transformers(zoo_path, f32_gguf, family, figure):
    ids = reference_ids(zoo_path, N_POSITIONS)
    ref = hf_logits(zoo_path, ids).double()
    got = torch.from_numpy(llama_logits(f32_gguf, ids[0].tolist()))

    logp, logq = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
    kl = (logp.exp() * (logp - logq)).sum(-1)          # KL(HF || llama.cpp) per position
    top1 = (ref.argmax(-1) == got.argmax(-1)).double().mean().item()
    figure(f"{family}: F32 GGUF vs transformers over {N_POSITIONS} positions: mean KL {kl.mean():.3g}, "
          f"max KL {kl.max():.3g}, top-1 {top1:.1%}, max |dlogit| {(ref - got).abs().max():.3g}")
    assert kl.mean().item() < 1e-6
    assert top1 == 1.0


def test_llama_cpp_tokenizes_like_transformers(zoo_path, f32_gguf):
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    text = inspect.getsource(shutil)[:4000]
    hf = AutoTokenizer.from_pretrained(str(zoo_path))(text)["input_ids"]
    llm = Llama(model_path=str(f32_gguf), vocab_only=True, verbose=False)
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == hf
    assert "<|im_start|>" in llm.metadata.get("tokenizer.chat_template", "")


def test_conversion_records_manifest_and_skips_rerun(zoo_path, f32_gguf):
    manifest = read_manifest(f32_gguf, folder=False)
    assert manifest is not None and manifest.stage == "convert"
    assert manifest.params["dtype"] == "f32"
    # the commit the built tools report of themselves, which must be the pinned one
    assert manifest.params["llama_cpp_commit"] == find_toolchain().commit == constraints_pin("llama.cpp-commit")
    assert manifest.outputs["bytes"] == f32_gguf.stat().st_size
    mtime = f32_gguf.stat().st_mtime_ns
    path, converted = convert_to_gguf(zoo_path, f32_gguf, dtype="f32")
    assert not converted and path.stat().st_mtime_ns == mtime


def test_fused_expert_checkpoints_convert_or_fail_clearly(zoo_path, family, tmp_path):
    from reamkit.checkpoint import write_checkpoint
    from reamkit.errors import ReamkitError
    from reamkit.models import open_model

    model = open_model(zoo_path)
    src, ad = model.checkpoint, model.adapter
    fused = write_checkpoint(src, tmp_path / "fused",
                             layers=((i, ad.convert_layout(src.load_layer(i), "fused")) for i in range(src.num_layers)))
    out = tmp_path / "fused.gguf"
    if not ad.gguf_reads_fused:
        with pytest.raises(ReamkitError, match="stores them fused"):
            convert_to_gguf(fused, out, dtype="f32")
        assert not out.exists()
        return
    convert_to_gguf(fused, out, dtype="f32")
    ids = reference_ids(zoo_path, 128)
    ref = hf_logits(zoo_path, ids).double()
    got = torch.from_numpy(llama_logits(out, ids[0].tolist()))
    logp, logq = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
    assert (logp.exp() * (logp - logq)).sum(-1).mean().item() < 1e-6
    assert (ref.argmax(-1) == got.argmax(-1)).all()
