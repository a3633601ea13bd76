"""The packed-row layout shared by the collator (which writes it) and the models (which read it)."""

from __future__ import annotations

import torch


def packed_sample_index(position_ids: torch.Tensor) -> torch.Tensor:
    """Sample number of every token of packed rows ``[B, T]``: a sample starts wherever
    ``position_ids`` do not step by +1 (the layout `PackingCollator` writes)."""
    return (torch.diff(position_ids, dim=-1, prepend=position_ids[:, :1] - 1) != 1).cumsum(-1)
