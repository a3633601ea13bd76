"""Reading and writing Hugging Face checkpoint directories: config.json, weight files, dtype, quantization config,
the files that travel with the weights, and publishing a finished build atomically.

Merge, quantize, dequantize and the GPTQ loader all go through these, so a checkpoint reads the same everywhere.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .config import ConfigError, read_json_object
from .constants import DTYPE_NAMES, IM_END_ID, TORCH_DTYPES

log = logging.getLogger(__name__)

#: Files holding weights in any format a model directory ships: never copied as "extra files".
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
#: What torch.load reads (after safetensors, which wins when both are present, as in transformers).
TORCH_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
MERGE_INFO = "qwen_tune_merge.json"  # provenance of a merged checkpoint
FAILED_MARKER = "MERGE_FAILED.txt"  # left in a build directory whose verification failed
DEQUANT_MARKER = "qwen_tune_dequantized.json"  # a finished dequantized copy of a GPTQ checkpoint
#: Written by qwen-tune itself for a checkpoint it produces, or not part of a model: never copied from a source.
NEVER_COPY = frozenset({"config.json", "quantize_config.json", ADAPTER_CONFIG, *ADAPTER_WEIGHTS, MERGE_INFO,
                        FAILED_MARKER, DEQUANT_MARKER})

__all__ = ["NEVER_COPY", "WEIGHT_SUFFIXES", "build_dir", "checkpoint_dtype", "copy_extra_files", "detect_is_chat",
           "generation_config_is_chat", "is_checkpoint", "is_within", "iter_checkpoint_tensors", "keep_tokenizer_files",
           "publish", "read_json_object", "read_quantization_config", "save_in_dtype", "set_config_dtype",
           "tensor_shapes", "weight_files", "write_json"]


def is_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def is_within(child: Path, parent: Path) -> bool:
    try:
        child.relative_to(parent)
        return True
    except ValueError:
        return False


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------------------------
# Weights


def weight_files(path: str | os.PathLike) -> list[Path]:
    """The weight files of a checkpoint: its safetensors when it has any (transformers prefers them, and a
    directory holding both formats holds the same weights twice), else its other weight files."""
    path = Path(path)
    files = sorted(f for f in path.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))
    st = [f for f in files if f.suffix == ".safetensors"]
    return st or files


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of one weight file (safetensors: from the header only)."""
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return {k: tuple(v.shape) for k, v in state.items()}


def iter_checkpoint_tensors(path: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    path = Path(path)
    files = weight_files(path)
    if not files:
        raise ConfigError(f"{path}: no weight files (*.safetensors or *.bin)")
    for f in files:
        if f.suffix == ".safetensors":
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():
                    yield k, fh.get_tensor(k)
        elif f.suffix in TORCH_WEIGHT_SUFFIXES:
            yield from torch.load(f, map_location="cpu", weights_only=True).items()
        else:
            raise ConfigError(f"{f}: qwen-tune reads weights from safetensors or PyTorch files, not {f.suffix}")


# ----------------------------------------------------------------------------------------------------------------
# config.json: dtype and quantization


def checkpoint_dtype(config: dict[str, Any]) -> str:
    """The checkpoint's dtype as bf16/fp16/fp32; fp32 when the config does not say (transformers' default, and
    lossless for whatever the weights are)."""
    name = config.get("dtype") or config.get("torch_dtype")
    if isinstance(name, str):
        name = name.replace("torch.", "")
        table = {**{long: short for short, long in DTYPE_NAMES.items()}, **{s: s for s in DTYPE_NAMES},
                 "half": "fp16", "float": "fp32"}
        if name in table:
            return table[name]
    if config.get("model_type") == "qwen":  # original Qwen-1 configs state precision as flags
        for short in DTYPE_NAMES:
            if config.get(short):
                return short
    return "fp32"


def set_config_dtype(config: dict[str, Any], short: str) -> None:
    """State ``short`` (bf16/fp16/fp32) in a config dict, in every spelling a loader reads."""
    config["torch_dtype"] = config["dtype"] = DTYPE_NAMES[short]  # `dtype`: transformers 5; `torch_dtype`: older
    if config.get("model_type") == "qwen":  # the original Qwen-1 code casts the model to the flagged precision
        for s in DTYPE_NAMES:
            config[s] = s == short


def read_quantization_config(path: str | os.PathLike | None, config_json_only: bool = False) -> dict[str, Any] | None:
    """config.json's ``quantization_config``, else ``quantize_config.json`` (auto-gptq's own file), else None.

    ``config_json_only``: only what transformers' quantization integrations read (config.json)."""
    if path is None or not Path(path).is_dir():
        return None
    path = Path(path)
    q = None
    if (path / "config.json").is_file():
        q = read_json_object(path / "config.json", str(path / "config.json")).get("quantization_config")
    auto_gptq = path / "quantize_config.json"
    if q is None and not config_json_only and auto_gptq.is_file():
        q = {"quant_method": "gptq", **read_json_object(auto_gptq, str(auto_gptq))}
    return q if isinstance(q, dict) else None


# ----------------------------------------------------------------------------------------------------------------
# Extra files and publishing


def link_root(src: Path) -> Path:
    """Where links of ``src`` may point: inside it, or, for a Hugging Face hub cache snapshot
    (``models--org--name/snapshots/<rev>``, whose files are links to ``../../blobs``), inside that repo folder."""
    root = src.resolve()
    return root.parent.parent if root.parent.name == "snapshots" else root


def copy_extra_files(src: Path, dst: Path, skip: Iterable[str] = (), avoid: Iterable[Path] = ()) -> list[str]:
    """Copy every non-weight file and folder of ``src`` (tokenizer, generation config, model code, README, ...)
    into ``dst``; returns the names copied.

    Not copied: weights and weight indexes, :data:`NEVER_COPY`, ``skip``, hidden files, folders holding one of
    ``avoid`` (an output inside its source), and symbolic links that point outside ``src``: a link in a
    downloaded model must not pull an arbitrary file of the machine into a published output. Links inside
    are copied as the files they point to, so the output is self-contained.
    """
    skip = set(skip) | NEVER_COPY
    root = link_root(src)
    avoid = [p.resolve() for p in avoid]
    copied: list[str] = []
    for f in sorted(src.iterdir()):
        name = f.name
        if name in skip or name.startswith(".") or name.endswith(WEIGHT_SUFFIXES) or name.endswith(".index.json"):
            continue
        if not is_within(f.resolve(), root):
            log.warning("%s is a link to %s, outside %s: not copied", f, f.resolve(), src)
            continue
        if f.is_dir():
            if any(is_within(a, f.resolve()) for a in avoid):
                continue
            shutil.copytree(f, dst / name, symlinks=False, ignore=_inside_only(root))
        elif f.is_file():
            shutil.copy2(f, dst / name)
        else:
            continue
        copied.append(name)
    return copied


def _inside_only(root: Path):
    """copytree ignore: hidden files, weights, and links leading outside ``root``."""

    def ignore(folder: str, names: list[str]) -> set[str]:
        out = set()
        for n in names:
            p = Path(folder) / n
            if n.startswith(".") or n.endswith(WEIGHT_SUFFIXES) or not is_within(p.resolve(), root):
                out.add(n)
        return out

    return ignore


def build_dir(out: Path) -> Path:
    """A fresh ``<out>.tmp-<pid>`` next to ``out`` to build into (a leftover of the same name is removed)."""
    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def publish(tmp: Path, out: Path) -> None:
    """Rename the finished build to ``out``; an existing ``out`` is replaced only once the rename succeeded."""
    old = None
    if out.exists():
        old = out.parent / f"{out.name}.old-{os.getpid()}"
        out.rename(old)
    try:
        tmp.rename(out)
    except OSError:
        if old is not None:
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def keep_tokenizer_files(base: str | os.PathLike, out: str | os.PathLike,
                         names: Iterable[str] = ("tokenizer_config.json", "chat_template.jinja")) -> list[str]:
    """Copy the base's tokenizer_config.json / chat_template.jinja over what a tokenizer class re-saved in ``out``,
    byte for byte: a re-save can drop or rewrite fields (auto_map, the chat template) the checkpoint's own
    ecosystem reads."""
    base, out = Path(base), Path(out)
    kept = []
    for name in names:
        if (base / name).is_file() and is_within((base / name).resolve(), link_root(base)):
            shutil.copyfile(base / name, out / name)
            kept.append(name)
        elif (out / name).is_file() and (base / "config.json").is_file():
            (out / name).unlink()  # the base has none: a re-save's template would override the tokenizer_config's
    return kept


def save_in_dtype(out: str | os.PathLike, base: str | os.PathLike) -> str | None:
    """Cast a full model saved in ``out`` to the dtype of the checkpoint it was trained from, in place.

    Training may keep fp32 master weights (16-bit autocast), so the Trainer saves fp32: twice a bf16 base on disk,
    and a config that no longer says what the base said. Adapters (no config.json) and .bin saves are left as they
    are. Returns the dtype written, None when nothing was changed.
    """
    out, base = Path(out), Path(base)
    if not (is_checkpoint(out) and is_checkpoint(base)):
        return None
    want = checkpoint_dtype(read_json_object(base / "config.json", str(base / "config.json")))
    files = [f for f in weight_files(out) if f.suffix == ".safetensors"]
    if not files:
        return None
    changed = False
    for f in files:
        state = load_file(str(f))
        if all(not t.is_floating_point() or t.dtype == TORCH_DTYPES[want] for t in state.values()):
            continue
        state = {k: t.to(TORCH_DTYPES[want]) if t.is_floating_point() else t for k, t in state.items()}
        tmp = f.with_name(f.name + ".tmp")
        save_file(state, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, f)
        changed = True
    if not changed:
        return None
    config = read_json_object(out / "config.json", str(out / "config.json"))
    set_config_dtype(config, want)
    write_json(out / "config.json", config)
    log.info("%s: weights saved in the base checkpoint's dtype (%s)", out, want)
    return want


# ----------------------------------------------------------------------------------------------------------------
# Chat or base


def generation_config_is_chat(gen: dict[str, Any]) -> bool:
    """Whether a generation config is a chat model's: Qwen-1 states it (``chat_format`` chatml vs raw); Qwen1.5+
    chat models stop on <|im_end|> while base models stop only on <|endoftext|>."""
    if "chat_format" in gen:
        return gen["chat_format"] == "chatml"
    eos = gen.get("eos_token_id")
    return IM_END_ID in (eos if isinstance(eos, list) else [eos])


def detect_is_chat(path: str | os.PathLike) -> bool:
    """Whether a checkpoint was chat-tuned (its ChatML tokens trained), read from its generation config."""
    gen_file = Path(path) / "generation_config.json"
    if not gen_file.exists():
        log.info("%s has no generation_config.json; assuming a chat model", path)
        return True
    return generation_config_is_chat(read_json_object(gen_file, str(gen_file)))
