"""Prototype: a chunked causal-LM loss that computes its gradient during the forward (no recompute).

    python bench/proto_fused_loss.py            # correctness vs causal_lm_loss + timing + peak RSS (~4 min)

Why: ``qwen_tune.train.loss.causal_lm_loss`` wraps every chunk in a non-reentrant activation
checkpoint, so on backward each chunk runs the LM head *again* (3 LM-head matmuls per supervised
row instead of 2) and ``cross_entropy`` twice, plus the ``log_softmax``/``nll_loss`` backward
(which zero-fills a chunk-sized gradient). On a Qwen-sized vocabulary the LM head is most of a
small model's step, so that recompute costs ~1.4x on the dominant term.

``fused_causal_lm_loss`` keeps the same memory bound (one chunk of logits alive at a time) but,
like liger-kernel's fused linear cross-entropy, takes the gradient while the chunk's logits are
alive: ``softmax - onehot`` in place on the logits, then one backward matmul through the head
(called as a module, so peft wrappers / LoRA on ``lm_head`` still work), storing only the
``[rows, hidden]`` input gradient (and trainable head-parameter gradients, if any). Backward
just scales those by the incoming gradient. Same signature and result as ``causal_lm_loss``.

Not a drop-in for ZeRO-3 (partitioned head parameters cannot be Function inputs): there, keep
the checkpointed path.
"""

from __future__ import annotations

import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from qwen_tune.train.loss import supervised_rows

IGNORE_INDEX = -100


class _FusedHeadCE(torch.autograd.Function):
    """Sum of cross entropy of ``lm_head(rows)`` vs ``targets``; gradients computed in forward."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, targets: torch.Tensor, chunk_size: int, lm_head: nn.Module,
                *params: torch.Tensor) -> torch.Tensor:
        need_rows = ctx.needs_input_grad[0]
        grad_rows = torch.empty_like(rows) if need_rows else None
        grad_params = [torch.zeros_like(p) for p in params]
        total = torch.zeros((), dtype=torch.float32, device=rows.device)
        n = rows.shape[0]
        for start in range(0, n, chunk_size):
            r = rows[start:start + chunk_size].detach()
            t = targets[start:start + chunk_size]
            if need_rows:
                r.requires_grad_(True)
            with torch.enable_grad():
                logits = lm_head(r)
            lf = logits.detach().float()
            lse = torch.logsumexp(lf, dim=-1)
            total += (lse - lf.gather(1, t[:, None]).squeeze(1)).sum()
            wrt = ([r] if need_rows else []) + list(params)
            if wrt:
                # d(sum CE)/d logits = softmax - onehot, built in place on the (float) logits.
                lf.sub_(lse[:, None]).exp_()
                lf[torch.arange(t.numel(), device=t.device), t] -= 1.0
                grads = torch.autograd.grad(logits, wrt, grad_outputs=lf.to(logits.dtype))
                if need_rows:
                    grad_rows[start:start + chunk_size] = grads[0]
                    grads = grads[1:]
                for acc, g in zip(grad_params, grads):
                    if g is not None:
                        acc += g
            del logits, lf
        ctx.save_for_backward(*([grad_rows] if need_rows else []), *grad_params)
        ctx.need_rows = need_rows
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        saved = list(ctx.saved_tensors)
        grad_rows = saved.pop(0) * grad_out if ctx.need_rows else None
        return (grad_rows, None, None, None, *[g * grad_out for g in saved])


def fused_causal_lm_loss(hidden_states: torch.Tensor, lm_head: nn.Module, labels: torch.Tensor, *,
                         num_items_in_batch=None, chunk_size: int = 2048, use_liger=None) -> torch.Tensor:
    """Drop-in for ``qwen_tune.train.loss.causal_lm_loss`` (CPU/GPU, no ZeRO-3)."""
    hidden_flat, rows, targets = supervised_rows(hidden_states, labels)
    n_valid = rows.shape[0]
    if n_valid == 0:
        empty = lm_head(hidden_flat[:0]).float().sum()
        return (hidden_states.sum() * 0).float() + empty * 0
    params = [p for p in lm_head.parameters() if p.requires_grad] if torch.is_grad_enabled() else []
    loss_sum = _FusedHeadCE.apply(rows, targets, chunk_size, lm_head, *params)
    if num_items_in_batch is None:
        return loss_sum / n_valid
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss_sum.device)
    return loss_sum / num_items_in_batch


# --------------------------------------------------------------------------- checks and timing

V, H = 151936, 256


def _inputs(T: int, label_frac: float, seed: int = 0, trainable_head: bool = False):
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(H, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g) * 0.02)
    head.weight.requires_grad_(trainable_head)
    hidden = torch.randn(1, T, H, generator=g)
    labels = torch.randint(0, V, (1, T), generator=g)
    labels[torch.rand(1, T, generator=g) > label_frac] = IGNORE_INDEX
    return head, hidden, labels


def _run(kind: str, head, hidden, labels, chunk: int):
    from qwen_tune.train.loss import causal_lm_loss

    h = hidden.clone().requires_grad_(True)
    if kind == "hf_full_logits":
        logits = head(h).float()
        shift = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        loss = F.cross_entropy(logits.view(-1, V), shift.view(-1), ignore_index=IGNORE_INDEX)
    elif kind == "causal_lm_loss":
        loss = causal_lm_loss(h, head, labels, chunk_size=chunk, use_liger=False)
    else:
        loss = fused_causal_lm_loss(h, head, labels, chunk_size=chunk)
    loss.backward()
    return loss.detach(), h.grad


def check(chunk: int = 512) -> None:
    for trainable in (False, True):
        head, hidden, labels = _inputs(1500, 0.7, trainable_head=trainable)
        ref_loss, ref_grad = _run("causal_lm_loss", head, hidden, labels, chunk)
        ref_w = head.weight.grad.clone() if trainable else None
        head.weight.grad = None
        loss, grad = _run("fused", head, hidden, labels, chunk)
        assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=1e-6), (loss, ref_loss)
        assert float((grad - ref_grad).abs().max()) <= 1e-4 * float(ref_grad.abs().max())
        if trainable:
            assert float((head.weight.grad - ref_w).abs().max()) <= 1e-4 * float(ref_w.abs().max())
        print(f"  equal to causal_lm_loss (loss {float(loss):.6f}, head {'trainable' if trainable else 'frozen'}): ok")
    # peft LoRA on the head: the wrapper is called as a module, LoRA weights get their gradient.
    from peft import LoraConfig, get_peft_model

    class M(nn.Module):
        def __init__(self, head):
            super().__init__()
            self.lm_head = head

    head, hidden, labels = _inputs(700, 0.7)
    grads = []
    for kind in ("causal_lm_loss", "fused"):
        m = get_peft_model(M(nn.Linear(H, V, bias=False)), LoraConfig(r=4, target_modules=["lm_head"], init_lora_weights=False))
        torch.manual_seed(0)
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(torch.randn_like(p) * 0.02)
        _run(kind, m.base_model.model.lm_head, hidden, labels, 256)
        grads.append([p.grad.clone() for p in m.parameters() if p.requires_grad])
    assert all(float((a - b).abs().max()) <= 1e-4 * float(a.abs().max()) for a, b in zip(*grads))
    print("  LoRA on lm_head (peft wrapper): LoRA gradients equal: ok")


def timing(T: int, label_frac: float, chunk: int, repeats: int) -> dict:
    """Best-of-`repeats` wall and CPU seconds of loss + backward per kind, kinds interleaved."""
    head, hidden, labels = _inputs(T, label_frac)
    kinds = ["hf_full_logits", "causal_lm_loss", "fused"]
    wall = {k: [] for k in kinds}
    cpu = {k: [] for k in kinds}
    _run("fused", head, hidden[:, :256], labels[:, :256], chunk)  # warm-up
    for rep in range(repeats):
        for k in (kinds if rep % 2 == 0 else kinds[::-1]):
            w, c = time.perf_counter(), time.process_time()
            _run(k, head, hidden, labels, chunk)
            wall[k].append(time.perf_counter() - w)
            cpu[k].append(time.process_time() - c)
    return {k: (min(wall[k]), min(cpu[k])) for k in kinds}


def _rss_worker(kind: str, T: int, chunk: int) -> None:
    import resource

    def hwm() -> int:  # this process's own peak RSS (KiB); ru_maxrss can include a vfork()ing parent's peak
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    head, hidden, labels = _inputs(T, 0.75)
    rss = 0
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    _run(kind, head, hidden, labels, chunk)
    print(f"{(hwm() - rss) / 2**20:.3f}")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--rss-worker":
        _rss_worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return 0
    print("peak RSS increase of loss + backward at T=8192, 75 % of rows supervised (each in its own process):")
    for kind in ("hf_full_logits", "causal_lm_loss", "fused"):
        p = subprocess.run([sys.executable, __file__, "--rss-worker", kind, "8192", "2048"], capture_output=True,
                           text=True)
        out = p.stdout.strip().splitlines()[-1] if p.returncode == 0 and p.stdout.strip() else p.stderr[-300:]
        print(f"  {kind:15s} +{out} GiB", flush=True)
    print("correctness:")
    check()
    T = 4096
    print(f"loss + backward only: hidden [1, {T}, 256] -> frozen 151,936-way head, 75 % of rows supervised, "
          "chunk 2048; best of 2, interleaved:")
    r = timing(T, 0.75, 2048, 2)
    for k, (w, c) in r.items():
        print(f"  {k:15s} wall {w:6.2f}s  CPU {c:6.2f}s", flush=True)
    print(f"  -> fused vs causal_lm_loss: {r['causal_lm_loss'][0] / r['fused'][0]:.2f}x wall, "
          f"{r['causal_lm_loss'][1] / r['fused'][1]:.2f}x CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
