"""The chunked loss on GPU: against full-logits cross entropy under bf16 and fp16 autocast (fp16 with the
GradScaler), and liger-kernel's fused path: when it is picked, and that its values match."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cuda_helpers import DEVICE, DRY, record, rel_err, size
from qwen_tune.train.loss import IGNORE_INDEX, causal_lm_loss

pytestmark = pytest.mark.cuda

V = size(151_936, 4096)  # Qwen's vocabulary on GPU: fp16 softmax probabilities are then mostly subnormal
H, T = size(256, 32), size(1024, 48)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _full_logits_loss(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, **_: object) -> torch.Tensor:
    """transformers' ForCausalLMLoss: every logit at once, upcast to fp32."""
    logits = head(hidden).float()
    shift = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    return F.cross_entropy(logits.reshape(-1, V), shift.reshape(-1), ignore_index=IGNORE_INDEX)


def _setup(seed: int = 0) -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    proj = nn.Linear(H, H).to(DEVICE)  # stands in for the decoder: its gradient flows back through the loss
    head = nn.Linear(H, V, bias=False).to(DEVICE)
    x = torch.randn(2, T, H, generator=g).to(DEVICE)
    labels = torch.randint(0, V, (2, T), generator=g)
    labels[:, : T // 4] = IGNORE_INDEX  # a prompt
    return proj, head, x, labels.to(DEVICE)


def _step(loss_fn, dtype: str | None, **kw: object) -> dict[str, torch.Tensor]:
    """One mixed-precision step like the Trainer's: fp32 weights, autocast, GradScaler for fp16."""
    proj, head, x, labels = _setup()
    params = list(proj.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, lr=0.0)
    scaler = torch.amp.GradScaler(DEVICE, enabled=dtype == "fp16")
    with torch.autocast(DEVICE, dtype=DTYPES.get(dtype or "bf16"), enabled=dtype is not None):
        loss = loss_fn(proj(x), head, labels, **kw)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    scale_before = scaler.get_scale() if scaler.is_enabled() else 1.0
    scaler.step(opt)
    scaler.update()
    # A skipped step (an inf/NaN gradient) would halve the scale.
    skipped = scaler.is_enabled() and scaler.get_scale() < scale_before
    return {"loss": loss.detach().float(), "proj": proj.weight.grad.clone(), "head": head.weight.grad.clone(),
            "skipped": torch.tensor(skipped)}


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("chunk_size", [size(256, 16), 2048])
def test_chunked_loss_matches_full_logits_under_autocast(dtype, chunk_size):
    exact = _step(_full_logits_loss, None)  # fp32 everywhere: the ground truth
    full = _step(_full_logits_loss, dtype)
    ours = _step(causal_lm_loss, dtype, chunk_size=chunk_size, use_liger=False)
    assert not bool(full["skipped"]) and not bool(ours["skipped"]), "GradScaler found inf/NaN gradients"
    errs = {k: (rel_err(ours[k], full[k]), rel_err(ours[k], exact[k]), rel_err(full[k], exact[k]))
            for k in ("loss", "proj", "head")}
    record("loss_vs_full_logits", dtype=dtype, chunk_size=chunk_size, vocab=V, rows=T,
           **{f"{k}_rel_err_vs_full16_vs_fp32_full16_vs_fp32": [round(e, 6) for e in v] for k, v in errs.items()})
    for k, (vs_full, vs_exact, full_vs_exact) in errs.items():
        for e in (vs_full, vs_exact, full_vs_exact):
            assert torch.isfinite(torch.tensor(e))
        # As close to fp32 as the full-logits loss in the same precision is (plus rounding), and never far.
        assert vs_exact <= 2 * full_vs_exact + 1e-3, (k, errs)
        assert vs_full < (0.05 if dtype == "fp16" else 0.03), (k, errs)
    assert torch.count_nonzero(ours["head"]) > 0.9 * ours["head"].numel()  # fp16: the scale kept gradients alive


# --------------------------------------------------------------------------- liger


@pytest.fixture
def liger_calls(monkeypatch):
    """Counts calls into liger's fused loss (the real one runs; this only observes which path was taken)."""
    pytest.importorskip("liger_kernel", reason="liger-kernel not installed (pip install 'qwen-tune[liger]')")
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    calls = []
    original = LigerFusedLinearCrossEntropyLoss.forward

    def spy(self, *args, **kw):
        calls.append(1)
        return original(self, *args, **kw)

    monkeypatch.setattr(LigerFusedLinearCrossEntropyLoss, "forward", spy)
    return calls


def _bf16_setup(bias: bool = False) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A bf16 model's head (the Trainer loads weights in the training dtype)."""
    _, _, x, labels = _setup()
    torch.manual_seed(1)
    head = nn.Linear(H, V, bias=bias).to(DEVICE, torch.bfloat16)
    return head, x.to(torch.bfloat16), labels


def _loss_and_grads(fn, head, x, labels, **kw):
    h = x.detach().clone().requires_grad_(True)
    head.zero_grad(set_to_none=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = fn(h, head, labels, **kw)
    loss.backward()
    return loss.detach().float(), h.grad.float(), head.weight.grad.float(), [str(w.message) for w in caught]


@pytest.mark.parametrize("use_liger", [None, True])
def test_liger_is_picked_for_a_plain_head_and_matches(liger_calls, use_liger):
    head, x, labels = _bf16_setup()
    ref = _loss_and_grads(_full_logits_loss, head, x, labels)
    got = _loss_and_grads(causal_lm_loss, head, x, labels, use_liger=use_liger, chunk_size=size(256, 16))
    assert len(liger_calls) == (0 if DRY else 1)  # CUDA only: on CPU the chunked path runs
    errs = [rel_err(g, r) for g, r in zip(got[:3], ref[:3])]
    record("liger_vs_full_logits", use_liger=use_liger, picked=bool(liger_calls), rel_err_loss_hidden_head=errs)
    assert max(errs) < 0.03, errs


@pytest.mark.parametrize("case", ["bias", "hooked", "off"])
def test_liger_is_not_picked_where_it_cannot_apply(liger_calls, case):
    head, x, labels = _bf16_setup(bias=case == "bias")
    if case == "hooked":  # e.g. peft / DeepSpeed hooks: the head must be called as a module
        head.register_forward_hook(lambda m, a, out: None)
    use_liger = False if case == "off" else True
    ref = _loss_and_grads(_full_logits_loss, head, x, labels)
    got = _loss_and_grads(causal_lm_loss, head, x, labels, use_liger=use_liger, chunk_size=size(256, 16))
    assert liger_calls == []
    assert (case != "off") == any("liger" in w for w in got[3])  # requested but refused: says why
    assert max(rel_err(g, r) for g, r in zip(got[:3], ref[:3])) < 0.03


def test_liger_values_under_fp16_autocast(liger_calls):
    """Whichever path fp16 selects (the fused one computes in the weights' dtype), the step stays finite and
    matches the full-logits loss."""
    exact = _step(_full_logits_loss, None)
    ours = _step(causal_lm_loss, "fp16", chunk_size=size(256, 16), use_liger=None)
    record("liger_fp16", picked=bool(liger_calls), rel_err_head=rel_err(ours["head"], exact["head"]))
    assert not bool(ours["skipped"])
    for k in ("loss", "proj", "head"):
        assert rel_err(ours[k], exact[k]) < 0.05, k
