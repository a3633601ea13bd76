"""Shared pieces of the `cuda` tests (tests/gpu/): the device they run on, their shapes, and the record file.

They run on CUDA (`pytest -m cuda`, scripts/gpu_check.py). With QWEN_TUNE_CHECK_DEVICE=cpu (gpu_check.py --dry-run)
the same bodies run on CPU with tiny shapes, so their logic is exercised in CI; assertions that only mean something
on a GPU (kernel choice, CUDA peak memory) are made on CUDA only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

DEVICE = os.environ.get("QWEN_TUNE_CHECK_DEVICE", "cuda")
DRY = DEVICE == "cpu"
REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "data_examples"


def size(gpu: int, cpu: int) -> int:
    """A GPU-sized shape, or its tiny CPU counterpart in dry mode."""
    return cpu if DRY else gpu


def record(kind: str, **values: Any) -> None:
    """Append one measurement to $QWEN_TUNE_CHECK_RECORD (JSON lines) for gpu_check.py's summary; also print it."""
    line = json.dumps({"kind": kind, "device": DEVICE, **values})
    print(line)
    path = os.environ.get("QWEN_TUNE_CHECK_RECORD")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in fp32."""
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def small_chat_data(path: Path, records: slice = slice(24, 26)) -> Path:
    """Two short real conversations: with batch_size 2 and packing every step sees the same row, so a LoRA loss
    falls within a few steps even on a random model."""
    recs = json.loads((EXAMPLES / "example.json").read_text())[records]
    path.write_text(json.dumps(recs, ensure_ascii=False))
    return path
