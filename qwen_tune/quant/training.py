"""Preparing quantized models for LoRA training and loading adapters onto them (bitsandbytes and qwen-tune's
GPTQ layers)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from peft import PeftConfig, PeftModel
from peft.tuners.lora.gptq import GPTQLoraLinear

from .layer import GPTQLinear

log = logging.getLogger(__name__)


def prepare_loaded_model(model: torch.nn.Module) -> torch.nn.Module:
    """After loading: bitsandbytes on CPUs with AVX512-BF16 repacks Linear4bit weights into an inference-only
    layout on the first no-grad forward (an eval step), after which training fails with "a view of a leaf Variable
    that requires grad is being used in an in-place operation". Switching that repacking off keeps the layout
    trainable (the forward stays correct, only that CPU fast path is skipped)."""
    try:
        from bitsandbytes.nn import Linear4bit  # optional (the nf4 extra)
    except ImportError:
        return model
    n = 0
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False
            n += 1
    if n:
        log.debug("bitsandbytes: AVX512-BF16 CPU repacking off on %d Linear4bit layers", n)
    return model


def register_quantized_lora_layers(lora_config: Any, model: torch.nn.Module) -> Any:
    """Teach peft to put LoRA on qwen-tune's GPTQLinear: peft's own GPTQ LoRA layer (base output + LoRA, no merge
    into the quantized weight) wraps it as it wraps gptqmodel's layers, so the adapter is the same either way."""
    if any(isinstance(m, GPTQLinear) for m in model.modules()):
        lora_config._register_custom_module({GPTQLinear: GPTQLoraLinear})
    return lora_config


def load_adapter(model: torch.nn.Module, adapter_dir: str | Path, is_trainable: bool = False) -> Any:
    """``PeftModel.from_pretrained`` that also works on a base loaded through the PyTorch GPTQ path."""
    config = PeftConfig.from_pretrained(str(adapter_dir))
    register_quantized_lora_layers(config, model)
    return PeftModel.from_pretrained(model, str(adapter_dir), config=config, is_trainable=is_trainable)
