"""Checking a written checkpoint against the model it came from: a ChatML probe batch and logit comparisons.

Used by merge-adapter and quantize. Sits beside the data layer (it encodes with the training ChatML encoder, so the
probe sees exactly the token layout training produced); only export-level code imports it.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from .constants import ENDOFTEXT_ID
from .data.formats import Conversation
from .data.template import ChatMLEncoder

log = logging.getLogger(__name__)

PROBE_CONVERSATIONS = [
    (None, [("user", "Write a haiku about merging adapters into a model."),
            ("assistant", "Low-rank whispers fold\ninto the weights they once nudged:\none voice, no seams left.")]),
    ("You are a careful assistant who answers in Chinese.",
     [("user", "用一句话解释什么是微调？"),
      ("assistant", "微调是在预训练模型的基础上，用少量任务数据继续训练，使模型适应特定任务。"),
      ("user", "def add(a, b):\n    return a + b  # what does this return for 2, 3?"),
      ("assistant", "It returns 5.")]),
]


def probe_batch(tokenizer: Any, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A right-padded batch of ChatML conversations, encoded exactly as training encodes them."""
    convs = [Conversation(id=f"probe{i}", turns=turns, system=system)
             for i, (system, turns) in enumerate(PROBE_CONVERSATIONS)]
    rows = [s.input_ids for s in ChatMLEncoder(tokenizer, max_len=256).encode(convs)]
    if max(max(r) for r in rows) >= vocab_size:  # toy models with a cut vocabulary
        log.info("probe ids exceed the model's vocabulary (%d): folded into it", vocab_size)
        rows = [[t % vocab_size for t in r] for r in rows]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ENDOFTEXT_ID
    pad = pad % vocab_size
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask


@torch.inference_mode()
def probe_logits(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """fp32 logits [real tokens, vocab] of the probe batch (padding dropped), on the CPU."""
    ids, mask = batch
    model.eval()
    dev = next(model.parameters()).device
    out = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False)
    return out.logits.float()[mask.to(dev).bool()].cpu()


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def compare_logits(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(mean per-token cosine similarity, max abs diff) of two logits tensors [tokens, vocab]."""
    cos = F.cosine_similarity(a.float(), b.float(), dim=-1).mean()
    return float(cos), max_abs_diff(a, b)
