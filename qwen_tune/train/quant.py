"""Quantized bases for Q-LoRA: GPTQ Int4 checkpoints and bitsandbytes NF4 on load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, Recipe


def checkpoint_quantization(path: str | Path) -> dict[str, Any] | None:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return None
    q = json.loads(cfg.read_text()).get("quantization_config")
    if q is None and (Path(path) / "quantize_config.json").is_file():
        q = json.loads((Path(path) / "quantize_config.json").read_text()) | {"quant_method": "gptq"}
    return q


def quant_method(recipe: Recipe, base: str | Path) -> str:
    """none | gptq | nf4, resolving `auto` for Q-LoRA from the checkpoint."""
    method = recipe.quantization.method
    if recipe.method != "qlora":
        return method
    if method == "none":
        q = checkpoint_quantization(base)
        return "gptq" if q and q.get("quant_method") == "gptq" else "nf4"
    return method


def quantization_kwargs(recipe: Recipe, base: str | Path) -> dict[str, Any]:
    method = quant_method(recipe, base)
    if method == "none":
        return {}
    if method == "nf4":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ConfigError("quantization nf4 needs bitsandbytes: pip install 'qwen-tune[nf4]'") from None
        from transformers import BitsAndBytesConfig

        compute = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}.get(
            recipe.quantization.compute_dtype, torch.float16 if torch.cuda.is_available() else torch.float32)
        return {"quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=recipe.quantization.double_quant,
            bnb_4bit_compute_dtype=compute)}
    if checkpoint_quantization(base) is None:
        raise ConfigError(f"{base}: quantization gptq needs a GPTQ checkpoint (config.json quantization_config or "
                          "quantize_config.json); make one with `qwen-tune quantize`")
    if recipe.training.precision == "bf16":
        raise ConfigError("GPTQ Int4 kernels compute in fp16: set training.precision=fp16 (or auto)")
    try:
        import gptqmodel  # noqa: F401
    except ImportError:
        raise ConfigError("GPTQ checkpoints need gptqmodel: see scripts/install_qlora.sh "
                          "(pip install 'qwen-tune[qlora]' then gptqmodel with --no-deps)") from None
    from transformers import GPTQConfig

    return {"quantization_config": GPTQConfig(bits=4, backend="auto_trainable")}
