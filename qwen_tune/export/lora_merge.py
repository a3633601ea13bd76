"""The merge itself: checking that an adapter fits its base, attaching it with peft, and handling what
``merge_and_unload`` leaves to the caller (untied embeddings, casting to the output dtype)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from peft import PeftModel

from ..config import ConfigError
from .adapter import Adapter

log = logging.getLogger(__name__)


_LORA_KEY = re.compile(r"^(?P<mod>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.weight)?$")


def _strip_prefix(key: str) -> str:
    for prefix in ("base_model.model.", "base_model."):
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _saved_modules_to_save(adapter: Adapter) -> dict[str, tuple[int, ...]]:
    """Full tensors saved for modules_to_save: base parameter name -> shape."""
    names = adapter.config.get("modules_to_save") or []
    out = {}
    for key, shape in adapter.shapes.items():
        k = _strip_prefix(key)
        mod = k.rsplit(".", 1)[0]
        if any(mod == n or mod.endswith("." + n) for n in names) and not _LORA_KEY.match(k):
            out[k.replace(".modules_to_save.default.", ".")] = shape
    return out


def lora_modules(adapter: Adapter) -> set[str]:
    return {m.group("mod") for k in adapter.shapes if (m := _LORA_KEY.match(_strip_prefix(k)))}


def check_adapter_fits(model: torch.nn.Module, adapter: Adapter, base: Path) -> None:
    """Refuse an adapter made for another model, with one line naming what does not fit."""
    modules = dict(model.named_modules())
    params = dict(model.named_parameters(remove_duplicate=False))  # tied lm_head.weight too
    where = f"adapter {adapter.path} does not fit base {base}"
    missing = sorted(m for m in lora_modules(adapter) if m not in modules)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ConfigError(f"{where}: the base has no module {', '.join(missing[:3])}{more} "
                          f"(target modules {adapter.config.get('target_modules')!r}; another model family or size?)")
    for key, shape in adapter.shapes.items():
        m = _LORA_KEY.match(_strip_prefix(key))
        if not m:
            continue
        module = modules[m.group("mod")]
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or len(shape) != 2:
            continue
        kind = m.group("kind")
        if isinstance(module, torch.nn.Embedding):
            expected, got, what = ((weight.shape[0], shape[1], "vocabulary rows") if kind == "lora_embedding_A"
                                   else (weight.shape[1], shape[0], "embedding width"))
        elif isinstance(module, torch.nn.Linear):
            expected, got, what = ((weight.shape[1], shape[1], "input features") if kind == "lora_A"
                                   else (weight.shape[0], shape[0], "output features"))
        else:
            continue
        if expected != got:
            raise ConfigError(f"{where}: shape mismatch at {m.group('mod')}: the adapter's {kind} expects {got} "
                              f"{what}, the base has {expected} (hidden size or model size differs)")
    vocab = getattr(model.config, "vocab_size", None)
    for name, shape in _saved_modules_to_save(adapter).items():
        if name not in params:
            raise ConfigError(f"{where}: the adapter saved a trained copy of {name}, which the base does not have")
        if tuple(params[name].shape) != tuple(shape):
            base_shape = tuple(params[name].shape)
            if len(shape) == 2 and shape[0] != base_shape[0] and base_shape[0] == vocab:
                raise ConfigError(f"{where}: vocabulary size mismatch: the adapter's trained {name} has {shape[0]} "
                                  f"rows, the base has {base_shape[0]} (embeddings resized, or another base)")
            raise ConfigError(f"{where}: shape mismatch at {name}: adapter {list(shape)}, base {list(base_shape)}")


def _check_all_wrapped_modules_loaded(peft_model: torch.nn.Module, adapter: Adapter, base: Path) -> None:
    """Every module peft wrapped must have weights in the adapter (else it silently merges a zero delta)."""
    saved = lora_modules(adapter)
    if not saved:
        return
    wrapped = set()
    for name, module in peft_model.named_modules():
        if "default" in getattr(module, "lora_A", {}) or "default" in getattr(module, "lora_embedding_A", {}):
            wrapped.add(_strip_prefix(name))
    unloaded = sorted(wrapped - saved)
    if unloaded:
        more = f" and {len(unloaded) - 3} more" if len(unloaded) > 3 else ""
        raise ConfigError(f"adapter {adapter.path} does not fit base {base}: the adapter has no weights for "
                          f"{', '.join(unloaded[:3])}{more} (the base has more layers than the adapter's model?)")



def attach_adapter(model: torch.nn.Module, adapter: Adapter, base: Path) -> PeftModel:
    """The base with the adapter attached (not merged), every LoRA module loaded, or one line saying why not."""
    check_adapter_fits(model, adapter, base)
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter.path), is_trainable=False)
    except (ValueError, KeyError, RuntimeError) as e:
        text = str(e).strip()
        if isinstance(e, RuntimeError) and "size mismatch" not in text and "loading state_dict" not in text:
            raise  # not a mismatch (e.g. out of memory)
        first = text.splitlines()[0] if text else type(e).__name__
        raise ConfigError(f"adapter {adapter.path} does not fit base {base}: {first}") from None
    _check_all_wrapped_modules_loaded(peft_model, adapter, base)
    return peft_model


def cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast floating parameters and saved buffers only: non-persistent buffers (rotary inv_freq) keep fp32."""
    persistent = set(model.state_dict().keys())
    for p in model.parameters():
        if p.is_floating_point():
            p.data = p.data.to(dtype)
    for name, buf in model.named_buffers():
        if name in persistent and buf.is_floating_point():
            mod_name, _, attr = name.rpartition(".")
            mod = model.get_submodule(mod_name) if mod_name else model
            setattr(mod, attr, buf.to(dtype))



def untie_if_diverged(model: torch.nn.Module, notes: list[str]) -> bool:
    """A tied model whose embedding or lm_head was trained alone (modules_to_save) is no longer tied."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return False
    inp, outp = model.get_input_embeddings(), model.get_output_embeddings()
    if inp is None or outp is None or inp.weight is outp.weight:
        return False
    if inp.weight.shape == outp.weight.shape and torch.equal(inp.weight, outp.weight):
        return False
    model.config.tie_word_embeddings = False
    msg = "the adapter trained the input embedding and lm_head apart: the merged model has untied (separate) weights"
    log.info(msg)
    notes.append(msg)
    return True

