"""`qwen-tune quantize`, the whole step: a full-precision checkpoint -> a GPTQ checkpoint in the published Int4
layout (calibration, block-by-block quantization, saving, and a reload check against the full-precision logits)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoModelForCausalLM

from ..checkpoint import read_quantization_config
from ..data.tokenizer import load_tokenizer
from ..models import qwen1  # noqa: F401 - registers model_type "qwen" with the Auto classes
from ..quant.calibration import read_calibration
from ..quant.checkpoint import load_gptq_model, save_gptq_checkpoint
from ..quant.format import FORMATS, SUPPORTED_BITS, GPTQError, GPTQSpec
from ..quant.gptq import quantizable_linears, quantize_model
from ..verify import compare_logits, max_abs_diff, probe_batch, probe_logits

log = logging.getLogger(__name__)


@dataclass
class QuantizeResult:
    out_dir: Path
    format: str
    algorithm: str
    samples: int
    tokens: int
    layers: int
    cosine: float | None = None  # logits of the written checkpoint (reloaded) vs the full-precision model
    max_abs_diff: float | None = None
    reload_diff: float | None = None  # reloaded checkpoint vs the in-memory quantized model


def quantize_checkpoint(model_dir: str | os.PathLike, out_dir: str | os.PathLike, *, bits: int = 4,
                        group_size: int = 128, sym: bool = True, fmt: str = "v1", calib: str | os.PathLike | None,
                        algorithm: str = "gptq", n_samples: int = 128, seq_len: int = 512,
                        damp_percent: float = 0.01, dtype: str = "fp16", device: str | None = None,
                        overwrite: bool = False, verify: bool = True,
                        progress: Callable[[str], None] | None = None) -> QuantizeResult:
    """Quantize a full-precision checkpoint to a GPTQ checkpoint in the published Int4 layout."""
    model_dir, out = Path(model_dir), Path(out_dir)
    say = progress or (lambda msg: log.info(msg))
    if fmt not in FORMATS:
        raise GPTQError(f"--format must be v1 or v2, got {fmt!r}")
    if bits not in SUPPORTED_BITS:
        raise GPTQError(f"--bits {bits} is not supported (choose from {SUPPORTED_BITS}; Qwen's Int4 models use 4)")
    if group_size != -1 and (group_size <= 0 or group_size % (32 // bits)):
        raise GPTQError(f"--group-size must be -1 or a positive multiple of {32 // bits}, got {group_size}")
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: not a checkpoint directory (no config.json)")
    if read_quantization_config(model_dir) is not None:
        raise GPTQError(f"{model_dir} is already quantized: quantize the full-precision checkpoint")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise GPTQError(f"output directory {out} is not empty: pass --overwrite to replace it")
    if out.resolve() == model_dir.resolve():
        raise GPTQError("--out must differ from --model")
    if algorithm == "gptq" and calib is None:
        raise GPTQError("GPTQ needs calibration text: pass --calib FILE (or --algorithm rtn for round-to-nearest)")
    spec = GPTQSpec(bits=bits, group_size=group_size, sym=sym, format=FORMATS[fmt])
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")

    tokenizer = load_tokenizer(model_dir)
    samples = read_calibration(calib, tokenizer, n_samples, seq_len) if calib is not None else []
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    linears = quantizable_linears(model, bits)
    if not linears:
        raise GPTQError(f"{model_dir}: no linear layer of the decoder blocks can be quantized to {bits} bits")
    probe = reference = None
    if verify:
        probe = probe_batch(tokenizer, model.get_input_embeddings().weight.shape[0])
        reference = probe_logits(model, probe)
    say(f"quantizing {len(linears)} linear layers of {model_dir} to {bits}-bit GPTQ ({fmt}, group {group_size}, "
        f"{'sym' if sym else 'asym'}) with {algorithm.upper()}"
        + (f" on {len(samples)} calibration samples ({sum(s.numel() for s in samples)} tokens)" if samples else ""))
    samples = [s.to(device) for s in samples]
    packed, _reports = quantize_model(model, samples, spec, algorithm, damp_percent, progress=say)
    packed = {n: {k: v.cpu() for k, v in t.items()} for n, t in packed.items()}
    in_memory = probe_logits(model, probe) if verify else None
    model = model.cpu()
    save_gptq_checkpoint(model, packed, model_dir, out, spec, algorithm, damp_percent, dtype)
    del model
    result = QuantizeResult(out, spec.format, algorithm, len(samples), sum(int(s.numel()) for s in samples),
                            len(packed))
    if verify:
        reloaded = load_gptq_model(out, torch.float32)
        got = probe_logits(reloaded, probe)
        result.cosine, result.max_abs_diff = compare_logits(got, reference)
        result.reload_diff = max_abs_diff(got, in_memory)
        say(f"verified {out}: logits vs the full-precision model: cosine {result.cosine:.5f}, max abs diff "
            f"{result.max_abs_diff:.4g}; vs the in-memory quantized model: max abs diff {result.reload_diff:.3g}")
    return result
