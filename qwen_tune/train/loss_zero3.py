"""The LM-head loss for a *trainable* DeepSpeed ZeRO-3 partitioned head (full fine-tuning, LoRA on lm_head).

DeepSpeed reduces a stage-3 parameter's gradient from a hook on its accumulation and expects one accumulation
per backward, so the head is gathered once for all chunks and each parameter gets the sum of its chunk
gradients (for a head tied to the input embedding, added into the embedding's accumulation).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Iterator

import torch
import torch.nn as nn

from .loss_kernel import chunk_ce_sum

__all__ = ["Zero3HeadCE"]


@contextlib.contextmanager
def _gathered_hook_free(lm_head: nn.Module) -> Iterator[None]:
    """The ZeRO-3 head's full weights, for several calls, with DeepSpeed's module hooks set aside.

    Those hooks gather before and release after *each* call (and arm backward hooks on its output), so the
    weights would be gone by the time a gradient is taken from a call's output; GatheredParameters holds them
    for the whole block instead. One all-gather per block: every rank enters it the same number of times.
    """
    import deepspeed  # the head is ZeRO-3 partitioned, so deepspeed is installed

    modules = list(lm_head.modules())
    names = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
    saved = [{n: getattr(m, n) for n in names} for m in modules]
    with deepspeed.zero.GatheredParameters(list(lm_head.parameters()), modifier_rank=None):
        try:
            for m in modules:
                for n in names:
                    setattr(m, n, type(getattr(m, n))())
            yield
        finally:
            for m, hooks in zip(modules, saved):
                for n, h in hooks.items():
                    setattr(m, n, h)


# One-shot gradient hooks of tied head weights; a hook cannot remove itself while it runs, so fired ones are
# removed at the next backward.
_TIED_HOOKS: list[tuple[Any, list[bool]]] = []


def _accumulates_later(p: torch.Tensor) -> bool:
    """Whether the running backward will still accumulate a gradient into ``p`` (a head tied to the embedding)."""
    will_run = getattr(torch._C, "_will_engine_execute_node", None)
    if will_run is None or torch._C._current_graph_task_id() == -1:
        return False
    return bool(will_run(p.view_as(p).grad_fn.next_functions[0][0]))  # p's AccumulateGrad node


def _add_once(extra: torch.Tensor, fired: list[bool], grad: torch.Tensor) -> torch.Tensor:
    if fired:
        return grad
    fired.append(True)
    return grad + extra.to(grad.dtype)


class Zero3HeadCE(torch.autograd.Function):
    """Summed chunked cross entropy for a *trainable* ZeRO-3 partitioned head: one head gradient per backward.

    DeepSpeed stage 3 reduces a parameter's gradient from a hook on its gradient accumulation and expects one
    accumulation per backward; checkpointed chunks give the head one per chunk (and crash it). Here the forward
    runs all chunks without grad; the backward gathers the head once, recomputes the chunks (the loss scale
    applied before any cast to the head's dtype, so fp16 is safe), sums the head's gradients over them and
    accumulates each parameter's total once, while it is still gathered (a partitioned parameter cannot take a
    full-size gradient). The parameters are therefore *not* inputs of this node (the outer backward would run
    their accumulation, and DeepSpeed's hook, a second time); ``anchor``, a throwaway leaf, keeps the node in the
    graph even when the rows need no gradient.
    """

    @staticmethod
    def forward(ctx: Any, rows: torch.Tensor, targets: torch.Tensor, chunk_size: int, lm_head: nn.Module,
                params: list[torch.Tensor], anchor: torch.Tensor) -> torch.Tensor:
        ctx.lm_head, ctx.chunk_size, ctx.params = lm_head, chunk_size, params
        ctx.save_for_backward(rows, targets)
        total = torch.zeros((), dtype=torch.float32, device=rows.device)
        with _gathered_hook_free(lm_head), torch.no_grad():
            for start in range(0, rows.shape[0], chunk_size):
                total += chunk_ce_sum(lm_head, rows[start : start + chunk_size], targets[start : start + chunk_size])
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        rows, targets = ctx.saved_tensors
        lm_head, chunk_size, params = ctx.lm_head, ctx.chunk_size, ctx.params
        for handle, fired in [h for h in _TIED_HOOKS if h[1]]:
            handle.remove()
            _TIED_HOOKS.remove((handle, fired))
        need_rows = ctx.needs_input_grad[0]
        grad_rows = torch.zeros_like(rows) if need_rows else None
        with _gathered_hook_free(lm_head), torch.enable_grad():
            # Zero-filled, not None: every rank must hand DeepSpeed a gradient for every parameter (a collective).
            grad_params = [torch.zeros_like(p) for p in params]
            for start in range(0, rows.shape[0], chunk_size):
                r = rows[start : start + chunk_size].detach().requires_grad_(need_rows)
                t = targets[start : start + chunk_size]
                logits = lm_head(r)
                g = torch.softmax(logits.detach().float(), dim=-1)
                g[torch.arange(t.numel(), device=t.device), t] -= 1.0
                g *= grad_out
                wrt = ([r] if need_rows else []) + list(params)
                grads = list(torch.autograd.grad(logits, wrt, grad_outputs=g.to(logits.dtype), allow_unused=True))
                if need_rows:
                    grad_rows[start : start + chunk_size] = grads.pop(0)
                for acc, gp in zip(grad_params, grads):
                    if gp is not None:
                        acc += gp
                del logits, g
            own, own_grads = [], []
            for p, gp in zip(params, grad_params):
                if _accumulates_later(p):
                    # Tied to the input embedding, whose backward accumulates into it later in this backward:
                    # add the head's share there, so the parameter still accumulates (and is reduced) once.
                    fired: list[bool] = []
                    _TIED_HOOKS.append((p.register_hook(functools.partial(_add_once, gp, fired)), fired))
                else:
                    own.append(p)
                    own_grads.append(gp)
            # A nested backward through a view reaches each parameter's own accumulation node (and DeepSpeed's
            # hook on it) exactly once, while the parameter is gathered.
            if own:
                torch.autograd.backward([p.view_as(p) for p in own], own_grads)
        return grad_rows, None, None, None, None, None
