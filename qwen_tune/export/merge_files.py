"""The files of a merged checkpoint besides its weights: tokenizer and extra files of the base (or the adapter's
tokenizer), config.json and generation_config.json, and the size/disk checks of the output."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import torch

from ..checkpoint import (WEIGHT_SUFFIXES, checkpoint_dtype, copy_extra_files, generation_config_is_chat, is_within,
                          link_root,
                          read_json_object, set_config_dtype, tensor_shapes, weight_files, write_json)
from ..config import ConfigError
from ..constants import DTYPE_BYTES
from ..models.chat_outputs import add_chat_template as chat_template_into, chat_generation_config
from .adapter import Adapter

log = logging.getLogger(__name__)

TOKENIZER_FILES = frozenset({
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "qwen.tiktoken", "tokenizer.model", "chat_template.jinja", "chat_template.json", "vocab.txt",
})
# The BPE vocabulary itself (added tokens live in tokenizer.json / tokenizer_config.json).
_VOCAB_FILES = frozenset({"vocab.json", "merges.txt", "qwen.tiktoken", "tokenizer.model", "vocab.txt"})
# Any of these in the adapter directory means the training run saved its tokenizer there.
_TOKENIZER_MARKERS = ("tokenizer_config.json", "tokenizer.json", "vocab.json", "qwen.tiktoken", "tokenizer.model")
# Kept byte for byte from the base: a tokenizer class re-saving them drops or rewrites fields (auto_map, chat_template).
KEEP_FROM_BASE = ("tokenizer_config.json", "chat_template.jinja")
_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def _read(path: Path) -> dict:
    return read_json_object(path, str(path))


def _tokenizer_source(adapter: Path, base: Path) -> Path:
    return adapter if any((adapter / f).is_file() for f in _TOKENIZER_MARKERS) else base


def copy_files(base: Path, adapter: Path, dest: Path, avoid: list[Path]) -> list[str]:
    """Copy the tokenizer and every non-weight file of the base into dest; returns the names copied.

    The extra files are :func:`qwen_tune.checkpoint.copy_extra_files`' (no weights, no links out of the base), less
    generation_config.json (written by the merge from the base's) and the base's tokenizer files when the adapter
    brings its own tokenizer.
    """
    tok_src = _tokenizer_source(adapter, base)
    copied: list[str] = []
    skip = {"generation_config.json"}
    if tok_src != base:
        skip |= TOKENIZER_FILES
        for name in sorted(TOKENIZER_FILES):
            # transformers 5 saves only tokenizer.json: the base's vocabulary files stay for other loaders.
            src = tok_src / name if (tok_src / name).is_file() else base / name if name in _VOCAB_FILES else None
            if name in KEEP_FROM_BASE and (base / name).is_file():
                src = base / name
            if src is not None and src.is_file() and is_within(src.resolve(), link_root(src.parent)):
                shutil.copy2(src, dest / name)
                copied.append(name)
    copied += copy_extra_files(base, dest, skip=skip, avoid=avoid)
    if tok_src != base:
        _keep_tokenizer_auto_map(base, dest)
    return copied


def _keep_tokenizer_auto_map(base: Path, dest: Path) -> None:
    """A tokenizer_config saved by training may lack the base's auto_map (remote-code Qwen-1 loading needs it)."""
    base_cfg, out_cfg = base / "tokenizer_config.json", dest / "tokenizer_config.json"
    if not (base_cfg.is_file() and out_cfg.is_file()):
        return
    auto_map = _read(base_cfg).get("auto_map")
    data = _read(out_cfg)
    if auto_map and "auto_map" not in data:
        data["auto_map"] = auto_map
        write_json(out_cfg, data)


def _write_config(base: Path, dest: Path, dtype: str, untied: bool) -> None:
    """The base's own config.json with only what the merge changes: dtype (and tying)."""
    config = _read(base / "config.json")
    set_config_dtype(config, dtype)
    if untied:
        config["tie_word_embeddings"] = False
    config.pop("quantization_config", None)
    write_json(dest / "config.json", config)


def add_chat_template(base: Path, adapter: Adapter, dest: Path, notes: list[str]) -> bool:
    """A base checkpoint without a chat template, fine-tuned on conversations, leaves with the one it trained with
    (:func:`qwen_tune.models.chat_outputs.add_chat_template`)."""
    if adapter.recipe is None or generation_config_is_chat(_base_generation(base)):
        return False
    origin = chat_template_into(base, dest, str((adapter.recipe.get("data") or {}).get("template") or "auto"))
    if origin:
        msg = f"tokenizer_config.json: the base has no chat template; added the {origin} template it was trained on"
        log.info(msg)
        notes.append(msg)
    return origin is not None


def _base_generation(base: Path) -> dict:
    return _read(base / "generation_config.json") if (base / "generation_config.json").is_file() else {}


def write_generation_config(base: Path, adapter: Adapter, dest: Path, notes: list[str]) -> str | None:
    """generation_config.json of the adapter run (training copies the base's), else the base's.

    An adapter trained by qwen-tune learned ChatML; if the generation config is a base model's (stops only on
    <|endoftext|>, Qwen-1 chat_format raw), the merged chat model would never stop, so <|im_end|> is added.
    """
    src = next((d / "generation_config.json" for d in (adapter.path, base)
                if (d / "generation_config.json").is_file()), None)
    if src is None:
        return None
    gen = _read(src)
    changed = chat_generation_config(gen) if adapter.recipe is not None else []
    if changed:
        msg = (f"generation_config.json: the base is not a chat model but the adapter was trained on ChatML, "
               f"so the merged model is one ({'; '.join(changed)})")
        log.info(msg)
        notes.append(msg)
    write_json(dest / "generation_config.json", gen)
    return "generation_config.json"



def parse_size(size: str | int) -> int:
    if isinstance(size, int):
        if size <= 0:
            raise ConfigError(f"max shard size must be positive, got {size}")
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(size).upper())
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(f"max shard size {size!r} is not a size like 2GB, 500MB or 1GiB")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2) or "B"])



def check_output(out: Path, overwrite: bool, protected: list[Path]) -> None:
    resolved = out.resolve()
    for p in protected:
        if is_within(p.resolve(), resolved):
            raise ConfigError(f"output {str(out)!r} would replace {p}: choose another --out")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"output directory {str(out)!r} is not empty: pass --overwrite to replace it")



def estimate_output_bytes(base: Path, dtype: str) -> int:
    """Bytes of the merged weights in `dtype` (+ the files copied), from the base's weight files."""
    numel = 0
    other = 0
    source_bytes = DTYPE_BYTES[checkpoint_dtype(_read(base / "config.json"))]
    for f in weight_files(base):
        if f.suffix == ".safetensors":
            try:
                numel += sum(int(torch.Size(s).numel()) for s in tensor_shapes(f).values())
                continue
            except Exception:  # noqa: BLE001 - fall back to scaling the file size
                pass
        other += f.stat().st_size
    extras = sum(f.stat().st_size for f in base.iterdir() if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES))
    weights = numel * DTYPE_BYTES[dtype] + other * DTYPE_BYTES[dtype] // source_bytes
    return int(weights * 1.02) + extras + 16 * 2**20  # index/config overhead and a margin

