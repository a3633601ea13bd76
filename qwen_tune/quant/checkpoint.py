"""GPTQ checkpoints on disk: detecting them, loading one as a model of :class:`GPTQLinear` layers, writing the
published layout, and dequantizing one into a plain checkpoint (for merging)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from huggingface_hub import save_torch_state_dict
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from ..checkpoint import (build_dir, checkpoint_dtype, copy_extra_files, iter_checkpoint_tensors, publish,
                          read_json_object, read_quantization_config, set_config_dtype, weight_files, write_json)
from ..constants import TORCH_DTYPES
from ..models import qwen1  # noqa: F401 - registers model_type "qwen" with the Auto classes
from .audit import inspect_gptq
from .format import QUANT_SUFFIXES, GPTQError, GPTQSpec, dequantize, spec_from_config
from .gptq import decoder_blocks
from .layer import GPTQLinear

log = logging.getLogger(__name__)


def quantized_prefixes(path: str | os.PathLike) -> set[str]:
    """Module names that have a ``qweight`` in the checkpoint (read from the file headers only)."""
    path = Path(path)
    names: set[str] = set()
    for f in weight_files(path):
        if f.suffix == ".safetensors":
            with safe_open(str(f), framework="pt") as fh:
                keys = list(fh.keys())
        else:
            keys = list(torch.load(f, map_location="cpu", weights_only=True, mmap=True).keys())
        names |= {k[: -len(".qweight")] for k in keys if k.endswith(".qweight")}
    return names


def has_gptq_tensors(path: str | os.PathLike) -> bool:
    """Whether the weights hold GPTQ tensors (``*.qweight``), from the index or the safetensors headers only."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    try:
        if index.is_file():
            return any(k.endswith(".qweight") for k in read_json_object(index, str(index))["weight_map"])
        return bool(path.is_dir() and any(f.suffix == ".safetensors" for f in path.iterdir())
                    and quantized_prefixes(path))
    except (OSError, ValueError, KeyError):
        return False



def _replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def load_gptq_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                    attn_implementation: str = "sdpa") -> nn.Module:
    """A GPTQ checkpoint as a model whose quantized linears are :class:`GPTQLinear` (no optimum/gptqmodel needed).

    The model class is the one transformers picks for the config (the bundled Qwen-1 class for model_type qwen);
    everything not quantized (embeddings, norms, lm_head) is cast to ``dtype``.
    """

    path = Path(path)
    q = read_quantization_config(path)
    if q is None:
        raise GPTQError(f"{path}: no GPTQ quantization config (config.json quantization_config or "
                        "quantize_config.json)")
    spec = spec_from_config(q, str(path))
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with init_empty_weights(include_buffers=False):  # parameters on meta, buffers (rotary tables) real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    prefixes = quantized_prefixes(path)
    if not prefixes:
        raise GPTQError(f"{path}: the config says GPTQ but the weights hold no `qweight` tensors")
    modules = dict(model.named_modules())
    check = inspect_gptq(path, spec, {n: m.bias is not None for n, m in modules.items() if isinstance(m, nn.Linear)})
    spec, dropped = check.spec, set(check.zero_biases)
    for name in sorted(prefixes):
        old = modules.get(name)
        if not isinstance(old, nn.Linear):
            raise GPTQError(f"{path}: quantized tensor {name}.qweight has no matching linear layer in "
                            f"{type(model).__name__}")
        _replace_module(model, name, GPTQLinear(old.in_features, old.out_features, old.bias is not None, spec))
    state: dict[str, torch.Tensor] = {}
    for key, t in iter_checkpoint_tensors(path):
        if key in dropped:
            continue
        if any(key.endswith("." + s) for s in QUANT_SUFFIXES) or (key.endswith(".bias") and
                                                                   key[: -len(".bias")] in prefixes):
            state[key] = t
        elif t.is_floating_point():
            state[key] = t.to(dtype)
        else:
            state[key] = t
    expected = model.state_dict()
    for key, t in state.items():
        if key in expected and tuple(expected[key].shape) != tuple(t.shape):
            raise GPTQError(f"{path}: {key} has shape {list(t.shape)}, the model expects {list(expected[key].shape)} "
                            "(bits or group_size in the quantization config do not match the weights?)")
    result = model.load_state_dict(state, strict=False, assign=True)
    tied = getattr(config, "tie_word_embeddings", False)
    missing = [k for k in result.missing_keys if not (tied and k.endswith("lm_head.weight"))]
    if missing:
        raise GPTQError(f"{path}: the checkpoint lacks {', '.join(missing[:3])}"
                        f"{' and more' if len(missing) > 3 else ''}")
    unexpected = [k for k in result.unexpected_keys if not k.endswith("inv_freq")]
    if unexpected:
        log.warning("%s: ignored %d tensors the model does not use (e.g. %s)", path, len(unexpected), unexpected[0])
    if tied:
        model.tie_weights()
    meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if meta:
        raise GPTQError(f"{path}: no weights for {', '.join(meta[:3])}")
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    model.config.quantization_config = q  # the model is (and stays) quantized: peft and merge read this
    model.quantization_method = "gptq"  # what peft's prepare_model_for_kbit_training checks
    model.config._name_or_path = str(path)
    model.name_or_path = str(path)
    model.eval()
    return model



def dequantize_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, dtype: str | None = None) -> Path:
    """Write ``dst``: the GPTQ checkpoint ``src`` as a plain one (every GPTQ layer a ``weight``), config without
    ``quantization_config``, tokenizer and every other non-weight file copied. Streams layer by layer.

    ``dtype`` (bf16/fp16/fp32) defaults to the checkpoint's own dtype; fp32 holds the dequantized weights exactly.
    """
    src, dst = Path(src), Path(dst)
    q = read_quantization_config(src)
    if q is None:
        raise GPTQError(f"{src}: not a GPTQ checkpoint (no quantization config)")
    check = inspect_gptq(src, spec_from_config(q, str(src)))
    spec, dropped = check.spec, set(check.zero_biases)
    config = read_json_object(src / "config.json", str(src / "config.json"))
    out_dtype = dtype or checkpoint_dtype(config)
    torch_dtype = TORCH_DTYPES[out_dtype]
    groups: dict[str, dict[str, torch.Tensor]] = {}
    state: dict[str, torch.Tensor] = {}
    for key, t in iter_checkpoint_tensors(src):
        mod, _, leaf = key.rpartition(".")
        if key in dropped:
            continue
        if leaf in QUANT_SUFFIXES:
            groups.setdefault(mod, {})[leaf] = t
        elif t.is_floating_point():
            state[key] = t.to(torch_dtype)
        else:
            state[key] = t
    for mod, parts in groups.items():
        missing = [s for s in ("qweight", "qzeros", "scales") if s not in parts]
        if missing:
            raise GPTQError(f"{src}: {mod} lacks {', '.join(missing)}")
        w = dequantize(parts["qweight"], parts["qzeros"], parts["scales"], parts.get("g_idx"), spec, torch.float32)
        state[f"{mod}.weight"] = w.t().contiguous().to(torch_dtype)
    tmp = build_dir(dst)
    save_torch_state_dict(state, tmp, max_shard_size="4GB")
    config.pop("quantization_config", None)
    set_config_dtype(config, out_dtype)
    write_json(tmp / "config.json", config)
    copy_extra_files(src, tmp, avoid=[dst, tmp])
    publish(tmp, dst)
    return dst



def quantization_config_dict(spec: GPTQSpec, algorithm: str, damp_percent: float) -> dict[str, Any]:
    """config.json ``quantization_config`` as auto-gptq writes it, with the format stated explicitly."""
    return {
        "bits": spec.bits,
        "group_size": spec.group_size,
        "damp_percent": damp_percent,
        "desc_act": False,
        "static_groups": False,
        "sym": spec.sym,
        "true_sequential": False,
        "model_name_or_path": None,
        "model_file_base_name": "model",
        "quant_method": "gptq",
        "checkpoint_format": spec.format,  # gptq = v1 (zero - 1 stored), gptq_v2 = zero stored
        "format": spec.format,  # the same, under the name newer transformers/optimum use
        "meta": {"quantizer": ["qwen-tune"], "algorithm": algorithm},
    }


def save_gptq_checkpoint(model: nn.Module, packed: dict[str, dict[str, torch.Tensor]], src: str | os.PathLike,
                         out: str | os.PathLike, spec: GPTQSpec, algorithm: str, damp_percent: float,
                         dtype: str = "fp16", max_shard_size: str = "4GB") -> Path:
    """The published layout: safetensors with ``qweight/qzeros/scales/g_idx(/bias)`` for every quantized linear and
    the other weights in ``dtype``; config.json with ``quantization_config``; quantize_config.json; tokenizer and
    every other non-weight file of ``src``."""
    src, out = Path(src), Path(out)
    torch_dtype = TORCH_DTYPES[dtype]
    state: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict().items():
        mod = key.rpartition(".")[0]
        if mod in packed:
            continue
        state[key] = t.detach().to(torch_dtype).contiguous() if t.is_floating_point() else t.detach().contiguous()
    if getattr(model.config, "tie_word_embeddings", False):
        state = {k: v for k, v in state.items() if not k.endswith("lm_head.weight")}
    for mod, tensors in packed.items():
        for leaf, t in tensors.items():
            state[f"{mod}.{leaf}"] = t.contiguous()
    tmp = build_dir(out)
    save_torch_state_dict(state, tmp, max_shard_size=max_shard_size, metadata={"format": "pt"})
    config = read_json_object(src / "config.json", str(src / "config.json"))
    qcfg = quantization_config_dict(spec, algorithm, damp_percent)
    prefix, blocks = decoder_blocks(model)
    in_blocks = {n for n, m in blocks.named_modules() if isinstance(m, nn.Linear)}  # "0.self_attn.q_proj", ...
    done = {name[len(prefix) + 1:] for name in packed}
    if in_blocks - done:  # some linears stayed full precision: say which are quantized (optimum reads this)
        qcfg["modules_in_block_to_quantize"] = [sorted({n.split(".", 1)[1] for n in done})]
    config["quantization_config"] = qcfg
    set_config_dtype(config, dtype)
    write_json(tmp / "config.json", config)
    write_json(tmp / "quantize_config.json", {k: v for k, v in qcfg.items() if k != "quant_method"})
    copy_extra_files(src, tmp, avoid=[out, tmp])
    publish(tmp, out)
    return out

