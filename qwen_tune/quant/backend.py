"""Choosing how a quantized base loads for Q-LoRA: GPTQ Int4 checkpoints (which backend) and bitsandbytes NF4.

* ``quantization.method: gptq`` loads a GPTQ checkpoint as published (``quantization_config`` in config.json or
  ``quantize_config.json``; ``qweight/qzeros/scales/g_idx``; v1 ``gptq`` or v2 ``gptq_v2`` zero points). Two
  backends: transformers' GPTQ integration (optimum + gptqmodel, loaded with gptqmodel's trainable kernel
  ``auto_trainable``; the fast path on GPU) and qwen-tune's pure-PyTorch dequantizing layer
  (:mod:`qwen_tune.quant.layer`, no extra dependency). ``auto`` takes gptqmodel when installed. Override with the
  environment variable ``QWEN_TUNE_GPTQ_BACKEND=torch|gptqmodel`` (or a ``quantization.backend`` recipe key where
  the schema has one). GPTQ computes in fp16 on GPU (fp32 on CPU); bf16 is refused.
* ``quantization.method: nf4`` quantizes any bf16/fp16/fp32 checkpoint on load with bitsandbytes (double quant
  optional), on GPU or with bitsandbytes' CPU backend.
* ``none`` with ``method: qlora`` picks gptq for a GPTQ checkpoint, nf4 otherwise.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, GPTQConfig

from ..checkpoint import read_quantization_config
from ..config import ConfigError, Recipe
from ..constants import TORCH_DTYPES
from ..models.loading import resolve_precision
from .audit import inspect_gptq
from .checkpoint import has_gptq_tensors, load_gptq_model
from .format import GPTQError, spec_from_config

log = logging.getLogger(__name__)

GPTQ_BACKEND_ENV = "QWEN_TUNE_GPTQ_BACKEND"
NF4_EXTRA_HINT = "pip install 'qwen-tune[nf4]' (or bash scripts/install_qlora.sh)"
GPTQ_EXTRA_HINT = "bash scripts/install_qlora.sh (the qwen-tune[qlora] extra plus gptqmodel installed with --no-deps)"


def gptqmodel_available() -> bool:
    """optimum + gptqmodel, what transformers' GPTQ integration needs (checked without importing them)."""
    return all(importlib.util.find_spec(m) is not None for m in ("optimum", "gptqmodel"))


def _is_gptq(q: dict[str, Any] | None) -> bool:
    return bool(q) and str(q.get("quant_method", "")).lower() == "gptq"


def check_checkpoint(recipe: Recipe, base: str | Path | None) -> None:
    """Refuse what cannot load: GPTQ tensors without their config, a GPTQ checkpoint outside Q-LoRA."""
    if base is None or not Path(base).is_dir():
        return
    q = read_quantization_config(base)
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
        return "gptq" if _is_gptq(read_quantization_config(base)) else "nf4"
    return method


def gptq_backend() -> str:
    """`gptqmodel` (transformers' GPTQ integration) or `torch` (qwen-tune's dequantizing layer)."""
    want = (os.environ.get(GPTQ_BACKEND_ENV) or "auto").lower()
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
    """Keyword arguments for :func:`load_causal_lm` (quantization_config or gptq_backend)."""
    check_checkpoint(recipe, base)
    method = quant_method(recipe, base)
    if method == "none":
        if recipe.quantization.method != "none":
            log.warning("quantization.method=%s is ignored with method=%s (it applies to method=qlora)",
                        recipe.quantization.method, recipe.method)
        return {}
    if method == "nf4":
        try:
            import bitsandbytes  # noqa: F401 - optional (the nf4 extra): imported only when asked for
        except ImportError:
            raise ConfigError(f"quantization nf4 needs bitsandbytes, which is not installed: {NF4_EXTRA_HINT}") \
                from None
        precision = recipe.training.precision
        if precision == "auto":
            use_cpu = recipe.training.use_cpu if recipe.training.use_cpu is not None else not torch.cuda.is_available()
            precision = resolve_precision("auto", use_cpu)
        compute = TORCH_DTYPES[
            recipe.quantization.compute_dtype if recipe.quantization.compute_dtype != "auto" else precision]
        return {"quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=recipe.quantization.double_quant,
            bnb_4bit_compute_dtype=compute)}
    q = read_quantization_config(base)
    if not _is_gptq(q):
        raise ConfigError(f"{base}: quantization gptq needs a GPTQ checkpoint (config.json quantization_config or "
                          "quantize_config.json); make one with `qwen-tune quantize`, or use quantization.method=nf4 "
                          "to quantize this checkpoint on load")
    spec_from_config(q, str(base))  # refuses formats/bit widths the PyTorch path cannot read
    if recipe.training.precision == "bf16" or recipe.model.dtype == "bf16":
        raise ConfigError("GPTQ Int4 kernels compute in fp16: set training.precision=fp16 (or auto)")
    backend = gptq_backend()
    if backend == "gptqmodel" and read_quantization_config(base, config_json_only=True) is None:
        log.warning("%s: the GPTQ config is only in quantize_config.json, which transformers does not read: loading "
                    "through qwen-tune's PyTorch GPTQ path", base)
        backend = "torch"
    if backend == "torch":
        return {"gptq_backend": "torch"}
    # gptqmodel's default CPU kernel is inference-only; auto_trainable picks a kernel that supports backward.
    return {"quantization_config": GPTQConfig(bits=int(q.get("bits", 4)), backend="auto_trainable")}


def load_causal_lm(path: str | Path, dtype: str = "fp32", attn_implementation: str = "sdpa",
                   **from_pretrained_kwargs: Any) -> torch.nn.Module:
    """``AutoModelForCausalLM.from_pretrained``, except for GPTQ checkpoints transformers cannot load here.

    GPTQ checkpoints go through transformers' integration (optimum + gptqmodel) when installed or asked for through a
    quantization_config, else through qwen-tune's PyTorch dequantizing layers (``gptq_backend="torch"``).
    """
    path = Path(path)
    backend = from_pretrained_kwargs.pop("gptq_backend", None)
    q = read_quantization_config(path)
    if q is None and has_gptq_tensors(path):  # transformers would load it with randomly initialized linears
        raise GPTQError(f"{path} holds GPTQ tensors (qweight/qzeros/scales) but no quantization config: restore "
                        "config.json's `quantization_config` or `quantize_config.json` from its release")
    if (backend is None and "quantization_config" not in from_pretrained_kwargs and _is_gptq(q)
            and (not gptqmodel_available() or read_quantization_config(path, config_json_only=True) is None)):
        backend = "torch"  # transformers reads only config.json's quantization_config, and needs gptqmodel
    if backend != "torch" and _is_gptq(q):
        check = inspect_gptq(path, spec_from_config(q, str(path)), announce=False)  # the exact path announces
        reason = check.needs_exact_path
        if not reason:
            check.announce(path)
        else:
            log.warning("%s: loading through qwen-tune's exact PyTorch GPTQ path instead of gptqmodel: %s", path,
                        reason)
            backend = "torch"
            from_pretrained_kwargs.pop("quantization_config", None)
    if backend == "torch":
        return load_gptq_model(path, dtype=TORCH_DTYPES[dtype], attn_implementation=attn_implementation)
    return AutoModelForCausalLM.from_pretrained(path, dtype=TORCH_DTYPES[dtype],
                                                attn_implementation=attn_implementation, **from_pretrained_kwargs)
