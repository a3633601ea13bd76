"""Merge a LoRA adapter into its base model: a standalone checkpoint that loads wherever the base loaded.

Steps (:func:`merge_adapter`):

1. Read the adapter (``adapter_config.json``, its weights, qwen-tune's recipe when present) and find the base:
   ``--base`` or the adapter's ``base_model_name_or_path``. Quantized bases: an adapter trained with Q-LoRA merges
   onto full-precision weights: nf4 quantizes on load, so the recorded base already is full precision; a GPTQ
   base is dequantized (:func:`qwen_tune.export.adapter.dequantized_base`, exactly the weights the adapter was trained against, cached), or
   ``--base`` names the original full-precision checkpoint instead.
2. Refuse early what cannot work: a non-empty output (without ``overwrite``), too little free disk, an output that
   would replace the base or the adapter, an invalid shard size.
3. Load the base in fp32, check that the adapter fits it (every LoRA module exists with the right shapes, saved
   embeddings/lm_head have the base's vocabulary size, every module peft wraps has weights in the adapter),
   attach the adapter with peft, and ``merge_and_unload()`` (LoRA deltas and ``modules_to_save`` copies).
   Merging in fp32 and rounding once at the end is the most accurate way to produce bf16/fp16 weights.
4. Build ``<out>.tmp-<pid>``: first the tokenizer (the adapter's if the training run saved one next to it, else
   the base's) and every other file of the base that is not a weight file (model code, ``qwen.tiktoken``, README,
   LICENSE, ...); then the merged weights in the output dtype (sharded safetensors + index);
   ``generation_config.json`` and ``config.json`` are the base's own, the config with only the dtype (and, if the
   merge untied them, ``tie_word_embeddings``) changed, so older transformers versions and other runtimes read it
   exactly as they read the base's (transformers 5 would rewrite e.g. ``rope_theta`` as ``rope_parameters``).
   One deliberate change: a *base* (non-chat) model fine-tuned by qwen-tune (always ChatML) becomes a chat model,
   so its generation config also stops on ``<|im_end|>`` (Qwen-1: ``chat_format`` chatml).
5. Verify (fp32 logits on a ChatML probe batch tokenized by the output's tokenizer, real tokens only):

   * merge check: merged model in memory vs the unmerged adapter model (base + adapter);
   * reload check: the written directory, reloaded in fp32 from disk, vs the in-memory merged model with its weights
     rounded to the output dtype. Same weights and the same fp32 arithmetic, so this is exact up to float noise, for
     every output dtype: it catches missing/misnamed tensors, a wrong config, broken tying.

   Both must stay within ``FP32_TOLERANCE * max(1, max|reference logits|)`` (1e-4 for small logits; relative to the
   logit scale for real models, where fp32 summation-order noise grows with the logits). The difference between the
   reloaded output and the unmerged adapter model is reported as ``max_abs_diff``; for bf16/fp16 outputs it
   includes the unavoidable rounding of the weights to that dtype, which is a property of the chosen dtype, not an
   error of the merge, so it is printed but not gated (the two gated checks cover merge and save separately).
   A failed merge check stops before the weights are written (the build directory is removed); a failed reload
   check leaves the build directory with a ``MERGE_FAILED.txt`` marker. Neither ever becomes ``out``.
6. Rename the build directory to ``out`` (replacing an old ``out`` only with ``overwrite``).
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from ..checkpoint import FAILED_MARKER, MERGE_INFO, build_dir, checkpoint_dtype, publish, read_json_object, write_json
from ..config import ConfigError
from ..constants import TORCH_DTYPES
from ..data.tokenizer import load_tokenizer
from ..models import qwen1  # noqa: F401 - registers model_type "qwen" with the Auto classes
from ..train.trainer import first_line, is_disk_full
from ..verify import max_abs_diff, probe_batch, probe_logits
from .adapter import check_disk, dequantized_base, full_precision_base, read_adapter, resolve_base
from .lora_merge import attach_adapter, cast_parameters, untie_if_diverged
from .merge_files import (add_chat_template, check_output, copy_files, estimate_output_bytes, parse_size,
                          write_generation_config, _write_config)

log = logging.getLogger(__name__)

FP32_TOLERANCE = 1e-4

__all__ = ["FP32_TOLERANCE", "MergeResult", "MergeVerificationError", "dequantized_base", "merge_adapter",
           "parse_size"]


class MergeVerificationError(ConfigError):
    """The merged checkpoint does not reproduce the adapter model; the output was not published."""


@dataclass
class MergeResult:
    out_dir: Path
    max_abs_diff: float | None  # reloaded output vs unmerged base+adapter, fp32 logits; None without verification
    copied_files: list[str]  # files copied from the base/adapter directories (relative to out_dir)
    dtype: str = "fp32"
    base_dir: Path | None = None
    merge_diff: float | None = None  # in-memory merged (fp32) vs unmerged adapter model
    reload_diff: float | None = None  # reloaded from disk vs in-memory merged rounded to `dtype`
    tolerance: float | None = None
    notes: list[str] = field(default_factory=list)


def _load_base(base: Path) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.eval()
    return model


def _load_tokenizer(*dirs: Path) -> Any:
    for d in dirs:
        try:
            return load_tokenizer(d)
        except OSError as e:
            log.info("no tokenizer loads from %s (%s)", d, e)
    log.warning("no tokenizer in the output: probing with the bundled Qwen tokenizer")
    return load_tokenizer(None)


def _check_merge(merged: torch.nn.Module, batch: Any, reference: torch.Tensor, result: MergeResult) -> None:
    """Merged (fp32, in memory) vs base+adapter, before anything big is written."""
    result.merge_diff = max_abs_diff(probe_logits(merged, batch), reference)
    log.info("merge check: merged (fp32, in memory) vs base+adapter: max abs logit diff %.3g (tolerance %.3g)",
             result.merge_diff, result.tolerance)
    if not result.merge_diff <= result.tolerance:
        raise MergeVerificationError(
            f"merge verification failed: the merged model's logits differ from base+adapter by "
            f"{result.merge_diff:.3g} (tolerance {result.tolerance:.3g}); nothing was written to {result.out_dir}")


def _round_to(merged: torch.nn.Module, out_dtype: str, batch: Any) -> torch.Tensor | None:
    """Cast the merged weights to the output dtype; returns the logits those exact weights give in fp32 (the
    reference of the reload check), None without a probe batch."""
    expected = None
    if out_dtype == "fp32":
        return probe_logits(merged, batch) if batch is not None else None
    if batch is not None:
        cast_parameters(merged, TORCH_DTYPES[out_dtype])
        cast_parameters(merged, torch.float32)
        expected = probe_logits(merged, batch)
    cast_parameters(merged, TORCH_DTYPES[out_dtype])
    bad = [n for n, p in merged.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise ConfigError(f"merged weights overflow {out_dtype} (e.g. {bad[0]}): use --dtype bf16 or fp32")
    return expected


def _check_reload(tmp: Path, batch: Any, expected: torch.Tensor, reference: torch.Tensor,
                  result: MergeResult) -> None:
    """The written directory, reloaded from disk, vs the in-memory merged weights it should hold."""
    reloaded = _load_base(tmp)
    got = probe_logits(reloaded, batch)
    del reloaded
    result.reload_diff = max_abs_diff(got, expected)
    result.max_abs_diff = max_abs_diff(got, reference)
    log.info("reload check: %s reloaded in fp32 vs merged weights: max abs logit diff %.3g", result.out_dir,
             result.reload_diff)
    if not result.reload_diff <= result.tolerance:
        reason = (f"the written checkpoint, reloaded, gives logits {result.reload_diff:.3g} away from the "
                  f"merged weights (tolerance {result.tolerance:.3g})")
        (tmp / FAILED_MARKER).write_text(f"merge verification failed: {reason}\n", encoding="utf-8")
        raise MergeVerificationError(f"merge verification failed: {reason}; {result.out_dir} was not written, the "
                                     f"incomplete build is left in {tmp} for inspection (delete it)")
    rounding = "" if result.dtype == "fp32" else f", including {result.dtype} rounding of the weights"
    log.info("verified: merged %s vs base+adapter (fp32): max abs logit diff %.3g%s", result.out_dir,
             result.max_abs_diff, rounding)


def merge_adapter(adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, base_dir: str | os.PathLike | None = None,
                  dtype: str | None = None, max_shard_size: str | int = "2GB", overwrite: bool = False,
                  verify: bool = True) -> MergeResult:
    """Merge the adapter in ``adapter_dir`` into its base and write a standalone checkpoint to ``out_dir``."""
    if dtype is not None and dtype not in TORCH_DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(TORCH_DTYPES)}, got {dtype!r}")
    shard_bytes = parse_size(max_shard_size)
    out = Path(out_dir)
    notes: list[str] = []

    # 1-2. the adapter, its full-precision base, and refusals before any work
    adapter = read_adapter(adapter_dir)
    given = resolve_base(adapter, base_dir)
    # the default is the given checkpoint's dtype (fp16 for a GPTQ one), not that of its fp32 dequantized copy
    given_dtype = checkpoint_dtype(read_json_object(given / "config.json", str(given / "config.json")))
    base = full_precision_base(adapter, given, notes)
    out_dtype = dtype or given_dtype
    check_output(out, overwrite, [base, adapter.path])
    check_disk(out, estimate_output_bytes(base, out_dtype))
    log.info("merging adapter %s into base %s -> %s (%s)", adapter.path, base, out, out_dtype)

    # 3. base + adapter
    model = _load_base(base)
    vocab_size = model.get_input_embeddings().weight.shape[0]
    peft_model = attach_adapter(model, adapter, base)

    result = MergeResult(out, None, [], out_dtype, base, notes=notes)
    tmp = build_dir(out)
    published = False
    try:
        # 4. the tokenizer and extra files go in first: the probe is tokenized by the output's own tokenizer.
        result.copied_files = copy_files(base, adapter.path, tmp, [out, tmp])
        add_chat_template(base, adapter, tmp, notes)
        batch = reference = None
        if verify:
            batch = probe_batch(_load_tokenizer(tmp), vocab_size)
            reference = probe_logits(peft_model, batch)
            result.tolerance = FP32_TOLERANCE * max(1.0, float(reference.abs().max()))
        with torch.no_grad():
            merged = peft_model.merge_and_unload()
        del peft_model, model
        untied = untie_if_diverged(merged, notes)
        if verify:
            _check_merge(merged, batch, reference, result)
        expected = _round_to(merged, out_dtype, batch)

        merged.save_pretrained(tmp, max_shard_size=shard_bytes)
        del merged
        _write_config(base, tmp, out_dtype, untied)
        mode = (tmp / "config.json").stat().st_mode & 0o777  # shards are written 0600; give them the usual mode
        for f in tmp.glob("*.safetensors"):
            f.chmod(mode)
        gen = write_generation_config(base, adapter, tmp, notes)
        if gen:
            result.copied_files.append(gen)

        # 5. verify what was written
        if verify:
            _check_reload(tmp, batch, expected, reference, result)

        # 6. publish
        write_json(tmp / MERGE_INFO, {
            "adapter": str(adapter.path.resolve()), "base": str(base.resolve()), "dtype": out_dtype,
            "max_abs_diff": result.max_abs_diff, "merge_diff": result.merge_diff, "reload_diff": result.reload_diff,
            "tolerance": result.tolerance, "notes": notes})
        publish(tmp, out)
        published = True
    except Exception as e:
        if not is_disk_full(e):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConfigError(f"disk full while writing the merged model to {out} ({first_line(e)}): nothing was "
                          f"published, the partial build {tmp.name} was removed, the base and the adapter are "
                          "untouched; free space (or pick another --out) and run the merge again") from None
    finally:
        if not published and tmp.exists() and not (tmp / FAILED_MARKER).exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("merged model written to %s", out)
    return result
