"""Memory-lean causal-LM loss.

Qwen's vocabulary is 151,936 tokens, so the full fp32 logits of one 8k-token
sequence are ~5 GB, and the usual ``lm_head -> .float() -> cross_entropy``
keeps them (plus their log-softmax) alive until backward.  This module computes
the same loss as transformers' ``ForCausalLMLoss`` without ever holding more
than ``chunk_size`` rows of logits:

1. labels are shifted HF-style (position t predicts ``labels[t + 1]``);
2. only the hidden rows whose shifted label is not ``IGNORE_INDEX`` are
   gathered (prompt / padding tokens never reach the LM head);
3. those rows go through the LM head in chunks, and each chunk's gradient is
   taken while its logits are alive (``softmax - onehot``, one backward through
   the head), so only ``[rows, hidden]`` input gradients (and the gradients of
   a trainable head) are kept for backward.  That is the idea of liger-kernel's
   fused linear cross-entropy in plain torch, so it also runs on CPU: two head
   matmuls per row and one softmax pass, where an activation checkpoint per
   chunk would need three matmuls and two softmax passes.

Two cases keep the older scheme, each chunk wrapped in an activation
checkpoint and recomputed during backward:

* DeepSpeed ZeRO-3 with a frozen head: its parameters are partitioned and
  gathered by hooks around each call, so gradients cannot be produced inside
  the forward (the checkpoint is reentrant so recomputation re-gathers them);
* fp16 logits (GPTQ Q-LoRA on GPU): a gradient taken in the forward would be
  cast to fp16 *before* the loss scale multiplies it, and most of the
  softmax probabilities of a 151,936-token vocabulary are below fp16's normal
  range; the recomputed backward applies the scale first, like the plain loss.

A *trainable* ZeRO-3 head (full fine-tuning, LoRA on lm_head) must get one
gradient per backward (DeepSpeed reduces it from a hook on its accumulation),
not one per chunk: ``loss_zero3.Zero3HeadCE`` gathers it once and accumulates the sum
(for a head tied to the input embedding, into the embedding's accumulation).

The LM head is always *called as a module* (``lm_head(x)``) so that wrappers
and hooks keep working: peft ``ModulesToSaveWrapper``, LoRA on ``lm_head``,
DeepSpeed ZeRO-3 parameter gathering.

An optional fused path uses liger-kernel's ``LigerFusedLinearCrossEntropyLoss``
(CUDA only) when the head is a plain, hook-free ``nn.Linear`` without bias.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..constants import DEFAULT_LOSS_CHUNK_SIZE, IGNORE_INDEX
from .loss_kernel import LossWorkspace, ce_grad_inplace, chunk_ce_sum, frozen_linear_weight
from .loss_zero3 import Zero3HeadCE

__all__ = ["IGNORE_INDEX", "causal_lm_loss", "estimate_logits_bytes", "select_loss_path"]


_FP32_BYTES = 4


def estimate_logits_bytes(num_tokens: int, vocab: int, chunk_size: int | None) -> int:
    """Bytes of fp32 logits alive at once for ``num_tokens`` supervised rows.

    Counts the logits and their gradient (hence ``* 2``).  ``chunk_size=None``
    means the plain path (all rows at once); otherwise the chunked path, whose
    peak is one chunk (recomputed during backward).
    """
    if num_tokens < 0 or vocab < 0:
        raise ValueError("num_tokens and vocab must be >= 0")
    if chunk_size is None:
        rows = num_tokens
    else:
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        rows = min(chunk_size, num_tokens)
    return int(rows) * int(vocab) * _FP32_BYTES * 2


# --------------------------------------------------------------------------- helpers


def _zero3_partitioned(module: nn.Module) -> bool:
    """True when the module's parameters are managed by DeepSpeed ZeRO-3."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


def _synced_num_chunks(n_chunks: int, zero3: bool, device: torch.device) -> int:
    """Under ZeRO-3 every ``lm_head`` call is a collective (parameter all-gather),
    so all ranks must call it the same number of times: take the max over ranks.
    Ranks with fewer rows then run empty chunks."""
    if not zero3 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return n_chunks
    if torch.distributed.get_world_size() <= 1:
        return n_chunks
    t = torch.tensor([n_chunks], dtype=torch.long, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


def _fp16_logits(hidden: torch.Tensor) -> bool:
    """Whether the head will produce fp16 logits (fp16 weights, or fp16 autocast)."""
    if hidden.dtype == torch.float16:
        return True
    dev = hidden.device.type
    return torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) == torch.float16


@functools.lru_cache(maxsize=1)
def _liger_installed() -> bool:
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        return False
    return True


def select_loss_path(*, device_type: str, fp16_logits: bool, zero3: bool, head_trainable: bool, plain_head: bool,
                     liger_installed: bool, use_liger: bool | None = None, recompute: bool | None = None,
                     grad_enabled: bool = True) -> tuple[str, str | None]:
    """Which loss implementation runs: ``("zero3_head" | "liger" | "recompute" | "grads_in_forward", reason)``.

    ``reason`` says why liger was not taken when it was asked for (``use_liger=True``), else None.
    ``plain_head``: the head is a bias-free, hook-free ``nn.Linear`` (liger calls its weight directly).
    The order matters: liger takes its gradients in the forward, so everything that rules that out
    (ZeRO-3, fp16 logits) is checked before it.
    """
    if recompute is False and zero3:
        raise ValueError("recompute=False is impossible with a ZeRO-3 partitioned lm_head")
    if zero3 and head_trainable and grad_enabled:
        path, why = "zero3_head", "ZeRO-3 partitioned lm_head"
    else:
        must_recompute = recompute if recompute is not None else (zero3 or fp16_logits)
        path = "recompute" if must_recompute or not grad_enabled else "grads_in_forward"
        why = None
        if use_liger is False or (use_liger is None and device_type != "cuda"):
            why = "not requested"
        elif not liger_installed:
            why = "liger_kernel is not installed"
        elif device_type != "cuda":
            why = "liger-kernel needs CUDA tensors"
        elif zero3:
            why = "ZeRO-3 partitioned lm_head"
        elif fp16_logits:
            # Its gradient is taken in the forward and cast to fp16 before the loss scale reaches it.
            why = "fp16 logits underflow in a gradient taken before the loss scale"
        elif not plain_head:
            why = "lm_head is not a plain bias-free nn.Linear without hooks"  # wrappers must be called as modules
        elif recompute:
            why = "recompute=True"
        else:
            path = "liger"
    return path, (why if use_liger and path != "liger" else None)


def _liger_ce_sum(lm_head: nn.Linear, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    weight = lm_head.weight
    fused = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")
    out = fused(weight, rows.to(weight.dtype), targets)
    if isinstance(out, tuple):  # some versions return (loss, z_loss)
        out = out[0]
    return out.float()


class _HeadCEWithGrads(torch.autograd.Function):
    """Summed cross entropy of ``lm_head(rows)`` vs ``targets``, chunk by chunk, gradients taken in forward.

    ``params`` are the head's trainable parameters: passing them as inputs lets autograd deliver
    their gradients (accumulation, DDP/ZeRO-2 hooks) like any other leaf's.
    """

    @staticmethod
    def forward(ctx: Any, rows: torch.Tensor, targets: torch.Tensor, chunk_size: int, lm_head: nn.Module,
                compile: bool | None, workspace: LossWorkspace, *params: torch.Tensor) -> torch.Tensor:
        need_rows = ctx.needs_input_grad[0]
        wants = [ctx.needs_input_grad[6 + i] for i in range(len(params))]
        grad_rows = torch.empty_like(rows) if need_rows else None
        grad_params: list[torch.Tensor | None] = [None] * len(params)
        total = torch.zeros((), dtype=torch.float32, device=rows.device)
        # A frozen plain head (LoRA on a chat model) is two bare matmuls per chunk: the logits go into the
        # workspace's buffer and the input gradient straight into grad_rows, without an autograd graph.
        weight = frozen_linear_weight(lm_head, rows) if need_rows else None
        for start in range(0, rows.shape[0], chunk_size):
            t = targets[start : start + chunk_size]
            if weight is not None:
                r = rows[start : start + chunk_size].detach()
                g = torch.mm(r, weight.t(), out=workspace.logits(r.shape[0], weight.shape[0], r.dtype, r.device))
                total += ce_grad_inplace(g, t, compile, workspace)
                torch.mm(g, weight, out=grad_rows[start : start + chunk_size])
                continue
            r = rows[start : start + chunk_size].detach().requires_grad_(need_rows)
            with torch.enable_grad():
                logits = lm_head(r)
            wrt = ([r] if need_rows else []) + [p for p, w in zip(params, wants) if w]
            if wrt and logits.requires_grad:
                # d(sum CE)/d(logits) = softmax - onehot, written over the logits (nothing in a linear head's
                # backward reads its output, so overwriting it is safe).
                g = logits.detach()
                total += ce_grad_inplace(g, t, compile, workspace)
                grads = list(torch.autograd.grad(logits, wrt, grad_outputs=g, allow_unused=True))
                if need_rows:
                    grad_rows[start : start + chunk_size] = grads.pop(0)
                for i in (i for i, w in enumerate(wants) if w):
                    gp = grads.pop(0)
                    if gp is not None:
                        grad_params[i] = gp if grad_params[i] is None else grad_params[i].add_(gp)
                del g
            else:
                lf = logits.detach().float()
                total += (torch.logsumexp(lf, dim=-1) - lf.gather(1, t[:, None]).squeeze(1)).sum()
                del lf
            del logits
        ctx.save_for_backward(grad_rows, *grad_params)
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_rows, *grad_params = ctx.saved_tensors
        scale = (lambda g: None if g is None else g * grad_out.to(g.dtype))
        return (scale(grad_rows), None, None, None, None, None, *map(scale, grad_params))


def _recomputed_ce_sum(lm_head: nn.Module, rows: torch.Tensor, targets: torch.Tensor, chunk_size: int,
                       n_chunks: int, zero3: bool) -> torch.Tensor:
    """Sum of per-chunk CE, each chunk checkpointed (recomputed in backward): ZeRO-3, fp16 logits, no-grad eval."""
    loss_sum = None
    grad = torch.is_grad_enabled()
    for i in range(n_chunks):
        r = rows[i * chunk_size : (i + 1) * chunk_size]
        t = targets[i * chunk_size : (i + 1) * chunk_size]
        if grad and zero3 and not r.requires_grad:
            part = chunk_ce_sum(lm_head, r, t)  # a reentrant checkpoint needs an input that requires grad
        elif grad:
            # ZeRO-3 releases lm_head's gathered weight after each call, so a non-reentrant checkpoint would
            # see an empty tensor at recompute; reentrant recomputation re-runs DeepSpeed's gather hooks.
            part = checkpoint(chunk_ce_sum, lm_head, r, t, use_reentrant=zero3)
        else:
            part = chunk_ce_sum(lm_head, r, t)
        loss_sum = part if loss_sum is None else loss_sum + part
    return loss_sum


# --------------------------------------------------------------------------- main entry


def supervised_rows(hidden_states: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(flat hidden states, hidden rows whose shifted label is kept, those labels).

    Shifts like transformers, but pads one ignore at the end instead of slicing the hidden
    states, so they flatten as a view (no [B, T-1, H] copy).
    """
    labels = labels.to(hidden_states.device)
    shift_labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)
    hidden_flat = hidden_states.reshape(-1, hidden_states.shape[-1])
    idx = (shift_labels != IGNORE_INDEX).nonzero().squeeze(1)
    return hidden_flat, hidden_flat.index_select(0, idx), shift_labels.index_select(0, idx)


def causal_lm_loss(
    hidden_states: torch.Tensor,
    lm_head: nn.Module,
    labels: torch.Tensor,
    *,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int = DEFAULT_LOSS_CHUNK_SIZE,
    use_liger: bool | None = None,
    recompute: bool | None = None,
    compile: bool | None = None,
    workspace: LossWorkspace | None = None,
) -> torch.Tensor:
    """Causal-LM cross entropy from decoder hidden states, without full logits.

    Args:
        hidden_states: ``[B, T, H]`` last decoder hidden states.
        lm_head: module mapping ``[N, H] -> [N, V]``; called as ``lm_head(x)``.
        labels: ``[B, T]`` unshifted labels (HF convention), ``IGNORE_INDEX``
            marks positions without a target.  ``hidden[:, t]`` predicts
            ``labels[:, t + 1]``.
        num_items_in_batch: if given, the summed loss is divided by it (the
            Trainer passes the supervised-token count of the whole
            gradient-accumulation window); otherwise mean over valid tokens.
        chunk_size: rows of logits materialized at once.
        use_liger: ``True`` to request liger's fused linear+CE (falls back to
            the chunked path when not applicable), ``False`` to never use it,
            ``None`` to use it automatically on CUDA when installed.
        recompute: ``True`` forces checkpointed chunks (recomputed in backward),
            ``False`` gradients taken in forward; ``None`` picks recompute only
            for a ZeRO-3 partitioned head (which requires it) and fp16 logits.
        compile: the gradients-in-forward path's per-chunk softmax/gradient
            through ``torch.compile`` (fused loops): ``True``, ``False``, or
            ``None`` for chunks big enough to repay the compile; the env var
            ``QWEN_TUNE_COMPILE_LOSS=0/1`` overrides it (see loss_kernel.py).
        workspace: a ``LossWorkspace`` kept across calls (the trainer's): its CPU
            logits buffer is reused, and it counts eager work for ``compile=None``.

    Returns:
        fp32 scalar loss, equal (up to float rounding) to
        ``ForCausalLMLoss(lm_head(hidden_states), labels, V, num_items_in_batch)``.
        With no supervised token it is a graph-connected zero.
    """
    if hidden_states.dim() != 3:
        raise ValueError(f"hidden_states must be [B, T, H], got {tuple(hidden_states.shape)}")
    if labels.shape != hidden_states.shape[:2]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match hidden_states {tuple(hidden_states.shape[:2])}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")

    hidden_flat, rows, targets = supervised_rows(hidden_states, labels)
    n_valid = rows.shape[0]
    zero3 = _zero3_partitioned(lm_head)
    head_params = [p for p in lm_head.parameters() if p.requires_grad]
    plain_head = (type(lm_head) is nn.Linear and lm_head.bias is None
                  and not (lm_head._forward_hooks or lm_head._forward_pre_hooks))
    path, why_not_liger = select_loss_path(
        device_type=hidden_states.device.type, fp16_logits=_fp16_logits(hidden_states), zero3=zero3,
        head_trainable=bool(head_params), plain_head=plain_head,
        liger_installed=use_liger is not False and _liger_installed(), use_liger=use_liger, recompute=recompute,
        grad_enabled=torch.is_grad_enabled())
    if why_not_liger:  # explicitly requested: say why not (the warnings registry dedups repeats)
        warnings.warn(f"causal_lm_loss: fused liger path unavailable ({why_not_liger}); using chunked path",
                      stacklevel=2)

    if path == "zero3_head":
        # Every rank takes this path, with or without rows: its gathers are collectives.
        anchor = torch.zeros((), device=rows.device, requires_grad=True)
        loss_sum = Zero3HeadCE.apply(rows, targets, chunk_size, lm_head, head_params, anchor)
        if n_valid == 0:
            return (hidden_states.sum() * 0).float() + loss_sum * 0
    elif n_valid > 0 and path == "liger":
        loss_sum = _liger_ce_sum(lm_head, rows, targets)
    else:
        # ZeRO-3 ranks must all call the head equally often; ranks without rows then run empty chunks.
        n_chunks = _synced_num_chunks(math.ceil(n_valid / chunk_size), zero3, hidden_states.device)
        if n_chunks == 0:
            # Nothing to supervise. Still run the head on zero rows so every parameter
            # that requires grad (decoder *and* LM head / its adapters) gets a (zero)
            # gradient: DDP / DeepSpeed would otherwise wait for missing reductions.
            empty = lm_head(hidden_flat[:0]).float().sum()
            return (hidden_states.sum() * 0).float() + empty * 0
        if path != "grads_in_forward":
            loss_sum = _recomputed_ce_sum(lm_head, rows, targets, chunk_size, n_chunks, zero3)
        else:
            loss_sum = _HeadCEWithGrads.apply(rows, targets, chunk_size, lm_head, compile,
                                             workspace or LossWorkspace(), *head_params)
        if n_valid == 0:  # only possible with synced (ZeRO-3) empty chunks
            return (hidden_states.sum() * 0).float() + loss_sum * 0

    if num_items_in_batch is None:
        return loss_sum / n_valid
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss_sum.device)
    return loss_sum / num_items_in_batch
