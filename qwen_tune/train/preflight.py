"""Refusals decided before any process is spawned or any weight loaded: one line, the same on every rank."""

from __future__ import annotations

import json
from pathlib import Path

from ..checkpoint import detect_is_chat
from ..config import Recipe
from ..models.families import get_family
from .distributed import check_combination, zero_stage
from .methods import lora_modules_to_save
from .recipe_checks import check_recipe_on_this_machine


def _planned_trainable_embeddings(recipe: Recipe) -> bool:
    """Whether LoRA will train embeddings/lm_head, decided from config files alone (no weights, no tokenizer).

    Only ZeRO-3 refuses it, so only then are the checkpoint's files read.
    """
    if recipe.method == "full" or zero_stage(recipe.deepspeed) != 3:
        return False
    if recipe.model.from_config:
        cfg = json.loads(Path(recipe.model.from_config).read_text())
        model_type, chat = cfg.get("model_type", "qwen2"), bool(cfg.get("qwen_tune_is_chat", True))
    else:
        path = Path(recipe.model.path)
        if not (path / "config.json").is_file():
            return False  # a hub name: decided after download, in apply_method
        model_type, chat = json.loads((path / "config.json").read_text())["model_type"], detect_is_chat(path)
    if recipe.model.is_chat is not None:
        chat = recipe.model.is_chat
    return bool(lora_modules_to_save(recipe, get_family(model_type), chat))


def check_before_launch(recipe: Recipe) -> None:
    """Every method x engine refusal, before any process is spawned or any model loaded (one line, rank 0 alike)."""
    check_recipe_on_this_machine(recipe)
    check_combination(recipe, trainable_embeddings=_planned_trainable_embeddings(recipe))
