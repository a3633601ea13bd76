"""Up-front checks of method x engine combinations, and DeepSpeed on CPU (gloo) for tests."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..config import ConfigError, Recipe


def zero_stage(ds_config: str | None) -> int | None:
    if not ds_config:
        return None
    path = Path(ds_config)
    if not path.is_file():
        raise ConfigError(f"deepspeed: config file {ds_config} not found (bundled: ds_configs/zero2.json, "
                          "ds_configs/zero3.json, ds_configs/zero3_offload.json)")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed: {ds_config} is not valid JSON: {e}") from None
    return int(cfg.get("zero_optimization", {}).get("stage", 0))


def check_combination(recipe: Recipe, trainable_embeddings: bool = False) -> None:
    """Refuse combinations that cannot work, and say what does."""
    stage = zero_stage(recipe.deepspeed)
    if recipe.deepspeed and recipe.fsdp:
        raise ConfigError("choose one engine: `deepspeed` or `fsdp`, not both")
    if recipe.method == "qlora" and stage == 3:
        raise ConfigError("Q-LoRA cannot run under ZeRO-3 (4-bit weights cannot be partitioned): "
                          "use ds_configs/zero2.json, or plain LoRA with ZeRO-3")
    if recipe.method == "qlora" and recipe.fsdp:
        raise ConfigError("Q-LoRA is not supported with FSDP here: use DeepSpeed ZeRO-2 (ds_configs/zero2.json)")
    if trainable_embeddings and stage == 3:
        raise ConfigError("LoRA with trainable embeddings/lm_head (modules_to_save) is not supported under ZeRO-3: "
                          "use ds_configs/zero2.json, or set lora.trainable_embeddings=false on a chat model")


def init_distributed_for_cpu() -> None:
    """DeepSpeed on CPU needs a gloo process group before the model exists (ZeRO-3's zero.Init reads it)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo")
