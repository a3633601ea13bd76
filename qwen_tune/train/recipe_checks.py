"""Recipe values that only this machine or the model's config can refuse, checked before anything loads.

The schema (config.py) refuses values wrong everywhere; these depend on where and on what the recipe runs: a 16-bit
mode or attention kernel the machine lacks, an output dir it cannot write, a resume path that holds no checkpoint,
a max_len past the model's positions. Each is one ConfigError line instead of a traceback minutes later.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import shutil
from pathlib import Path

import torch

from ..config import ConfigError, Recipe

MIN_FREE_BYTES = 16 << 20  # less than one small checkpoint: a disk this full fails at the first save


def _use_cpu(recipe: Recipe) -> bool:
    return recipe.training.use_cpu if recipe.training.use_cpu is not None else not torch.cuda.is_available()


def check_device_settings(recipe: Recipe) -> None:
    cpu = _use_cpu(recipe)
    if recipe.training.precision == "fp16" and cpu:
        raise ConfigError("training.precision: fp16 needs a CUDA GPU (the Trainer refuses fp16 mixed precision on "
                          "CPU); use fp32 or bf16 there")
    if recipe.model.attn_implementation == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            raise ConfigError("model.attn_implementation: flash_attention_2 needs the flash-attn package "
                              "(pip install flash-attn), which is not installed; use sdpa")
        if cpu:
            raise ConfigError("model.attn_implementation: flash_attention_2 needs a CUDA GPU; use sdpa on CPU")


def check_output_dir_writable(recipe: Recipe) -> None:
    """Writes a probe file into output.dir: a read-only or full disk fails now, not at the first save. Folders it
    had to create are removed again, so a run refused later leaves no stray output dir."""
    if os.environ.get("RANK", "0") != "0":
        return  # rank 0 probes (and may remove what it created): other ranks must not race it
    out = Path(recipe.output.dir)
    probe = out / f".qwen_tune_write_probe.{os.getpid()}"
    created = out
    while not created.parent.exists() and created.parent != created:
        created = created.parent
    created = None if created.exists() else created
    try:
        out.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as fh:
            fh.write(b"\0" * 4096)
            fh.flush()
            os.fsync(fh.fileno())
        free = shutil.disk_usage(out).free
    except OSError as e:
        why = "no space left on the device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise ConfigError(f"output.dir: cannot write to {out}: {why}") from None
    finally:
        try:
            probe.unlink(missing_ok=True)
            if created is not None:
                shutil.rmtree(created, ignore_errors=True)
        except OSError:
            pass  # nothing was created
    if free < MIN_FREE_BYTES:
        raise ConfigError(f"output.dir: {out} has only {free >> 20} MiB free; checkpoints need more")


def check_resume_path(recipe: Recipe) -> None:
    resume = recipe.output.resume_from_checkpoint
    if resume in (None, "auto"):
        return
    p = Path(resume)
    if not p.is_dir() or not (p / "trainer_state.json").is_file():
        what = "does not exist" if not p.exists() else "is not a directory" if not p.is_dir() else \
            "holds no trainer_state.json (not a Trainer checkpoint dir such as outputs/run/checkpoint-100)"
        raise ConfigError(f"output.resume_from_checkpoint: {resume} {what}")


def model_positions(recipe: Recipe) -> int | None:
    """The longest sequence the model's config allows, when a local config.json tells (None for a Hub name)."""
    src = recipe.model.from_config or (str(Path(recipe.model.path) / "config.json") if recipe.model.path else None)
    if not src or not Path(src).is_file():
        return None
    try:
        cfg = json.loads(Path(src).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # loading reports an unreadable config with its own error
    sizes = [cfg.get(k) for k in ("max_position_embeddings", "seq_length")]
    sizes = [n for n in sizes if isinstance(n, int) and n > 0]
    return max(sizes) if sizes else None


def check_max_len(recipe: Recipe) -> None:
    positions = model_positions(recipe)
    if positions is not None and recipe.data.max_len > positions:
        raise ConfigError(f"data.max_len: {recipe.data.max_len} exceeds the model's {positions} positions "
                          "(max_position_embeddings / seq_length in its config.json); lower it")


def check_recipe_on_this_machine(recipe: Recipe) -> None:
    check_device_settings(recipe)
    check_max_len(recipe)
    check_resume_path(recipe)
    check_output_dir_writable(recipe)
