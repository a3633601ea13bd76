"""The GPTQ packing format: the published (auto-gptq) layout of a quantized linear, packing and dequantizing.

Layout of one quantized ``nn.Linear(in_features, out_features)`` named ``P`` (what Qwen's ``*-Int4`` checkpoints
hold, written by auto-gptq; gptqmodel and transformers read the same names):

* ``P.qweight``  int32 ``[in_features * bits / 32, out_features]``: input row ``i`` of output column ``j`` sits in
  word ``qweight[i // (32/bits), j]`` at bit ``(i % (32/bits)) * bits``;
* ``P.qzeros``   int32 ``[n_groups, out_features * bits / 32]``: the zero point of group ``g``, column ``j`` sits in
  word ``qzeros[g, j // (32/bits)]`` at bit ``(j % (32/bits)) * bits``;
* ``P.scales``   fp16  ``[n_groups, out_features]``;
* ``P.g_idx``    int32 ``[in_features]``: the group of each input row (``i // group_size`` without act-order);
* ``P.bias``     fp16  ``[out_features]`` when the layer has one.

``W[j, i] = scales[g, j] * (q[i, j] - zero[g, j])`` with ``g = g_idx[i]``. The stored zero depends on the format:
``gptq`` (v1, auto-gptq and every published Qwen Int4 model) stores ``zero - 1`` (so a symmetric 4-bit layer holds
7 = 0x77777777 words), ``gptq_v2`` (gptqmodel's own format, what quantizing through transformers saves) stores
the zero itself. ``quantization_config.checkpoint_format`` (or ``format``) says which; absent means v1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..config import ConfigError

FORMATS = {"v1": "gptq", "v2": "gptq_v2"}  # CLI name -> checkpoint_format value
SUPPORTED_BITS = (2, 4, 8)  # widths that tile an int32 word (3-bit packing straddles words: not supported)
QUANT_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


class GPTQError(ConfigError):
    """A GPTQ checkpoint or request that cannot be handled, said in one line (the CLI prints it without a traceback)."""


# ----------------------------------------------------------------------------------------------------------------
# The quantization config of a checkpoint


@dataclass(frozen=True)
class GPTQSpec:
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    desc_act: bool = False
    format: str = "gptq"  # "gptq" (v1) or "gptq_v2"

    @property
    def v1(self) -> bool:
        return self.format == "gptq"

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1



def spec_from_config(q: dict[str, Any], where: str = "checkpoint") -> GPTQSpec:
    method = str(q.get("quant_method", "gptq")).lower()
    if method != "gptq":
        raise GPTQError(f"{where}: quantization method {method!r} is not GPTQ")
    fmt = str(q.get("checkpoint_format") or q.get("format") or "gptq").lower()
    if fmt not in FORMATS.values():
        raise GPTQError(f"{where}: GPTQ checkpoint format {fmt!r} is not supported (gptq = v1, gptq_v2 = v2)")
    bits = int(q.get("bits", 4))
    if bits not in SUPPORTED_BITS:
        raise GPTQError(f"{where}: {bits}-bit GPTQ is not supported by the PyTorch path (bits: {SUPPORTED_BITS})")
    return GPTQSpec(bits=bits, group_size=int(q.get("group_size", 128)), sym=bool(q.get("sym", True)),
                    desc_act=bool(q.get("desc_act", False)), format=fmt)



# ----------------------------------------------------------------------------------------------------------------
# Packing


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2**32) -> the int32 with the same bits."""
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """[K, N] integers in [0, 2**bits) -> int32 [K * bits / 32, N], row k at bit (k % per_word) * bits."""
    per = 32 // bits
    K, N = values.shape
    if K % per:
        raise GPTQError(f"{K} rows do not pack into int32 words of {per} {bits}-bit values")
    v = values.to(torch.int64).view(K // per, per, N)
    shifts = (torch.arange(per, dtype=torch.int64, device=values.device) * bits).view(1, per, 1)
    return _to_int32((v << shifts).sum(dim=1))


def unpack_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    per = 32 // bits
    shifts = (torch.arange(per, dtype=torch.int32, device=words.device) * bits).view(1, per, 1)
    v = (words.to(torch.int32).unsqueeze(1) >> shifts) & (2**bits - 1)  # arithmetic shift, then masked: exact
    return v.reshape(words.shape[0] * per, words.shape[1])


def pack_cols(values: torch.Tensor, bits: int) -> torch.Tensor:
    """[G, N] integers in [0, 2**bits) -> int32 [G, N * bits / 32], column n at bit (n % per_word) * bits."""
    return pack_rows(values.t().contiguous(), bits).t().contiguous()


def unpack_cols(words: torch.Tensor, bits: int) -> torch.Tensor:
    return unpack_rows(words.t(), bits).t()


def trivial_g_idx(in_features: int, group_size: int, device: Any = None) -> torch.Tensor:
    gs = in_features if group_size in (-1, 0) else group_size
    return (torch.arange(in_features, dtype=torch.int32, device=device) // gs).to(torch.int32)


def pack_layer(qint: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, spec: GPTQSpec,
               bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Integer weights [out, in], scales/zeros [n_groups, out] (true zero points) -> the checkpoint tensors."""
    out_features, in_features = qint.shape
    stored = zeros.to(torch.int64) - (1 if spec.v1 else 0)
    stored = stored & spec.maxq  # v1 with a zero point of 0 stores -1: its low bits, as auto-gptq does
    tensors = {
        "qweight": pack_rows(qint.t().contiguous(), spec.bits),
        "qzeros": pack_cols(stored, spec.bits),
        "scales": scales.to(torch.float16).contiguous(),
        "g_idx": trivial_g_idx(in_features, spec.group_size),
    }
    if bias is not None:
        tensors["bias"] = bias.detach().to(torch.float16).contiguous()
    return tensors


def unpack_zeros(qzeros: torch.Tensor, spec: GPTQSpec) -> torch.Tensor:
    """True zero points [n_groups, out] from the stored words (v1 stores zero - 1, modulo 2**bits)."""
    z = unpack_cols(qzeros, spec.bits)
    return (z + 1) & spec.maxq if spec.v1 else z


def dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None,
               spec: GPTQSpec, dtype: torch.dtype = torch.float32, trivial: bool | None = None) -> torch.Tensor:
    """The weight as [in_features, out_features] (the transpose of nn.Linear.weight) in ``dtype``.

    ``g_idx`` None means the plain ``i // group_size``; ``trivial`` (checked when None) says that ``g_idx`` is that,
    which lets whole groups broadcast instead of gathering a scale per input row.
    """
    q = unpack_rows(qweight, spec.bits).to(dtype)  # [in, out]
    z = unpack_zeros(qzeros, spec).to(dtype)  # [G, out]
    s = scales.to(dtype)
    in_features, n_groups = q.shape[0], s.shape[0]
    if trivial is None:
        trivial = g_idx is None or bool(torch.equal(g_idx.to(torch.int32),
                                                     trivial_g_idx(in_features, spec.group_size, g_idx.device)))
    gs = in_features if spec.group_size in (-1, 0) else spec.group_size
    if trivial and in_features == gs * n_groups:
        return ((q.view(n_groups, gs, -1) - z.unsqueeze(1)) * s.unsqueeze(1)).view(in_features, -1)
    idx = (g_idx if g_idx is not None and not trivial else trivial_g_idx(in_features, spec.group_size, q.device))
    idx = idx.long()
    return (q - z[idx]) * s[idx]

