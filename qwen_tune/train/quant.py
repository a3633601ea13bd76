"""Quantized bases for Q-LoRA: GPTQ Int4 checkpoints and bitsandbytes NF4 on load.

* ``quantization.method: gptq`` loads a GPTQ checkpoint as published (``quantization_config`` in config.json or
  ``quantize_config.json``; ``qweight/qzeros/scales/g_idx``; v1 ``gptq`` or v2 ``gptq_v2`` zero points). Two
  backends: transformers' GPTQ integration (optimum + gptqmodel, loaded with gptqmodel's trainable kernel
  ``auto_trainable``; the fast path on GPU) and qwen-tune's pure-PyTorch dequantizing layer
  (:mod:`qwen_tune.models.gptq`, no extra dependency). ``auto`` takes gptqmodel when installed. Override with the
  environment variable ``QWEN_TUNE_GPTQ_BACKEND=torch|gptqmodel`` (or a ``quantization.backend`` recipe key where
  the schema has one). GPTQ computes in fp16 on GPU (fp32 on CPU); bf16 is refused.
* ``quantization.method: nf4`` quantizes any bf16/fp16/fp32 checkpoint on load with bitsandbytes (double quant
  optional), on GPU or with bitsandbytes' CPU backend.
* ``none`` with ``method: qlora`` picks gptq for a GPTQ checkpoint, nf4 otherwise.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, Recipe
from ..models.gptq import (GPTQError, GPTQLinear, config_json_quantization, gptqmodel_available, has_gptq_tensors,
                           read_quantization_config, spec_from_config)

log = logging.getLogger(__name__)

GPTQ_BACKEND_ENV = "QWEN_TUNE_GPTQ_BACKEND"
NF4_EXTRA_HINT = "pip install 'qwen-tune[nf4]' (or bash scripts/install_qlora.sh)"
GPTQ_EXTRA_HINT = "bash scripts/install_qlora.sh (the qwen-tune[qlora] extra plus gptqmodel installed with --no-deps)"


def checkpoint_quantization(path: str | Path | None) -> dict[str, Any] | None:
    if path is None or not Path(path).is_dir():
        return None
    return read_quantization_config(path)


def _is_gptq(q: dict[str, Any] | None) -> bool:
    return bool(q) and str(q.get("quant_method", "")).lower() == "gptq"


def check_checkpoint(recipe: Recipe, base: str | Path | None) -> None:
    """Refuse what cannot load: GPTQ tensors without their config, a GPTQ checkpoint outside Q-LoRA."""
    if base is None or not Path(base).is_dir():
        return
    q = checkpoint_quantization(base)
    if q is None and has_gptq_tensors(base):
        raise ConfigError(f"{base} holds GPTQ tensors (qweight/qzeros/scales) but no quantization config: restore "
                          "config.json's `quantization_config` or `quantize_config.json` from the release it came "
                          "from (bits, group_size, sym, desc_act, checkpoint format)")
    if _is_gptq(q):
        if recipe.method != "qlora":
            raise ConfigError(f"{base} is a GPTQ-quantized checkpoint: train it with method=qlora (LoRA on the frozen "
                              f"quantized base), or use the full-precision checkpoint for method={recipe.method}")
        if recipe.quantization.method == "nf4":
            raise ConfigError(f"{base} is already GPTQ-quantized: set quantization.method=gptq (or none = auto); "
                              "nf4 quantizes full-precision checkpoints on load")
    elif q is not None and recipe.method == "qlora" and str(q.get("quant_method")) != "bitsandbytes":
        raise ConfigError(f"{base} is quantized with {q.get('quant_method')!r}, which qwen-tune's Q-LoRA does not "
                          "support: use a GPTQ Int4 checkpoint or a full-precision one (quantized to NF4 on load)")


def quant_method(recipe: Recipe, base: str | Path | None) -> str:
    """none | gptq | nf4, resolving `none` (auto) for Q-LoRA from the checkpoint."""
    method = recipe.quantization.method
    if recipe.method != "qlora":
        return "none"
    if method == "none":
        return "gptq" if _is_gptq(checkpoint_quantization(base)) else "nf4"
    return method


def gptq_backend(recipe: Recipe | None = None) -> str:
    """`gptqmodel` (transformers' GPTQ integration) or `torch` (qwen-tune's dequantizing layer)."""
    want = (os.environ.get(GPTQ_BACKEND_ENV) or getattr(getattr(recipe, "quantization", None), "backend", None)
            or "auto").lower()
    if want not in ("auto", "torch", "gptqmodel"):
        raise ConfigError(f"GPTQ backend {want!r} ({GPTQ_BACKEND_ENV}) must be auto, torch or gptqmodel")
    have = gptqmodel_available()
    if want == "gptqmodel" and not have:
        raise ConfigError(f"the gptqmodel GPTQ backend needs optimum and gptqmodel, which are not installed: "
                          f"{GPTQ_EXTRA_HINT}")
    if want == "auto":
        want = "gptqmodel" if have else "torch"
        if want == "torch":
            log.info("GPTQ: optimum/gptqmodel not installed, so GPTQ layers run through qwen-tune's PyTorch "
                     "dequantizing layer (exact, slower on GPU than gptqmodel's kernels; for those: %s)",
                     GPTQ_EXTRA_HINT)
    return want


def resolve_quantized_precision(recipe: Recipe, use_cpu: bool) -> None:
    """Check precision against the quantization and settle `auto` before TrainingArguments are built.

    GPTQ: fp16 on GPU, fp32 on CPU; bf16 anywhere is refused (the reference's and gptqmodel's CUDA kernels compute
    in fp16, and bf16 would also round the fp16 scales).
    """
    check_checkpoint(recipe, recipe.model.path)
    if recipe.method != "qlora":
        return
    method = quant_method(recipe, recipe.model.path)
    if method != "gptq":
        return
    q = recipe.quantization
    bf16 = [k for k, v in (("training.precision", recipe.training.precision), ("model.dtype", recipe.model.dtype),
                           ("quantization.compute_dtype", q.compute_dtype)) if v == "bf16"]
    if bf16:
        raise ConfigError(f"{', '.join(bf16)}=bf16 cannot be used with a GPTQ Int4 base: GPTQ kernels compute in "
                          "fp16; set training.precision=fp16 (or auto: fp16 on GPU, fp32 on CPU), or train on the "
                          "full-precision checkpoint with quantization.method=nf4 for bf16")
    if recipe.training.precision == "auto":
        recipe.training.precision = "fp32" if use_cpu or not torch.cuda.is_available() else "fp16"
        log.info("GPTQ base: training precision auto -> %s", recipe.training.precision)


def quantization_kwargs(recipe: Recipe, base: str | Path) -> dict[str, Any]:
    """Keyword arguments for :func:`qwen_tune.models.loading.load_model` (quantization_config or gptq_backend)."""
    check_checkpoint(recipe, base)
    method = quant_method(recipe, base)
    if method == "none":
        if recipe.quantization.method != "none":
            log.warning("quantization.method=%s is ignored with method=%s (it applies to method=qlora)",
                        recipe.quantization.method, recipe.method)
        return {}
    if method == "nf4":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ConfigError(f"quantization nf4 needs bitsandbytes, which is not installed: {NF4_EXTRA_HINT}") \
                from None
        from transformers import BitsAndBytesConfig

        precision = recipe.training.precision
        if precision == "auto":
            from ..models.loading import resolve_precision

            use_cpu = recipe.training.use_cpu if recipe.training.use_cpu is not None else not torch.cuda.is_available()
            precision = resolve_precision("auto", use_cpu)
        compute = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[
            recipe.quantization.compute_dtype if recipe.quantization.compute_dtype != "auto" else precision]
        return {"quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=recipe.quantization.double_quant,
            bnb_4bit_compute_dtype=compute)}
    q = checkpoint_quantization(base)
    if not _is_gptq(q):
        raise ConfigError(f"{base}: quantization gptq needs a GPTQ checkpoint (config.json quantization_config or "
                          "quantize_config.json); make one with `qwen-tune quantize`, or use quantization.method=nf4 "
                          "to quantize this checkpoint on load")
    spec_from_config(q, str(base))  # refuses formats/bit widths the PyTorch path cannot read
    if recipe.training.precision == "bf16" or recipe.model.dtype == "bf16":
        raise ConfigError("GPTQ Int4 kernels compute in fp16: set training.precision=fp16 (or auto)")
    backend = gptq_backend(recipe)
    if backend == "gptqmodel" and config_json_quantization(base) is None:
        log.warning("%s: the GPTQ config is only in quantize_config.json, which transformers does not read: loading "
                    "through qwen-tune's PyTorch GPTQ path", base)
        backend = "torch"
    if backend == "torch":
        return {"gptq_backend": "torch"}
    from transformers import GPTQConfig

    # gptqmodel's default CPU kernel is inference-only; auto_trainable picks a kernel that supports backward.
    return {"quantization_config": GPTQConfig(bits=int(q.get("bits", 4)), backend="auto_trainable")}


def prepare_loaded_model(model: torch.nn.Module) -> torch.nn.Module:
    """After loading: bitsandbytes on CPUs with AVX512-BF16 repacks Linear4bit weights into an inference-only
    layout on the first no-grad forward (an eval step), after which training fails with "a view of a leaf Variable
    that requires grad is being used in an in-place operation". Switching that repacking off keeps the layout
    trainable (the forward stays correct, only that CPU fast path is skipped)."""
    try:
        from bitsandbytes.nn import Linear4bit
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
        from peft.tuners.lora.gptq import GPTQLoraLinear

        lora_config._register_custom_module({GPTQLinear: GPTQLoraLinear})
    return lora_config


def load_adapter(model: torch.nn.Module, adapter_dir: str | Path, is_trainable: bool = False) -> Any:
    """``PeftModel.from_pretrained`` that also works on a base loaded through the PyTorch GPTQ path."""
    from peft import PeftConfig, PeftModel

    config = PeftConfig.from_pretrained(str(adapter_dir))
    register_quantized_lora_layers(config, model)
    return PeftModel.from_pretrained(model, str(adapter_dir), config=config, is_trainable=is_trainable)


__all__ = ["GPTQError", "GPTQ_BACKEND_ENV", "check_checkpoint", "checkpoint_quantization", "gptq_backend",
           "load_adapter", "prepare_loaded_model", "quant_method", "quantization_kwargs",
           "register_quantized_lora_layers", "resolve_quantized_precision"]
