"""Per-token log-probabilities of label tokens, chunk-wise over the LM head, with autograd.

Preference losses need ``log p(label_t)`` for every completion token of chosen and rejected replies: with Qwen's
151,936-token vocabulary the plain ``log_softmax(lm_head(h).float())`` holds ``tokens x 151,936`` fp32 logits (and
their log-softmax) until backward. Here only rows whose label is not ``IGNORE_INDEX`` reach the head, ``chunk_size``
rows at a time, and what backward needs is kept instead of the logits:

* frozen head (LoRA, Q-LoRA): the Jacobian ``d logp_t / d h_t = W[y_t] - softmax_t @ W`` is taken in the forward,
  while the chunk's logits are alive, so backward is one multiply by the upstream gradient ([rows, hidden] kept,
  no recomputation);
* trainable head (full fine-tuning): the upstream gradient is not known in the forward (a DPO loss couples the
  tokens of a sequence), so backward recomputes each chunk's logits and forms both gradients from them.

TRL's own fused head (``trl.trainer.utils.add_fused_lm_head``) does the same job with Triton on GPUs, but it scores
every position (prompt and padding too) through a slow torch fallback elsewhere, and always recomputes in
backward; this is plain torch on any device, compact everywhere. The per-token entropy, mean logit and top-1 flag
that TRL's metrics read come out of the same pass, without gradient.

ZeRO-3: the head is read directly (not called as a module), so its partitioned weight is gathered around each
pass with TRL's ``maybe_gather_lm_head_ctx``, the same rule TRL's head follows.
"""

from __future__ import annotations

from typing import Any

import torch
from trl.trainer.utils import maybe_gather_lm_head_ctx

IGNORE_INDEX = -100


class _TokenLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int,
                with_stats: bool) -> tuple[torch.Tensor, ...]:
        ctx.set_materialize_grads(False)
        n, dim = hidden.shape
        f32 = dict(device=hidden.device, dtype=torch.float32)
        logps = torch.empty(n, **f32)
        entropy = torch.empty(n, **f32) if with_stats else None
        mean_logits = torch.empty(n, **f32) if with_stats else None
        top1 = torch.empty(n, device=hidden.device, dtype=torch.bool) if with_stats else None
        need_weight_grad = ctx.needs_input_grad[1]
        jac = torch.empty(n, dim, **f32) if ctx.needs_input_grad[0] and not need_weight_grad else None
        with maybe_gather_lm_head_ctx(weight):
            for s in range(0, n, chunk_size):
                e = min(s + chunk_size, n)
                t = targets[s:e]
                z = (hidden[s:e].to(weight.dtype) @ weight.t()).float()  # [rows, vocab]: the only big tensor
                lse = torch.logsumexp(z, dim=-1)
                logps[s:e] = z.gather(1, t[:, None])[:, 0] - lse
                if with_stats:
                    mean_logits[s:e] = z.mean(dim=-1)
                    top1[s:e] = z.argmax(dim=-1) == t
                if with_stats or jac is not None:
                    z.sub_(lse[:, None])  # log-softmax, in place
                    p = z.exp()  # the one [rows, vocab] temporary
                    if with_stats:
                        entropy[s:e] = -torch.linalg.vecdot(p, z)
                    if jac is not None:
                        jac[s:e] = weight[t].float() - (p.to(weight.dtype) @ weight).float()
                    del p
                del z
        if jac is not None:
            ctx.save_for_backward(jac)
        else:
            ctx.save_for_backward(hidden, weight, targets)
        ctx.chunk_size = chunk_size
        ctx.hidden_dtype = hidden.dtype
        ctx.uses_jacobian = jac is not None
        stats = [x for x in (entropy, mean_logits, top1) if x is not None]
        ctx.mark_non_differentiable(*stats)
        return logps, entropy, mean_logits, top1

    @staticmethod
    def backward(ctx: Any, grad_logps: torch.Tensor | None, *_: Any) -> tuple[Any, ...]:
        if grad_logps is None:
            return None, None, None, None, None
        g = grad_logps.float()
        if ctx.uses_jacobian:
            (jac,) = ctx.saved_tensors
            return (g[:, None] * jac).to(ctx.hidden_dtype), None, None, None, None
        hidden, weight, targets = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.zeros(hidden.shape, device=hidden.device, dtype=torch.float32) if need_hidden else None
        with maybe_gather_lm_head_ctx(weight):
            grad_weight = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_weight else None
            for s in range(0, hidden.shape[0], ctx.chunk_size):
                e = min(s + ctx.chunk_size, hidden.shape[0])
                h = hidden[s:e].to(weight.dtype)
                z = (h @ weight.t()).float()
                # d logp_t / d z = onehot(y_t) - softmax(z_t), times the upstream gradient of that token.
                dz = torch.softmax(z, dim=-1).mul_(-g[s:e, None])
                dz[torch.arange(e - s, device=dz.device), targets[s:e]] += g[s:e]
                del z
                if grad_hidden is not None:
                    grad_hidden[s:e] = (dz.to(weight.dtype) @ weight).float()
                if grad_weight is not None:
                    grad_weight.addmm_(dz.t(), h.float())
        return (None if grad_hidden is None else grad_hidden.to(ctx.hidden_dtype),
                None if grad_weight is None else grad_weight.to(weight.dtype), None, None, None)


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int = 1024,
                   with_stats: bool = False) -> tuple[torch.Tensor, ...]:
    """``log softmax(hidden @ weight.T)[label]`` per position, 0 where ``labels == IGNORE_INDEX``.

    ``hidden`` is ``[..., H]`` aligned with ``labels`` ``[...]`` (already shifted: ``hidden[t]`` predicts
    ``labels[t]``); ``weight`` is the LM head's ``[V, H]`` weight (Qwen heads have no bias). Returns
    ``(logps, entropy, mean_logits, is_top1)`` shaped like ``labels``; the last three are None unless ``with_stats``
    and carry no gradient.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    mask = labels != IGNORE_INDEX
    rows, targets = hidden[mask], labels[mask]
    outs = _TokenLogProbs.apply(rows, weight, targets, chunk_size, with_stats)
    full = []
    for x in outs:
        if x is None:
            full.append(None)
            continue
        # masked_scatter keeps the result connected to the graph even when no label is valid.
        full.append(x.new_zeros(mask.shape).masked_scatter(mask, x))
    return tuple(full)
