"""Values shared across layers: label masking, Qwen's special tokens, dtype names, the loss chunk, the cache root.

The bottom of the dependency order (nothing here imports from qwen_tune), so every layer may read it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

#: Label of a position the loss ignores (transformers' and PyTorch's cross-entropy default).
IGNORE_INDEX = -100

# Qwen's control tokens: the same strings and ids in Qwen-1 (tiktoken) and Qwen1.5+ (tokenizer.json).
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT_ID = 151643
IM_START_ID = 151644
IM_END_ID = 151645

#: Rows of logits the chunked loss materializes at once (the recipe default `training.loss_chunk_size`):
#: 256 x 151,936 x 4 B = 0.15 GB of fp32 logits. 256 rows keep the head GEMM as efficient as 1024 did
#: (bench/results/peers_1thread.md: 312 vs 305 real tok/s) at a 0.44 GB lower peak.
DEFAULT_LOSS_CHUNK_SIZE = 256

# Dtypes by the short names recipes and the CLI use.
DTYPE_NAMES: dict[str, str] = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # config.json spelling
DTYPE_BYTES: dict[str, int] = {"bf16": 2, "fp16": 2, "fp32": 4}

CACHE_ENV = "QWEN_TUNE_CACHE"


def __getattr__(name: str) -> Any:
    """``TORCH_DTYPES`` is built on first use: importing torch here would cost every command, even
    ``qwen-tune --version``, two seconds before it does anything."""
    if name == "TORCH_DTYPES":
        import torch

        value = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def cache_root() -> Path:
    """Where qwen-tune caches tokenized data and dequantized checkpoints (``$QWEN_TUNE_CACHE``)."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "qwen_tune"))
