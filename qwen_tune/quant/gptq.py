"""Quantizing weights: round-to-nearest and GPTQ (Frantar et al., 2022) for one matrix, and a whole model's decoder
blocks one block at a time on calibration samples. Writes nothing: :mod:`qwen_tune.quant.checkpoint` saves."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .format import GPTQError, GPTQSpec, dequantize, pack_layer

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# Quantizing one weight matrix


def _group_params(w: torch.Tensor, spec: GPTQSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (rounded to fp16, as stored) and integer zero point per row of ``w`` [out, group].

    auto-gptq's min/max rule, except that a symmetric row always spans [-max|w|, max|w|] (auto-gptq leaves an
    all-positive row at [0, max], which then clips at about half its range around the fixed zero point)."""
    zero_t = torch.zeros(w.shape[0], device=w.device, dtype=w.dtype)
    xmin = torch.minimum(w.min(dim=1).values, zero_t)
    xmax = torch.maximum(w.max(dim=1).values, zero_t)
    if spec.sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
    xmax = torch.where(empty, torch.ones_like(xmax), xmax)
    scale = ((xmax - xmin) / spec.maxq).to(torch.float16).to(w.dtype)
    scale = torch.where(scale == 0, torch.full_like(scale, 2.0**-24), scale)  # fp16 underflow of tiny groups
    if spec.sym:
        zero = torch.full_like(scale, (spec.maxq + 1) // 2)
    else:
        zero = torch.round(-xmin / scale).clamp(0, spec.maxq)
    return scale, zero


def _quant(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def rtn_quantize(weight: torch.Tensor, spec: GPTQSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest per group: (int weights [out, in], scales [G, out], zeros [G, out])."""
    W = weight.detach().float()
    out_features, in_features = W.shape
    gs = in_features if spec.group_size in (-1, 0) else spec.group_size
    qs, scales, zeros = [], [], []
    for g0 in range(0, in_features, gs):
        block = W[:, g0:g0 + gs]
        s, z = _group_params(block, spec)
        qs.append(_quant(block, s.unsqueeze(1), z.unsqueeze(1), spec.maxq))
        scales.append(s)
        zeros.append(z)
    return torch.cat(qs, 1).to(torch.int32), torch.stack(scales), torch.stack(zeros).to(torch.int32)


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, spec: GPTQSpec, damp_percent: float = 0.01,
                  blocksize: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """GPTQ (Frantar et al., 2022) for one layer: quantize columns left to right, spreading each column's rounding
    error over the columns not yet quantized through the inverse Hessian of the layer's inputs (Cholesky form,
    lazy block updates). Groups of ``group_size`` input columns share a scale/zero computed when the group starts,
    from the error-updated weights (static_groups false, no act-order).

    Returns (int weights [out, in], scales [G, out], zeros [G, out], the Hessian-weighted error).
    """
    W = weight.detach().float().clone()
    H = hessian.detach().float().clone()
    out_features, cols = W.shape
    gs = cols if spec.group_size in (-1, 0) else spec.group_size
    blocksize = max(blocksize, gs)  # a group never straddles two lazy-update blocks: its parameters see every update
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = damp_percent * torch.mean(torch.diag(H))
    eye = torch.arange(cols, device=W.device)
    Hinv = None
    for attempt in range(6):  # a calibration set too small for the layer can leave H singular: damp harder
        try:
            Hd = H.clone()
            Hd[eye, eye] += damp * (10**attempt)
            L = torch.linalg.cholesky(Hd)
            Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
            break
        except torch.linalg.LinAlgError:
            continue
    if Hinv is None:
        raise GPTQError("the layer's input Hessian is not positive definite even with heavy damping")

    Q = torch.zeros_like(W)
    scales: list[torch.Tensor] = []
    zeros: list[torch.Tensor] = []
    losses = torch.zeros(out_features, device=W.device)
    scale = zero = None
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % gs == 0:
                # Parameters of the group from its current (error-compensated) weights.
                upcoming = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :gs]
                scale, zero = _group_params(upcoming, spec)
                scales.append(scale)
                zeros.append(zero)
            w = W1[:, i]
            d = Hinv1[i, i]
            q = _quant(w, scale, zero, spec.maxq)
            Q1[:, i] = q
            err = (w - scale * (q - zero)) / d
            losses += (w - scale * (q - zero)) ** 2 / d**2 / 2
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return (Q.to(torch.int32), torch.stack(scales), torch.stack(zeros).to(torch.int32), float(losses.sum()))


# ----------------------------------------------------------------------------------------------------------------
# Model-level: which linears, loading a checkpoint through the PyTorch path


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The repeated decoder blocks (Qwen-1 ``transformer.h``, Qwen2+ ``model.layers``)."""
    for name in ("transformer.h", "model.layers", "model.language_model.layers"):
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(mod, nn.ModuleList):
            return name, mod
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and (n is None or len(mod) == n):
            return name, mod
    raise GPTQError(f"cannot find the decoder blocks of {type(model).__name__}")


_ROUTERS = ("mlp.gate", "shared_expert_gate")  # MoE routers stay full precision, as gptqmodel/auto-gptq leave them


def quantizable_linears(model: nn.Module, bits: int = 4) -> dict[str, nn.Linear]:
    """Every nn.Linear inside the decoder blocks (embeddings and lm_head stay full precision, as published), except
    MoE routers and layers whose sizes do not pack into int32 words (kept full precision, with a warning)."""
    prefix, blocks = decoder_blocks(model)
    per = 32 // bits
    out = {}
    for n, m in blocks.named_modules():
        if not isinstance(m, nn.Linear) or n.endswith(_ROUTERS):
            continue
        if m.in_features % per or m.out_features % per:
            log.warning("%s.%s (%dx%d) does not pack into %d-bit words: kept full precision", prefix, n,
                        m.in_features, m.out_features, bits)
            continue
        out[f"{prefix}.{n}"] = m
    return out



# ----------------------------------------------------------------------------------------------------------------
# Quantizing a model: calibration through the blocks, one block at a time


class _Stop(Exception):
    pass


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    error: float  # ||(W - Q) X||^2-style proxy (GPTQ) or plain squared weight error (RTN)


def _capture_block_inputs(model: nn.Module, block: nn.Module,
                          samples: list[torch.Tensor]) -> list[tuple[tuple, dict]]:
    captured: list[tuple[tuple, dict]] = []

    def hook(_mod, args, kwargs):
        captured.append((args, kwargs))
        raise _Stop

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids in samples:
            try:
                model(input_ids=ids, use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def _run_block(block: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    out = block(*args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


@torch.no_grad()
def quantize_model(model: nn.Module, samples: list[torch.Tensor], spec: GPTQSpec, algorithm: str = "gptq",
                   damp_percent: float = 0.01, progress: Callable[[str], None] | None = None
                   ) -> tuple[dict[str, dict[str, torch.Tensor]], list[LayerReport]]:
    """Quantize every linear of the decoder blocks; returns {module name: packed tensors} and per-layer errors.

    GPTQ runs block by block: the inputs of block ``b`` come from blocks ``0..b-1`` already quantized (so later
    blocks compensate for earlier rounding), and every linear of the block gets the Hessian ``2 X X^T / n`` of its
    own inputs over all calibration tokens. Linears inside one block are quantized together from the block's
    inputs (true_sequential false). RTN needs no samples. The model's weights are replaced by their quantized
    values as it goes (it ends up computing what the checkpoint computes).
    """
    if algorithm not in ("gptq", "rtn"):
        raise GPTQError(f"unknown quantization algorithm {algorithm!r} (gptq or rtn)")
    model.eval()
    prefix, blocks = decoder_blocks(model)
    packed: dict[str, dict[str, torch.Tensor]] = {}
    reports: list[LayerReport] = []
    say = progress or (lambda msg: log.info(msg))

    def finish(name: str, lin: nn.Linear, qint, scales, zeros, err) -> None:
        packed[name] = pack_layer(qint, scales, zeros, spec, lin.bias)
        p = packed[name]
        w = dequantize(p["qweight"], p["qzeros"], p["scales"], p["g_idx"], spec, torch.float32).t()
        lin.weight.data.copy_(w.to(lin.weight.dtype))
        if lin.bias is not None:
            lin.bias.data.copy_(p["bias"].to(lin.bias.dtype))
        reports.append(LayerReport(name, tuple(lin.weight.shape), err))

    if algorithm == "rtn":
        for name, lin in quantizable_linears(model, spec.bits).items():
            before = lin.weight.detach().float().clone()
            qint, scales, zeros = rtn_quantize(lin.weight, spec)
            finish(name, lin, qint, scales, zeros, 0.0)
            reports[-1].error = float(((lin.weight.float() - before) ** 2).sum())
        return packed, reports

    if not samples:
        raise GPTQError("GPTQ needs calibration samples (--calib FILE), or use --algorithm rtn")
    inputs = _capture_block_inputs(model, blocks[0], samples)
    wanted = quantizable_linears(model, spec.bits)
    for b, block in enumerate(blocks):
        linears = {n: m for n, m in block.named_modules() if f"{prefix}.{b}.{n}" in wanted}
        hess = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float32, device=m.weight.device)
                for n, m in linears.items()}
        counts = dict.fromkeys(linears, 0)

        def make_hook(n: str):
            def hook(_mod, args, _out):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                hess[n].addmm_(x.t(), x)
                counts[n] += x.shape[0]
            return hook

        handles = [m.register_forward_hook(make_hook(n)) for n, m in linears.items()]
        try:
            for args, kwargs in inputs:
                _run_block(block, args, kwargs)
        finally:
            for h in handles:
                h.remove()
        for n, lin in linears.items():
            name = f"{prefix}.{b}.{n}"
            if counts[n] == 0:  # e.g. an MoE expert no calibration token reached
                log.warning("%s saw no calibration tokens: round-to-nearest", name)
                qint, scales, zeros = rtn_quantize(lin.weight, spec)
                finish(name, lin, qint, scales, zeros, float("nan"))
                continue
            H = hess[n] * (2.0 / counts[n])
            qint, scales, zeros, err = gptq_quantize(lin.weight, H, spec, damp_percent)
            finish(name, lin, qint, scales, zeros, err)
        say(f"quantized block {b + 1}/{len(blocks)} ({len(linears)} linear layers)")
        inputs = [_with_hidden(args, kwargs, _run_block(block, args, kwargs)) for args, kwargs in inputs]
        del hess
    return packed, reports

