"""Training methods: which parameters train (full, LoRA, LoRA with embeddings, Q-LoRA)."""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import PreTrainedModel

from ..config import ConfigError, Recipe
from ..models.families import Family
from ..quant.training import register_quantized_lora_layers
from .distributed import check_combination

log = logging.getLogger(__name__)


def lora_modules_to_save(recipe: Recipe, family: Family, is_chat: bool) -> list[str] | None:
    """Embeddings and lm_head train too on a base model, whose ChatML tokens were never trained."""
    lora = recipe.lora
    if lora.modules_to_save is not None:
        if lora.modules_to_save and recipe.method == "qlora":
            raise ConfigError(f"lora.modules_to_save={lora.modules_to_save} cannot be used with Q-LoRA: peft would "
                              "keep a full-precision trainable copy of each module next to the quantized base (for "
                              "embeddings and lm_head more memory than the 4-bit model saves, and not mergeable onto "
                              "the quantized checkpoint); train on a chat checkpoint (its ChatML tokens are trained) "
                              "or use method=lora on the full-precision model")
        return lora.modules_to_save or None
    wanted = lora.trainable_embeddings
    if wanted is None:
        wanted = not is_chat
        if wanted:
            log.info("base (non-chat) checkpoint: its <|im_start|>/<|im_end|> embeddings are untrained, so %s and %s "
                     "train fully alongside LoRA (set lora.trainable_embeddings=false to keep them frozen)",
                     family.embedding, family.lm_head)
    if not wanted:
        return None
    if recipe.method == "qlora":
        log.warning("Q-LoRA: %s and %s stay frozen (no modules_to_save on a quantized base: peft would keep "
                    "full-precision trainable copies beside the 4-bit model). This base checkpoint's "
                    "<|im_start|>/<|im_end|> embeddings are untrained, so prefer a chat checkpoint for Q-LoRA, or "
                    "method=lora on the full-precision model", family.embedding, family.lm_head)
        return None
    return [family.embedding, family.lm_head]


def apply_method(model: PreTrainedModel, recipe: Recipe, family: Family, is_chat: bool) -> torch.nn.Module:
    """Freeze/wrap the model for the recipe's method; returns the model the Trainer trains."""
    gc = recipe.training.gradient_checkpointing is not False  # an unresolved "auto" (no CLI) is the safe side
    # Training never needs a KV cache, and transformers ignores packed position_ids when one is built.
    model.config.use_cache = False
    if recipe.method == "full":
        for name, p in model.named_parameters():
            p.requires_grad = not any(pat in name for pat in recipe.training.freeze)
        if gc:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model

    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if recipe.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # With frozen embeddings no input requires grad, and checkpointed blocks would get no gradient.
        model.enable_input_require_grads()
    targets: Any = recipe.lora.target_modules
    if targets == "auto":
        targets = list(family.lora_targets)
    modules_to_save = lora_modules_to_save(recipe, family, is_chat)
    check_combination(recipe, trainable_embeddings=bool(modules_to_save))
    cfg = LoraConfig(r=recipe.lora.r, lora_alpha=recipe.lora.alpha, lora_dropout=recipe.lora.dropout,
                     target_modules=targets, bias=recipe.lora.bias, task_type="CAUSAL_LM",
                     modules_to_save=modules_to_save)
    if recipe.method == "qlora":
        register_quantized_lora_layers(cfg, model)  # qwen-tune's PyTorch GPTQ layers (no-op otherwise)
    try:
        model = get_peft_model(model, cfg)
    except ValueError as e:
        raise ConfigError(f"lora.target_modules {targets!r} do not fit this {family.name} model: {e}") from None
    return model


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    # Under ZeRO-3 a parameter holds only this rank's shard; ds_numel is its full size.
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    return trainable, total
