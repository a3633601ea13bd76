"""Per-chunk pieces of the chunked LM-head loss (shared by the default and the ZeRO-3 paths)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["chunk_ce_sum"]


def chunk_ce_sum(lm_head: nn.Module, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = lm_head(rows).float()
    return F.cross_entropy(logits, targets, reduction="sum")
