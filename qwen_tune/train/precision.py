"""Weights that train under 16-bit autocast stay fp32 (master weights); the compute is autocast's.

transformers' ``bf16=True`` / ``fp16=True`` without DeepSpeed means torch.autocast plus (fp16) a GradScaler. Both
assume fp32 parameters: the GradScaler refuses to unscale fp16 gradients ("Attempting to unscale FP16
gradients"), and AdamW on bf16 weights rounds away updates smaller than 2^-8 of a weight (at lr 1e-5 most of
them). DeepSpeed keeps its own fp32 master copy of 16-bit modules, so it is left alone; accelerate does not
autocast fp16 on CPU (fp16 there trains the weights as loaded), so neither is that.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)
_HALF = (torch.float16, torch.bfloat16)


def autocast_master_weights(precision: str, deepspeed: str | None, use_cpu: bool) -> bool:
    """Whether trainable weights must be fp32 because the Trainer trains them under 16-bit autocast."""
    if deepspeed:
        return False
    return precision == "bf16" or (precision == "fp16" and not use_cpu)


def load_dtype(method: str, model_dtype: str, precision: str, autocast: bool) -> str:
    """The dtype to load the base model in.

    Full fine-tuning under autocast loads fp32 directly (every weight trains, and an fp32 checkpoint is not
    rounded to 16 bits on the way); other methods keep the frozen base in the compute dtype.
    """
    if model_dtype != "auto":
        return model_dtype
    if method == "full" and autocast:
        return "fp32"
    return precision


def upcast_trainable(model: torch.nn.Module, autocast: bool) -> int:
    """Casts trainable 16-bit parameters to fp32 when the Trainer autocasts; returns how many were cast."""
    if not autocast:
        return 0
    n = 0
    for p in model.parameters():
        if p.requires_grad and p.dtype in _HALF:
            p.data = p.data.float()
            n += 1
    if n:
        log.info("%d trainable 16-bit parameter tensors kept in fp32 (master weights; autocast computes in 16 bits)",
                 n)
    return n
