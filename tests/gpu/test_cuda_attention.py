"""Packed rows == separate sequences through the GPU attention kernels, on a tiny Qwen2.

Separate sequences run through SDPA's flash backend (causal, no mask). Packed rows run as qwen-tune trains them:
per-sample SDPA ("sdpa_packed", the trainer's default for packed SDPA rows), SDPA with the trainer's shared
block-diagonal float mask (the memory-efficient backend, the one that takes a mask), SDPA given only the packed position_ids (transformers builds the mask), and flash-attention 2's varlen
kernel with the collator's cu_seq_lens when flash-attn is installed. On CPU (dry mode) the same comparisons run
on torch's CPU kernels.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AutoModelForCausalLM, Qwen2Config

from cuda_helpers import DEVICE, DRY, record, size
from qwen_tune.data.collators import PackingCollator
from qwen_tune.train.trainer import packed_attention_mask

pytestmark = pytest.mark.cuda

HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None
DTYPE = torch.float32 if DRY else torch.bfloat16
LENGTHS = [size(300, 13), size(516, 29), size(64, 6)]  # GPU total 880: 16-aligned for the efficient kernel
TOL = 1e-4 if DRY else 3e-2  # bf16: the packed and separate kernels round in different orders


def _model(attn: str):
    cfg = Qwen2Config(vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      use_cache=False)
    torch.manual_seed(0)  # the same weights for every attention implementation
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=DTYPE).to(DEVICE).eval()


def _samples() -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for n in LENGTHS:
        ids = torch.randint(0, 2048, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": ids})
    return out


def _backend(name: str):
    if DRY:  # CPU: torch's flash kernel for the mask-free case, the math kernel for masks
        return sdpa_kernel(SDPBackend.FLASH_ATTENTION if name == "flash" else SDPBackend.MATH)
    return sdpa_kernel({"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}[name])


@torch.no_grad()
def _separate(model, samples, flash_backend: bool = True) -> list[torch.Tensor]:
    out = []
    for s in samples:
        ids = torch.tensor([s["input_ids"]], device=DEVICE)
        if flash_backend:
            with _backend("flash"):  # errors if transformers passed a mask: proves the causal fast path
                out.append(model(input_ids=ids).logits[0].float())
        else:
            out.append(model(input_ids=ids).logits[0].float())
    return out


def _split(logits: torch.Tensor) -> list[torch.Tensor]:
    return list(logits[0].float().split(LENGTHS))


def _compare(name: str, packed: list[torch.Tensor], separate: list[torch.Tensor]) -> None:
    diffs = [float((p - s).abs().max()) for p, s in zip(packed, separate)]
    scale = max(float(s.abs().max()) for s in separate)
    record("packed_vs_separate", path=name, max_abs_diff=max(diffs), logit_scale=scale, lengths=LENGTHS)
    assert max(diffs) <= TOL * max(scale, 1.0), (name, diffs, scale)


def test_packed_sdpa_with_the_trainers_float_mask():
    model, samples = _model("sdpa"), _samples()
    batch = {k: v.to(DEVICE) for k, v in PackingCollator()(samples).items()}
    mask = packed_attention_mask(batch["position_ids"], DTYPE)
    with torch.no_grad(), _backend("efficient"):
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=mask).logits
    _compare("sdpa+float-mask (efficient kernel)", _split(packed), _separate(model, samples))


def test_packed_sdpa_from_position_ids_alone():
    model, samples = _model("sdpa"), _samples()
    batch = {k: v.to(DEVICE) for k, v in PackingCollator()(samples).items()}
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    _compare("sdpa+position_ids", _split(packed), _separate(model, samples))


def test_packed_sdpa_per_sample():
    """What QwenTrainer runs for packed SDPA rows: "sdpa_packed", SDPA per sample on the flash backend (no mask)."""
    from qwen_tune.models.packed_attention import use_packed_sdpa

    model, samples = _model("sdpa"), _samples()
    separate = _separate(model, samples)
    assert use_packed_sdpa(model)
    batch = {k: v.to(DEVICE) for k, v in PackingCollator()(samples).items()}
    with torch.no_grad(), _backend("flash"):  # errors if a mask was passed
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    _compare("sdpa_packed (flash kernel per sample)", _split(packed), separate)


def test_packed_loss_and_gradients_match_separate():
    """The training signal, not only the logits: summed loss and decoder gradients of packed vs separate."""
    from qwen_tune.train.loss import causal_lm_loss

    samples = _samples()
    model = _model("sdpa").train()
    batch = {k: v.to(DEVICE) for k, v in PackingCollator()(samples).items()}
    mask = packed_attention_mask(batch["position_ids"], DTYPE)
    hidden = model.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                         attention_mask=mask).last_hidden_state
    n = int((batch["labels"][:, 1:] != -100).sum())
    causal_lm_loss(hidden, model.lm_head, batch["labels"], num_items_in_batch=n, use_liger=False).backward()
    packed_grads = {k: p.grad.float().clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    for s in samples:
        ids = torch.tensor([s["input_ids"]], device=DEVICE)
        labels = ids.clone()
        with _backend("flash"):
            h = model.model(input_ids=ids).last_hidden_state
            causal_lm_loss(h, model.lm_head, labels, num_items_in_batch=n, use_liger=False).backward()
    worst = max(float((packed_grads[k] - p.grad.float()).norm() / p.grad.float().norm().clamp_min(1e-12))
                for k, p in model.named_parameters())
    record("packed_vs_separate_grads", max_rel_err=worst)
    assert worst < (1e-4 if DRY else 5e-2), worst


@pytest.mark.skipif(DRY or not HAS_FLASH_ATTN, reason="flash-attn 2 not installed (CUDA only)")
def test_packed_flash_attention_2_varlen():
    model, samples = _model("flash_attention_2"), _samples()
    batch = PackingCollator(flash_attn_kwargs=True)(samples)
    batch = {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in batch.items()}
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    _compare("flash_attention_2 varlen", _split(packed), _separate(model, samples, flash_backend=False))
