"""Per-chunk pieces of the chunked LM-head loss (shared by the default and the ZeRO-3 paths).

``ce_grad_inplace`` turns one chunk of logits into its summed cross entropy and, in place, its gradient
``softmax - onehot``. Eager, that is five in-place passes (amax, subtract, exp, sum, divide), on CPU over blocks
of a few rows that stay in cache, 16-bit logits through a block-sized fp32 copy (on GPU the chunk is one block).
Compiled by inductor it becomes one fused reduction (max, sum of exp) and one fused pointwise loop that writes
the gradient over the logits: about the same speed on CPU now, fewer memory passes on GPU; liger-kernel does the
same but only on CUDA.

The compiled function is built once per process with ``dynamic=True`` (one graph for every row count and
vocabulary size; dtypes and devices get their own guard). Compiling costs ~15 s with inductor's disk cache
warm and a minute or more cold on 2 busy cores, so ``compile=None`` compiles for chunks big enough that the
saving repays it within a few steps, and otherwise once the eager path has spent about what a compile costs
(``COMPILE_AFTER_ELEMENTS`` logits through it, counted per ``LossWorkspace``, i.e. per trainer): a run of many
small steps (one short sample per step) pays at most about twice the better choice, a short test run never
compiles. ``QWEN_TUNE_COMPILE_LOSS=0`` (or a recipe's ``training.compile_loss: false``) turns it off and ``=1``
forces it. Any compile failure (no C++ compiler, an unsupported backend) warns once and keeps the eager path,
which computes the same numbers.

``LossWorkspace`` also keeps one logits buffer for the chunks on CPU: a fresh ``rows x 151,936`` tensor is
a new mmap that the head matmul must first page in (the kernel zero-fills every page), which costs ~30 % of
that matmul here; the CUDA caching allocator already reuses its blocks.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ce_grad_inplace", "chunk_ce_sum", "compile_enabled", "frozen_linear_weight", "LossWorkspace",
           "use_compiled", "COMPILE_AFTER_ELEMENTS", "COMPILE_MIN_ELEMENTS"]

# Chunks under this many logits stay eager when compile is on "auto". The eager path costs ~1.3 ns (fp32) to
# ~2 ns (bf16) per logit on one core here and the compiled one ~1 ns, so a warm compile (4-15 s) pays only over
# billions of logits: immediately only for chunks this big (~7,000 rows of 151,936: GPU-sized chunk settings),
# and the tiny models of a test run never pay for a compile at all.
COMPILE_MIN_ELEMENTS = 1 << 30
# ... or once the eager path has processed this many logits for the same workspace: the ~0.3-1 ns per logit that
# compiling saves, summed, then reaches about one warm compile (the ski-rental rule: rent until renting has cost
# the purchase). One short sample per step (~250 supervised rows) crosses it after ~450 steps.
COMPILE_AFTER_ELEMENTS = 1 << 34

# Rows per eager block on CPU: 2^21 logits = 8 MB of fp32 (13 rows of 151,936), cache-sized.
EAGER_BLOCK_ELEMENTS = 1 << 21

_COMPILED: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
_COMPILE_FAILED: str | None = None


class LossWorkspace:
    """What the chunked loss keeps between calls (one per trainer): a CPU logits buffer, and the logits that
    went through the eager element-wise path (for the ``compile=None`` decision)."""

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None
        self.eager_elements = 0

    def logits(self, rows: int, vocab: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialised ``[rows, vocab]`` tensor, a view of the kept buffer on CPU (grown when needed)."""
        if device.type != "cpu":
            return torch.empty((rows, vocab), dtype=dtype, device=device)
        need = rows * vocab
        if self.buffer is None or self.buffer.numel() < need or self.buffer.dtype != dtype:
            self.buffer = None  # free the old one before allocating its successor
            self.buffer = torch.empty(need, dtype=dtype)
        return self.buffer[:need].view(rows, vocab)


def frozen_linear_weight(lm_head: nn.Module, rows: torch.Tensor) -> torch.Tensor | None:
    """The weight of a head that can be applied as a bare matmul, else None.

    That is a frozen, bias-free ``nn.Linear`` with no hooks (global ones included: calling it as a module would
    run them), in the rows' dtype; any wrapper (peft, ZeRO-3) keeps the module call. Under autocast only when
    weight and rows are already in autocast's dtype (a bf16 base under bf16 autocast): autocast would cast
    nothing, so the bare matmul is the same computation.
    """
    hooks = (lm_head._forward_hooks or lm_head._forward_pre_hooks
             or getattr(nn.modules.module, "_global_forward_hooks", None)
             or getattr(nn.modules.module, "_global_forward_pre_hooks", None))
    if type(lm_head) is not nn.Linear or lm_head.bias is not None or hooks:
        return None
    w = lm_head.weight
    if w.requires_grad or w.dtype != rows.dtype or w.device != rows.device:
        return None
    device = rows.device.type
    if torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) != w.dtype:
        return None
    return w


def chunk_ce_sum(lm_head: nn.Module, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = lm_head(rows).float()
    return F.cross_entropy(logits, targets, reduction="sum")


def _ce_grad(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The fused form: written so inductor emits one reduction and one pointwise loop (no temporaries)."""
    lf = logits.float()
    m = lf.amax(1, keepdim=True)
    lse = (lf - m).exp().sum(1, keepdim=True).log() + m
    picked = lf.gather(1, targets[:, None])
    col = torch.arange(lf.shape[1], device=lf.device)[None, :]
    grad = (lf - lse).exp() - (col == targets[:, None]).to(lf.dtype)
    logits.copy_(grad.to(logits.dtype))  # an input mutation: inductor stores straight into the logits' buffer
    return (lse - picked).sum()


def _ce_grad_eager(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # In place, max first, a few rows at a time: amax, subtract, exp, sum, divide are one vectorized pass each
    # over a block that stays in cache (8 MB of fp32), and 16-bit logits need only that block's fp32 copy.
    # logsumexp / log_softmax over the chunk would allocate chunk-sized outputs, whose page faults on CPU cost
    # more than the arithmetic (~3x this path's time, bf16 or fp32).
    rows, vocab = logits.shape
    # On a GPU the whole chunk is one block: its caching allocator has no page faults to avoid, and a block of a
    # few rows would turn each pass into many kernel launches.
    step = max(1, EAGER_BLOCK_ELEMENTS // vocab) if logits.device.type == "cpu" else rows
    half = logits.dtype != torch.float32
    scratch = torch.empty(min(step, rows) * vocab, dtype=torch.float32, device=logits.device) if half else None
    loss = torch.zeros((), dtype=torch.float32, device=logits.device)
    for start in range(0, rows, step):
        block, t = logits[start : start + step], targets[start : start + step]
        lf = scratch[: block.numel()].view(block.shape).copy_(block) if half else block
        lf.sub_(lf.amax(1, keepdim=True))
        picked = lf.gather(1, t[:, None])  # x_t - max
        lf.exp_()
        total = lf.sum(1, keepdim=True)
        loss += (total.log() - picked).sum()  # logsumexp - x_t, the max cancelling
        lf.div_(total)
        lf[torch.arange(t.numel(), device=t.device), t] -= 1.0
        if half:
            block.copy_(lf)
    return loss


def compile_enabled(compile: bool | None) -> bool | None:
    """The effective setting: the env var ``QWEN_TUNE_COMPILE_LOSS`` (0/1) overrides ``compile``."""
    env = os.environ.get("QWEN_TUNE_COMPILE_LOSS", "").strip().lower()
    if env in ("0", "false", "no", "off"):
        return False
    if env in ("1", "true", "yes", "on"):
        return True
    return compile


def _compiled() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    global _COMPILED
    if _COMPILED is None and _COMPILE_FAILED is None:
        _COMPILED = torch.compile(_ce_grad, dynamic=True, fullgraph=True)
    return _COMPILED


def use_compiled(compile: bool | None, numel: int, workspace: LossWorkspace | None) -> bool:
    """Whether a chunk of ``numel`` logits goes through the compiled kernel (see the module docstring)."""
    mode = compile_enabled(compile)
    if mode is None:
        return numel >= COMPILE_MIN_ELEMENTS or (workspace is not None
                                                  and workspace.eager_elements >= COMPILE_AFTER_ELEMENTS)
    return mode


def ce_grad_inplace(logits: torch.Tensor, targets: torch.Tensor, compile: bool | None = None,
                    workspace: LossWorkspace | None = None) -> torch.Tensor:
    """Summed CE of ``logits`` [n, V] (no grad) against ``targets`` [n]; ``logits`` becomes its gradient.

    Nothing in a linear head's backward (nor LoRA's add) reads the head's output, so the caller may pass the
    detached logits and then use them as the ``grad_outputs`` of the head. The loss is fp32.
    """
    global _COMPILE_FAILED
    use = use_compiled(compile, logits.numel(), workspace)
    # Rows 0/1 would each get their own specialised graph (dynamo specialises sizes 0 and 1): not worth one.
    if use and logits.shape[0] >= 2 and _COMPILE_FAILED is None:
        fn = _compiled()
        if fn is not None:
            try:
                return fn(logits, targets)
            except Exception as e:  # noqa: BLE001 - any compiler failure: the eager path gives the same numbers
                _COMPILE_FAILED = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                warnings.warn(f"causal_lm_loss: torch.compile of the loss chunk failed ({_COMPILE_FAILED}); "
                              "using the eager path (set QWEN_TUNE_COMPILE_LOSS=0 to skip the attempt)",
                              stacklevel=2)
    if workspace is not None:
        workspace.eager_elements += logits.numel()
    return _ce_grad_eager(logits, targets)
