import os

import pytest
import torch

# Triton decides at kernel-definition time whether to interpret; without a GPU the Triton kernels are
# tested on CPU tensors through its interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from rmfast import backends  # noqa: E402

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")),
]


def runnable_backends(device):
    return [b for b in backends.BACKENDS if backends.unavailable_reason(b, device) is None]


def backend_device_params():
    """(backend, device) pairs: every backend on CPU and on CUDA; one that cannot run here is a failure
    for the compiled CPU path (the build must provide it) and a skip only for GPU-only combinations."""
    params = []
    for device in ("cpu", "cuda"):
        for name in backends.BACKENDS:
            if name == "cuda" and device == "cpu" or name == "cpu" and device == "cuda":
                continue
            marks = []
            if device == "cuda" and not torch.cuda.is_available():
                marks.append(pytest.mark.skip(reason="no CUDA GPU"))
            params.append(pytest.param(name, device, id=f"{name}-{device}", marks=marks))
    return params


@pytest.fixture(scope="session")
def engine_setup(tmp_path_factory):
    """A tiny Llama with a BPE tokenizer, and synthetic train / eval pairs."""
    from transformers import LlamaConfig, LlamaModel

    from rmfast.data import generate_pairs
    from rmfast.data.synthetic import write_jsonl
    from rmfast.data.tokenizers import train_bpe_tokenizer

    root = tmp_path_factory.mktemp("engine")
    rows = generate_pairs(240, seed=0, style="explicit", difficulty="easy")
    tok = train_bpe_tokenizer([r["prompt"] + r["chosen"] for r in rows], vocab_size=400)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaModel(cfg).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    write_jsonl(rows[:200], root / "train.jsonl")
    write_jsonl(rows[200:], root / "eval.jsonl")
    return root


@pytest.fixture
def reference_kernel(monkeypatch):
    """The varlen kernel replaced by helpers.reference_varlen: the flash kernels' contract in plain torch,
    checking their input requirements (they need CUDA and half precision)."""
    from helpers import reference_varlen
    from rmfast import attention

    monkeypatch.setattr(attention, "varlen_kernel", lambda: ("reference", reference_varlen))
