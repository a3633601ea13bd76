"""Batching: dynamic padding, or padding-free packing.

Packing concatenates a batch into a single row with `position_ids` restarting at 0 for each
sample. transformers' SDPA/flash-attention paths (and the bundled Qwen-1 model) read those
restarts and keep attention block-diagonal, so samples never see each other and no compute is
spent on padding. The first label of every packed sample is masked: otherwise the last token of
one sample would be trained to predict the first token of the next.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..constants import IGNORE_INDEX
from ..models.packing import packed_sample_index  # noqa: F401 - re-exported: the layout PackingCollator writes

log = logging.getLogger(__name__)


@dataclass
class PaddingCollator:
    """Right-pads to the longest sample in the batch (optionally to a multiple of N)."""

    pad_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        m = self.pad_to_multiple_of
        if m:
            longest = -(-longest // m) * m
        ids = torch.full((len(features), longest), self.pad_id, dtype=torch.long)
        labels = torch.full((len(features), longest), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(features), longest), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n] = torch.as_tensor(f["input_ids"])
            labels[i, :n] = torch.as_tensor(f["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


@dataclass
class PackingCollator:
    """Flattens the batch into one row of real tokens, with per-sample position_ids.

    With `flash_attn_kwargs`, also returns cu_seq_lens/max_length so flash-attention 2 runs its
    varlen kernel directly.
    """

    flash_attn_kwargs: bool = False

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        ids: list[int] = []
        labels: list[int] = []
        pos: list[int] = []
        lens = []
        for f in features:
            n = len(f["input_ids"])
            ids += f["input_ids"]
            labels += [IGNORE_INDEX] + list(f["labels"][1:])
            pos += range(n)
            lens.append(n)
        out: dict[str, Any] = {
            "input_ids": torch.tensor([ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([pos], dtype=torch.long),
        }
        if self.flash_attn_kwargs:
            cu = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
            out.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lens), max_length_k=max(lens))
        return out


def make_collator(packing: bool, pad_id: int, pad_to_multiple_of: int | None = None,
                  attn_implementation: str = "sdpa", packing_exact: bool = True) -> PaddingCollator | PackingCollator:
    """`packing_exact`: the model keeps packed samples apart (`models.families.packing_is_exact`)."""
    if packing and not packing_exact:
        log.info("data.packing: this model's linear-attention (Gated DeltaNet) layers would carry state across "
                 "packed samples, so batches are padded per sample instead")
        packing = False
    if packing:
        return PackingCollator(flash_attn_kwargs=attn_implementation == "flash_attention_2")
    return PaddingCollator(pad_id, pad_to_multiple_of)
