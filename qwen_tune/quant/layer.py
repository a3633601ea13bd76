"""A trainable linear layer over GPTQ buffers: dequantizes in forward and backward, so LoRA trains on top of the
frozen Int4 weights without gptqmodel's kernels (pure PyTorch, CPU or GPU)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .format import GPTQError, GPTQSpec, dequantize, trivial_g_idx


class _DequantMatmul(torch.autograd.Function):
    """x @ W with W dequantized in forward and again in backward: autograd keeps only the packed buffers alive,
    never a full-precision copy of the weight (that would cost what the 4-bit base saves)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x: torch.Tensor, layer: "GPTQLinear") -> torch.Tensor:  # type: ignore[override]
        ctx.layer = layer
        return x @ layer.dequantized(x.dtype)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        w = ctx.layer.dequantized(grad.dtype)
        return grad @ w.t(), None


class GPTQLinear(nn.Module):
    """Drop-in for the nn.Linear it replaces, with the GPTQ buffers of the checkpoint (names as published).

    Frozen by construction (buffers, not parameters); gradients flow to its input, so LoRA (peft's GPTQ LoRA
    layer) trains on top. Computes in the input's dtype.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, spec: GPTQSpec,
                 device: Any = None) -> None:
        super().__init__()
        per = 32 // spec.bits
        if in_features % per or out_features % per:
            raise GPTQError(f"a {in_features}x{out_features} linear layer does not pack into {spec.bits}-bit words")
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        gs = in_features if spec.group_size in (-1, 0) else spec.group_size
        n_groups = math.ceil(in_features / gs)
        self.register_buffer("qweight", torch.zeros(in_features // per, out_features, dtype=torch.int32, device=device))
        self.register_buffer("qzeros", torch.zeros(n_groups, out_features // per, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros(n_groups, out_features, dtype=torch.float16, device=device))
        self.register_buffer("g_idx", trivial_g_idx(in_features, spec.group_size, device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16, device=device))
        else:
            self.bias = None
        self._trivial: bool | None = None

    # peft looks for these on quantized linears
    @property
    def infeatures(self) -> int:
        return self.in_features

    @property
    def outfeatures(self) -> int:
        return self.out_features

    def _apply(self, fn, recurse=True):
        # .to(device) moves the buffers; dtype casts (.half(), .to(torch.bfloat16), peft's fp32 upcast) leave them:
        # packed ints must stay ints and the stored fp16 scales must not round through bf16.
        for name, buf in self._buffers.items():
            if buf is not None:
                self._buffers[name] = buf.to(fn(torch.empty(0, device=buf.device)).device)
        return self

    def _load_from_state_dict(self, *args, **kwargs):
        self._trivial = None  # g_idx may change
        super()._load_from_state_dict(*args, **kwargs)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[in_features, out_features] in ``dtype``."""
        if self._trivial is None:
            self._trivial = bool(torch.equal(self.g_idx.to(torch.int32),
                                             trivial_g_idx(self.in_features, self.spec.group_size, self.g_idx.device)))
        return dequantize(self.qweight, self.qzeros, self.scales, self.g_idx, self.spec, dtype, self._trivial)

    def weight_for_merge(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The nn.Linear weight ([out, in]) this layer computes with."""
        return self.dequantized(dtype).t().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _DequantMatmul.apply(x, self)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits={self.spec.bits}, group_size={self.spec.group_size}, format={self.spec.format}")
