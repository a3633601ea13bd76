"""The adapter to merge and the base it merges onto: reading a peft adapter directory, finding its base, and
replacing a quantized base by full-precision weights (a GPTQ base dequantized, once, into the cache)."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from ..checkpoint import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, DEQUANT_MARKER, is_checkpoint,
                          read_json_object, read_quantization_config, tensor_shapes, weight_files, write_json)
from ..config import ConfigError
from ..constants import DTYPE_BYTES, cache_root
from ..quant.checkpoint import dequantize_checkpoint
from ..quant.format import GPTQError

log = logging.getLogger(__name__)

RECIPE_FILE = "qwen_tune_recipe.yaml"  # written next to the adapter by `qwen-tune train`


@dataclass
class Adapter:
    path: Path
    config: dict[str, Any]
    weights: Path
    shapes: dict[str, tuple[int, ...]]  # saved tensor name -> shape
    recipe: dict[str, Any] | None



def read_adapter(adapter_dir: str | os.PathLike) -> Adapter:
    path = Path(adapter_dir)
    if not path.is_dir():
        raise ConfigError(f"adapter directory {str(path)!r} does not exist")
    if not (path / ADAPTER_CONFIG).is_file():
        hint = " (it holds a full model: nothing to merge)" if (path / "config.json").is_file() else ""
        raise ConfigError(f"{path}: no {ADAPTER_CONFIG}, not a peft adapter directory{hint}")
    config = read_json_object(path / ADAPTER_CONFIG, str(path / ADAPTER_CONFIG))
    weights = next((path / w for w in ADAPTER_WEIGHTS if (path / w).is_file()), None)
    if weights is None:
        raise ConfigError(f"{path}: no adapter weights ({' or '.join(ADAPTER_WEIGHTS)})")
    try:
        shapes = tensor_shapes(weights)
    except Exception as e:  # noqa: BLE001 - a corrupt file becomes one clear line
        raise ConfigError(f"{weights}: cannot read adapter weights ({type(e).__name__}: {e})") from None
    recipe = None
    if (path / RECIPE_FILE).is_file():
        try:
            recipe = yaml.safe_load((path / RECIPE_FILE).read_text(encoding="utf-8")) or {}
        except yaml.YAMLError:
            recipe = None
    return Adapter(path, config, weights, shapes, recipe if isinstance(recipe, dict) else None)



def resolve_base(adapter: Adapter, base_dir: str | os.PathLike | None) -> Path:
    """--base wins; else the adapter's base_model_name_or_path (as given, or relative to the adapter directory)."""
    recorded = adapter.config.get("base_model_name_or_path")
    if base_dir is not None:
        base = Path(base_dir)
        if not base.exists():
            raise ConfigError(f"base model directory {str(base)!r} (--base) does not exist")
        if not is_checkpoint(base):
            raise ConfigError(f"--base {str(base)!r} is not a checkpoint directory (no config.json)")
        if recorded and Path(recorded).exists() and Path(recorded).resolve() != base.resolve():
            log.info("merging onto --base %s (the adapter was saved against %s)", base, recorded)
        return base
    if not recorded:
        raise ConfigError(f"{adapter.path / ADAPTER_CONFIG} names no base_model_name_or_path: pass --base DIR")
    rec = Path(recorded).expanduser()
    candidates = [rec] if rec.is_absolute() else [rec, adapter.path / rec, adapter.path / rec.name]
    for cand in candidates:
        if is_checkpoint(cand):
            if cand != rec:
                log.info("base model %r found at %s", recorded, cand)
            return cand
    if rec.exists():
        raise ConfigError(f"base model {recorded!r} (from {ADAPTER_CONFIG}) is not a checkpoint directory "
                          "(no config.json): pass --base DIR")
    raise ConfigError(f"base model {recorded!r} (from {adapter.path / ADAPTER_CONFIG}) does not exist here: "
                      "pass --base DIR with the base checkpoint the adapter was trained on")



def dequantized_base(path: str | os.PathLike) -> Path:
    """A full-precision checkpoint directory equivalent to the GPTQ checkpoint at ``path``.

    Every GPTQ layer becomes the nn.Linear weight it computes with (``scales * (q - zero)``, v1 and v2 zero points,
    any g_idx), in fp32: ``scale * (q - zero)`` of fp16 scales is not an fp16 number, and rounding it here would
    put the merge ~1e-4 away from the weights the adapter was trained against (the merge rounds once, at the end,
    to the output dtype); the config loses
    ``quantization_config``; tokenizer, generation config and every other file are copied. Written once into
    ``$QWEN_TUNE_CACHE/dequantized/<name>-<hash of the checkpoint's files>`` and reused (delete it to reclaim disk).
    """
    src = Path(path)
    weights = weight_files(src) if src.is_dir() else []
    if not weights:
        raise ConfigError(f"{src} is a GPTQ-quantized checkpoint without weight files to dequantize: pass --base DIR "
                          "with the full-precision checkpoint it was quantized from")
    h = hashlib.sha256(str(src.resolve()).encode() + b"\0fp32")
    for f in sorted(src.iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    dst = cache_root() / "dequantized" / f"{src.resolve().name}-{h.hexdigest()[:16]}"
    if (dst / DEQUANT_MARKER).is_file() and (dst / "config.json").is_file():
        log.info("dequantized GPTQ base: reusing %s", dst)
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    check_disk(dst, _dequantized_bytes(src, weights))
    log.info("dequantizing the GPTQ checkpoint %s into %s", src, dst)
    try:
        dequantize_checkpoint(src, dst, "fp32")
    except GPTQError as e:
        raise ConfigError(f"{e}; or pass --base DIR with the full-precision checkpoint it was quantized from") from None
    write_json(dst / DEQUANT_MARKER, {"source": str(src.resolve())})
    return dst


def _dequantized_bytes(src: Path, weights: list[Path]) -> int:
    """Bytes of the dequantized weights: each qweight word holds 32/bits weights, stored at the checkpoint's dtype."""
    q = read_quantization_config(src) or {}
    per_word = 32 // int(q.get("bits", 4))
    width = DTYPE_BYTES["fp32"]
    total = 0
    for f in weights:
        if f.suffix != ".safetensors":
            total += f.stat().st_size * 8  # a pessimistic guess for .bin files
            continue
        for name, shape in tensor_shapes(f).items():
            n = int(torch.Size(shape).numel())
            if name.endswith(".qweight"):
                total += n * per_word * width
            elif not name.endswith((".qzeros", ".scales", ".g_idx")):
                total += n * width
    return int(total * 1.02) + 16 * 2**20


def _trained_quantized(adapter: Adapter, recorded_base: Path | None) -> str | None:
    """The quantization ('nf4', 'gptq', ...) the adapter was trained on, None for a full-precision base."""
    recipe = adapter.recipe or {}
    method = None
    if recipe.get("method") == "qlora":
        q = (recipe.get("quantization") or {}).get("method", "none")
        method = q if q in ("nf4", "gptq") else "nf4"  # `none` resolves to nf4 unless the base is GPTQ
    if recorded_base is not None and is_checkpoint(recorded_base):
        q = read_quantization_config(recorded_base)
        if q:
            method = str(q.get("quant_method", "quantized"))
    return method


def full_precision_base(adapter: Adapter, base: Path, notes: list[str]) -> Path:
    recorded = adapter.config.get("base_model_name_or_path")
    recorded_path = Path(recorded).expanduser() if recorded else None
    if recorded_path is not None and not recorded_path.is_absolute() and not recorded_path.exists():
        recorded_path = adapter.path / recorded_path
    trained_q = _trained_quantized(adapter, recorded_path)
    q = read_quantization_config(base)
    if q is not None:
        kind = str(q.get("quant_method", "quantized"))
        if kind == "gptq":
            gptq_src = base
            base = dequantized_base(base)
            msg = (f"merging onto the GPTQ base {gptq_src} dequantized ({base}): exactly the weights the adapter was "
                   "trained against, so the merged model reproduces the Q-LoRA model (verified below); run "
                   "`qwen-tune quantize` on the merged model for an Int4 checkpoint again")
            log.info(msg)
            notes.append(msg)
            return base
        raise ConfigError(f"{base} is a {kind}-quantized checkpoint: pass --base DIR with the full-precision "
                          "checkpoint to merge onto")
    if trained_q:
        msg = (f"the adapter was trained with Q-LoRA on a quantized ({trained_q}) base; merging it onto the "
               f"full-precision base {base}: the result is a full-precision model (base + LoRA delta), which matches "
               "the adapter on that base (verified below) and differs slightly from the quantized model used in "
               "training; quantize the merged model again if you need a small one")
        log.warning(msg)
        notes.append(msg)
    return base



def check_disk(out: Path, needed: int) -> None:
    probe = out.resolve()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise ConfigError(f"not enough free disk for {out}: the merged model needs about {needed / 1e9:.2f} GB, "
                          f"{free / 1e9:.2f} GB free on {probe}")

