"""Attention of packed rows without a T x T mask: SDPA runs causally on each sample's own segment.

Registered with transformers as the attention implementation ``"sdpa_packed"`` (an attention function and its mask
function). A packed row's samples never attend to each other, so the cross-sample blocks of the row's attention are
pure waste: the dense block-diagonal mask path allocates T x T mask bytes and computes every block before masking it
out, which at 32k packed tokens is a 4 GiB fp32 mask and ~(T / sample length) times the attention FLOPs. Splitting
q / k / v at the sample boundaries (read from ``position_ids``, which restart at 0 per sample, see `packing.py`) and
calling SDPA with ``is_causal`` per segment computes only the diagonal blocks and allocates no mask at all.

transformers has no CPU kernel for this: flash-attention varlen is CUDA-only (and stays the GPU path), and torch's
flex_attention has no backward on CPU (torch 2.13, eager or compiled), so it cannot train there.

Everything that is not a packed causal row (a padding mask, a KV cache, a sliding window) keeps transformers' own
SDPA path with its mask: the mask function returns None only when the row is causal within samples.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from .packing import packed_sample_index

PACKED_SDPA = "sdpa_packed"
log = logging.getLogger(__name__)


def segment_lengths(position_ids: torch.Tensor) -> list[list[int]]:
    """Sample lengths of every packed row ``[B, T]`` (one row may hold one sample)."""
    sample = packed_sample_index(position_ids)
    return [torch.bincount(row).tolist() for row in sample]


# Per-sample SDPA pays a fixed cost per sample and layer (a kernel call and its backward, the split and the cat);
# the dense mask pays for all T^2 scores. bench/bench_long.py --attention on 2 shared CPU cores: per-sample wins on
# realistic rows (1.4x at 2k, 3.1x at 8k) and on 8-token samples at 8k (4.2x); 2k rows of 8-token samples (256)
# measured 1.24x, and 0.46x under heavy load. The dense mask is kept above T^2 / 32,768 samples (a mean sample
# under 32,768 / T tokens), where it won at least once and is small (16 MiB at 2k); SFT rows never get there.
DENSE_ROW_SAMPLES_PER_T2 = 1 / 32768


def dense_mask_is_faster(position_ids: torch.Tensor) -> bool:
    """Whether a packed batch holds so many short samples that one dense block mask beats per-sample SDPA."""
    T = position_ids.shape[-1]
    samples = int(packed_sample_index(position_ids)[:, -1].max()) + 1
    return samples > max(1.0, T * T * DENSE_ROW_SAMPLES_PER_T2)


def packed_sdpa_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                     attention_mask: torch.Tensor | None = None, local_size: int | None = None,
                     **kwargs: Any) -> torch.Tensor | None:
    """No mask for a causal row without padding, cache offset or sliding window (the attention function then finds
    the samples in position_ids); transformers' SDPA mask otherwise."""
    if attention_mask is None and local_size is None and q_offset == 0 and kv_offset == 0 and q_length == kv_length:
        return None
    return sdpa_mask(batch_size, q_length, kv_length, q_offset=q_offset, kv_offset=kv_offset,
                     attention_mask=attention_mask, local_size=local_size, **kwargs)


def packed_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None = None,
                          **kwargs: Any) -> tuple[torch.Tensor, None]:
    """SDPA per sample segment of (batch, heads, seq, head_dim) inputs; output (batch, seq, heads, head_dim)."""
    T = query.shape[2]
    if (attention_mask is not None or position_ids is None or key.shape[2] != T or T == 1
            or kwargs.get("sliding_window") is not None):
        # A sliding window comes with its own mask, which includes the sample boundaries; without one (a model
        # whose mask function was bypassed) this path would silently drop the window.
        if attention_mask is None and kwargs.get("sliding_window") is not None and T > 1:
            raise ValueError(f"{PACKED_SDPA}: a sliding-window layer got no mask")
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    position_ids = position_ids.reshape(-1, T)
    rows = segment_lengths(position_ids)
    if all(len(r) == 1 for r in rows):
        return sdpa_attention_forward(module, query, key, value, None, **kwargs)
    if position_ids.shape[0] != query.shape[0]:  # one position row shared by the batch
        rows = rows * query.shape[0]
    out = []
    for b, lens in enumerate(rows):
        q, k, v = (t[b:b + 1].split(lens, dim=2) for t in (query, key, value))
        # Segments are causal and square: transformers' SDPA call (GQA, dropout, scaling) with is_causal.
        out.append(torch.cat([sdpa_attention_forward(module, qs, ks, vs, None, **kwargs)[0]
                              for qs, ks, vs in zip(q, k, v)], dim=1))
    return torch.cat(out, dim=0) if len(out) > 1 else out[0], None


def register_packed_sdpa() -> None:
    """Make ``"sdpa_packed"`` a transformers attention implementation (idempotent)."""
    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    AttentionMaskInterface.register(PACKED_SDPA, packed_sdpa_mask)


def use_packed_sdpa(model: Any) -> bool:
    """Switch a model that runs "sdpa" to "sdpa_packed" for its packed rows; False (keep the dense block mask) when
    transformers refuses the implementation for this model."""
    if getattr(model.config, "_attn_implementation", None) == PACKED_SDPA:
        return True
    if getattr(model, "_qwen_tune_dense_packing", False):
        return False
    register_packed_sdpa()
    try:
        model.set_attn_implementation(PACKED_SDPA)
    except (ValueError, AttributeError) as exc:
        model._qwen_tune_dense_packing = True  # asked once: the log line below is not repeated every step
        log.info("packed rows: dense block-diagonal mask + SDPA (%s does not take %s: %s)",
                 type(model).__name__, PACKED_SDPA, str(exc).splitlines()[0][:120] if str(exc) else "")
        return False
    log.info("packed rows: per-sample SDPA (%s), no T x T mask, unless a row of T tokens holds over T^2/%d samples "
             "(dense block mask); padded rows keep SDPA's own mask", PACKED_SDPA, round(1 / DENSE_ROW_SAMPLES_PER_T2))
    return True
