"""Training methods: which parameters train (full, LoRA, LoRA with embeddings, Q-LoRA)."""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import PreTrainedModel

from ..config import ConfigError, Recipe
from ..models.families import Family
from .distributed import check_combination

log = logging.getLogger(__name__)


def lora_modules_to_save(recipe: Recipe, family: Family, is_chat: bool) -> list[str] | None:
    """Embeddings and lm_head train too on a base model, whose ChatML tokens were never trained."""
    lora = recipe.lora
    if lora.modules_to_save is not None:
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
        log.warning("Q-LoRA: embeddings/lm_head stay frozen: a quantized base cannot train them as modules_to_save")
        return None
    return [family.embedding, family.lm_head]


def apply_method(model: PreTrainedModel, recipe: Recipe, family: Family, is_chat: bool) -> torch.nn.Module:
    """Freeze/wrap the model for the recipe's method; returns the model the Trainer trains."""
    gc = recipe.training.gradient_checkpointing
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
    try:
        model = get_peft_model(model, cfg)
    except ValueError as e:
        raise ConfigError(f"lora.target_modules {targets!r} do not fit this {family.name} model: {e}") from None
    return model


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
