"""Resolve a recipe's ``auto`` memory/speed trade-offs with the memory estimator, before training starts.

This lives above both ``train`` and ``estimate`` (the layer order keeps train from importing the estimator):
the CLI turns ``training.gradient_checkpointing: auto`` into true/false and logs one line with the numbers,
then hands run_training a resolved recipe.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from ..config import Recipe

GiB = 2**30


def device_memory() -> tuple[int, str]:
    """(bytes this process can use, where that number comes from): free CUDA memory, else available RAM."""
    import torch

    if torch.cuda.is_available():
        free, _total = torch.cuda.mem_get_info()
        return int(free), f"free on {torch.cuda.get_device_name()}"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "available RAM"
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"), "available RAM"


def resolve_gradient_checkpointing(recipe: Recipe, *, memory: Optional[tuple[int, str]] = None,
                                   model_config: Optional[dict[str, Any]] = None) -> tuple[Recipe, str | None]:
    """(recipe with ``gradient_checkpointing`` true/false, the log line), or (recipe, None) when it was not auto.

    Off when the estimate *without* checkpointing fits the device (it only costs recompute then); on otherwise,
    and on when the model cannot be sized (the safe side).
    """
    if recipe.training.gradient_checkpointing != "auto":
        return recipe, None
    from ..estimate import estimate_memory

    resolved = recipe.model_copy(deep=True)
    avail, where = memory if memory is not None else device_memory()
    gpus = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        resolved.training.gradient_checkpointing = False
        without = estimate_memory(resolved, gpus=gpus, model_config=model_config).total
        resolved.training.gradient_checkpointing = True
        with_gc = estimate_memory(resolved, gpus=gpus, model_config=model_config).total
    except Exception as e:  # noqa: BLE001 - any estimator failure: checkpointing on is the safe choice
        resolved.training.gradient_checkpointing = True
        return resolved, (f"gradient_checkpointing auto -> on: the memory estimate failed "
                          f"({type(e).__name__}: {e}), so the memory-safe setting is used")
    on = without > avail
    resolved.training.gradient_checkpointing = on
    nums = (f"estimated step peak {without / GiB:.2f} GiB without checkpointing, {with_gc / GiB:.2f} GiB with; "
            f"{avail / GiB:.2f} GiB {where}")
    if not on:
        return resolved, f"gradient_checkpointing auto -> off: {nums} (it fits, so no recompute)"
    tail = "" if with_gc <= avail else " (the estimate exceeds the device even with it)"
    return resolved, f"gradient_checkpointing auto -> on: {nums}{tail}"
