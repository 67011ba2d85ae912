"""transformers' monolithic model on the same checkpoint: the baseline the split is measured against.

transformers is an optional extra (`pip install tsqp[bench]`); the TEE runtime never imports this module.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

import torch

from tsqp.errors import TsqpError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_reference(model_dir: Path, dtype: str, attn: str):
    try:
        from transformers import LlamaForCausalLM
    except ImportError:
        raise TsqpError("the comparison needs transformers: pip install 'tsqp[bench]'") from None
    return LlamaForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype], attn_implementation=attn).eval()


@torch.inference_mode()
def time_prefill(model_dir: Path, ids: torch.Tensor, dtype: str, attn: str, warmup_ids: torch.Tensor) -> float:
    """Seconds for one monolithic forward over ids (all positions' logits), after a short warm-up."""
    model = load_reference(model_dir, dtype, attn)
    model(warmup_ids[None])
    start = time.perf_counter()
    model(ids[None])
    elapsed = time.perf_counter() - start
    del model
    gc.collect()
    return elapsed
