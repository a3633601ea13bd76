"""A thin transformers.Trainer subclass: chunked loss, throughput logs, NaN guard, atomic checkpoints.

Everything else (loop, optimizer, scheduler, gradient accumulation, DeepSpeed, resume) is the
stock Trainer.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import sort_checkpoints

from ..constants import DEFAULT_LOSS_CHUNK_SIZE, IGNORE_INDEX
from ..models.packed_attention import PACKED_SDPA, dense_mask_is_faster, use_packed_sdpa
from ..models.packing import packed_sample_index
from .loss import causal_lm_loss
from .loss_kernel import LossWorkspace

COMPLETE_MARKER = "qwen_tune_complete"
_CKPT = re.compile(r"^checkpoint-(\d+)$")
log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    pass


class CheckpointSaveError(RuntimeError):
    """A save that could not finish (disk full): the message says what is intact and how to continue."""


_DISK_FULL = ("no space left", "storagefull", "disk quota exceeded", "file write failed")


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC/EDQUOT however the writer reports it: OSError (json, shutil), torch.save's "file write failed",
    safetensors' and tokenizers' Rust io errors (plain exceptions carrying the OS message)."""
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(s in str(seen).lower() for s in _DISK_FULL):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]


def _manifest(ckpt: Path) -> dict[str, int]:
    return {str(p.relative_to(ckpt)): p.stat().st_size for p in sorted(ckpt.rglob("*"))
            if p.is_file() and not p.name.startswith(COMPLETE_MARKER)}


def mark_complete(ckpt: str | os.PathLike, step: int) -> None:
    """Vouch for a finished save: the marker lists every file with its size, written atomically."""
    ckpt = Path(ckpt)
    tmp = ckpt / f"{COMPLETE_MARKER}.tmp"
    tmp.write_text(json.dumps({"step": step, "files": _manifest(ckpt)}, indent=1))
    os.replace(tmp, ckpt / COMPLETE_MARKER)


def is_complete(ckpt: str | os.PathLike) -> bool:
    """The marker is there and every file it vouches for is still there with its size (not half-deleted)."""
    ckpt = Path(ckpt)
    try:
        files = json.loads((ckpt / COMPLETE_MARKER).read_text())["files"]
    except (OSError, ValueError, TypeError, KeyError):
        return False
    for name, size in files.items():
        f = ckpt / name
        if not f.is_file() or f.stat().st_size != size:
            log.warning("%s: %s is missing or changed since the checkpoint was saved; not resuming from it", ckpt, name)
            return False
    return bool(files)


def remove_checkpoint(ckpt: str | os.PathLike) -> None:
    """Unmark first, so a deletion cut short never leaves a marked, partial checkpoint."""
    (Path(ckpt) / COMPLETE_MARKER).unlink(missing_ok=True)
    shutil.rmtree(ckpt, ignore_errors=True)


def rotate_checkpoints(output_dir: str | os.PathLike, limit: int | None, best: str | None = None) -> None:
    """transformers' rotation (keep the newest `limit`, never the latest or the best), deleting unmarked-first."""
    if not limit or limit <= 0:
        return
    ckpts = sort_checkpoints(str(output_dir), use_mtime=False, best_model_checkpoint=best)
    if not ckpts:
        return
    protected = {ckpts[-1], str(Path(best))} if best else {ckpts[-1]}
    extra = len(ckpts) - max(limit, len(protected))
    for c in ckpts:
        if extra <= 0:
            break
        if c not in protected:
            remove_checkpoint(c)
            extra -= 1


def latest_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest checkpoint-N whose save finished and is still whole (a run killed mid-save leaves no marker)."""
    best = None
    for d in Path(output_dir).glob("checkpoint-*"):
        m = _CKPT.match(d.name)
        if m and (best is None or int(m.group(1)) > best[0]) and is_complete(d):
            best = (int(m.group(1)), d)
    return str(best[1]) if best else None


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def packed_attention_mask(position_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive block-diagonal causal mask ``[B, 1, T, T]`` of packed rows (a sample starts where
    ``position_ids`` do not step by +1).

    Given packed position_ids alone, transformers builds a *boolean* mask, and SDPA converts a boolean
    mask into a new float tensor in every layer and keeps it for backward (T^2 floats per layer: 256 MB
    per layer at 8k tokens). One float mask passed in is shared by all layers instead.
    """
    sample = packed_sample_index(position_ids)
    T = position_ids.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=position_ids.device).tril_()
    blocked = ~((sample[:, :, None] == sample[:, None, :]) & causal)
    return torch.zeros(blocked.shape, dtype=dtype, device=position_ids.device).masked_fill_(
        blocked, torch.finfo(dtype).min)[:, None]


class _SessionStart(TrainerCallback):
    """Starts the tokens/s clock when this session's training begins, at the token count a resume restored: the
    first logged rate must not count the tokens trained before the resume."""

    def __init__(self, trainer: "QwenTrainer") -> None:
        self.trainer = trainer

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self.trainer._last = (time.perf_counter(), int(state.num_input_tokens_seen or 0))
        return control


class QwenTrainer(Trainer):
    def __init__(self, *args: Any, loss_mode: str = "chunked", loss_chunk_size: int = DEFAULT_LOSS_CHUNK_SIZE,
                 compile_loss: bool | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.loss_mode = loss_mode
        self.loss_chunk_size = loss_chunk_size
        self.compile_loss = compile_loss
        self.loss_workspace = LossWorkspace()  # the loss's reused CPU logits buffer and its compile bookkeeping
        # Our loss divides by num_items_in_batch itself; tell the Trainer so it counts label tokens over the
        # whole accumulation window and does not divide by the accumulation steps again.
        self.model_accepts_loss_kwargs = True
        self._label_tokens: torch.Tensor | int = 0  # trained label tokens of this process, summed on the device
        self._start = time.perf_counter()
        self._last = (self._start, 0)
        self.add_callback(_SessionStart(self))

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None) -> Any:
        labels = inputs["labels"]
        inner = _unwrap(self.model)
        if ("position_ids" in inputs and "attention_mask" not in inputs and "cu_seq_lens_q" not in inputs
                and getattr(inner.config, "_attn_implementation", None) in ("sdpa", PACKED_SDPA)
                and (not use_packed_sdpa(inner) or dense_mask_is_faster(inputs["position_ids"]))):
            # Per-sample SDPA needs no mask (bench/bench_long.py); the dense one stays for rows of many tiny
            # samples and for a model that refuses "sdpa_packed".
            dtype = inner.get_input_embeddings().weight.dtype
            inputs = dict(inputs, attention_mask=packed_attention_mask(inputs["position_ids"], dtype))
        if self.loss_mode == "plain":
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        captured: dict[str, torch.Tensor] = {}

        def grab(_m: torch.nn.Module, _a: Any, out: Any) -> None:
            captured["h"] = out[0] if isinstance(out, tuple) else out.last_hidden_state

        handle = inner.get_decoder().register_forward_hook(grab)
        try:
            # An empty logits_to_keep runs the LM head on zero rows: the loss below applies it chunk by chunk.
            no_rows = torch.empty(0, dtype=torch.long, device=labels.device)
            outputs = model(**{k: v for k, v in inputs.items() if k != "labels"}, logits_to_keep=no_rows)
        finally:
            handle.remove()
        loss = causal_lm_loss(captured["h"], inner.get_output_embeddings(), labels,
                              num_items_in_batch=num_items_in_batch, chunk_size=self.loss_chunk_size,
                              compile=self.compile_loss, workspace=self.loss_workspace)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch counts every process's tokens, while gradients are averaged across processes.
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    @property
    def label_tokens(self) -> int:
        """Label tokens trained on by this process (evaluation batches excluded); reading it syncs the device."""
        return int(self._label_tokens)

    def count_label_tokens(self, inputs: dict[str, Any]) -> torch.Tensor:
        """Trained tokens of a batch (a subclass with another batch layout, e.g. preference pairs, overrides it)."""
        return (inputs["labels"][..., 1:] != IGNORE_INDEX).sum()

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        # Counted here, not in compute_loss (which evaluation calls too), and kept as a tensor: no sync per step.
        self._label_tokens = self._label_tokens + self.count_label_tokens(inputs)
        loss = super().training_step(model, inputs, num_items_in_batch)
        # Checked before the optimizer step, so the weights (and the last checkpoint) stay good.
        if not torch.isfinite(loss).all():
            raise NonFiniteLossError(
                f"loss became {loss.item()} at step {self.state.global_step + 1}; training stopped before the "
                "optimizer step. The last checkpoint is intact: lower training.lr, check the data, or use bf16 "
                "instead of fp16, then resume with output.resume_from_checkpoint=auto.")
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            now = time.perf_counter()
            seen = self.state.num_input_tokens_seen
            t0, n0 = self._last
            if now > t0 and seen:
                logs["tokens_per_s"] = round((seen - n0) / (now - t0), 1)
            self._last = (now, seen)
        super().log(logs, start_time)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # With LoRA on lm_head, peft's "auto" mode also saves the full base embedding matrices (it assumes the
        # vocabulary was resized). qwen-tune never resizes it, so keep adapters small.
        model = self.model
        if hasattr(model, "peft_config"):
            model.save_pretrained = functools.partial(type(model).save_pretrained, model, save_embedding_layers=False)
        try:
            super()._save(output_dir, state_dict)
        finally:
            model.__dict__.pop("save_pretrained", None)

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        # Rotation waits until the new checkpoint is marked complete: a kill in between must leave one to resume.
        limit = self.args.save_total_limit
        self.args.save_total_limit = None
        run_dir = self._get_output_dir(trial=trial)
        ckpt = Path(run_dir) / f"checkpoint-{self.state.global_step}"
        try:
            super()._save_checkpoint(model, trial)
            self.accelerator.wait_for_everyone()  # every rank's shards are on disk before the marker lists them
            if self.args.should_save:
                mark_complete(ckpt, self.state.global_step)
        except Exception as e:
            if not is_disk_full(e):
                raise
            if self.args.should_save:
                remove_checkpoint(ckpt)  # never marked; removing it gives the space back
            earlier = latest_complete_checkpoint(run_dir)
            intact = f"the newest complete one, {earlier}, is intact" if earlier else "there is no earlier checkpoint"
            raise CheckpointSaveError(
                f"disk full while saving {ckpt} ({first_line(e)}); the partial checkpoint was removed and {intact}: "
                "free space (or lower output.save_total_limit) and rerun with output.resume_from_checkpoint=auto"
            ) from None
        finally:
            self.args.save_total_limit = limit
        if self.args.should_save:
            rotate_checkpoints(run_dir, limit, self.state.best_model_checkpoint)
