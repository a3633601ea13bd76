"""GPTQ Int4 checkpoints in pure PyTorch: the published (auto-gptq) layout, dequantization, a trainable
dequantizing linear layer, and quantization (GPTQ, or round-to-nearest) that writes that layout.

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

import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError

log = logging.getLogger(__name__)

FORMATS = {"v1": "gptq", "v2": "gptq_v2"}  # CLI name -> checkpoint_format value
SUPPORTED_BITS = (2, 4, 8)  # widths that tile an int32 word (3-bit packing straddles words: not supported)
QUANT_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


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


def read_quantization_config(path: str | os.PathLike) -> dict[str, Any] | None:
    """config.json's ``quantization_config``, else ``quantize_config.json`` (auto-gptq's own file), else None."""
    path = Path(path)
    cfg_file = path / "config.json"
    q = None
    if cfg_file.is_file():
        q = json.loads(cfg_file.read_text(encoding="utf-8")).get("quantization_config")
    if q is None and (path / "quantize_config.json").is_file():
        q = {"quant_method": "gptq", **json.loads((path / "quantize_config.json").read_text(encoding="utf-8"))}
    return q if isinstance(q, dict) else None


def config_json_quantization(path: str | os.PathLike) -> dict[str, Any] | None:
    """config.json's ``quantization_config`` only: what transformers' GPTQ integration reads."""
    cfg = Path(path) / "config.json"
    q = json.loads(cfg.read_text(encoding="utf-8")).get("quantization_config") if cfg.is_file() else None
    return q if isinstance(q, dict) else None


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


# ----------------------------------------------------------------------------------------------------------------
# A trainable linear layer that computes with the dequantized weight


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


# ----------------------------------------------------------------------------------------------------------------
# Quantizing one weight matrix


def _group_params(w: torch.Tensor, spec: GPTQSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (rounded to fp16, as stored) and integer zero point per row of ``w`` [out, group].

    auto-gptq's min/max rule, except that a symmetric row always spans [-max|w|, max|w|] (auto-gptq leaves an
    all-positive row at [0, max], which then clips at about half its range around the fixed zero point)."""
    zero_t = torch.zeros(w.shape[0], device=w.device, dtype=w.dtype)
    xmin = torch.minimum(w.min(dim=1).values, zero_t)
    xmax = torch.maximum(w.max(dim=1).values, zero_t)
    if spec.sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
    xmax = torch.where(empty, torch.ones_like(xmax), xmax)
    scale = ((xmax - xmin) / spec.maxq).to(torch.float16).to(w.dtype)
    scale = torch.where(scale == 0, torch.full_like(scale, 2.0**-24), scale)  # fp16 underflow of tiny groups
    if spec.sym:
        zero = torch.full_like(scale, (spec.maxq + 1) // 2)
    else:
        zero = torch.round(-xmin / scale).clamp(0, spec.maxq)
    return scale, zero


def _quant(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def rtn_quantize(weight: torch.Tensor, spec: GPTQSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest per group: (int weights [out, in], scales [G, out], zeros [G, out])."""
    W = weight.detach().float()
    out_features, in_features = W.shape
    gs = in_features if spec.group_size in (-1, 0) else spec.group_size
    qs, scales, zeros = [], [], []
    for g0 in range(0, in_features, gs):
        block = W[:, g0:g0 + gs]
        s, z = _group_params(block, spec)
        qs.append(_quant(block, s.unsqueeze(1), z.unsqueeze(1), spec.maxq))
        scales.append(s)
        zeros.append(z)
    return torch.cat(qs, 1).to(torch.int32), torch.stack(scales), torch.stack(zeros).to(torch.int32)


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, spec: GPTQSpec, damp_percent: float = 0.01,
                  blocksize: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """GPTQ (Frantar et al., 2022) for one layer: quantize columns left to right, spreading each column's rounding
    error over the columns not yet quantized through the inverse Hessian of the layer's inputs (Cholesky form,
    lazy block updates). Groups of ``group_size`` input columns share a scale/zero computed when the group starts,
    from the error-updated weights (static_groups false, no act-order).

    Returns (int weights [out, in], scales [G, out], zeros [G, out], the Hessian-weighted error).
    """
    W = weight.detach().float().clone()
    H = hessian.detach().float().clone()
    out_features, cols = W.shape
    gs = cols if spec.group_size in (-1, 0) else spec.group_size
    blocksize = max(blocksize, gs)  # a group never straddles two lazy-update blocks: its parameters see every update
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = damp_percent * torch.mean(torch.diag(H))
    eye = torch.arange(cols, device=W.device)
    Hinv = None
    for attempt in range(6):  # a calibration set too small for the layer can leave H singular: damp harder
        try:
            Hd = H.clone()
            Hd[eye, eye] += damp * (10**attempt)
            L = torch.linalg.cholesky(Hd)
            Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
            break
        except torch.linalg.LinAlgError:
            continue
    if Hinv is None:
        raise GPTQError("the layer's input Hessian is not positive definite even with heavy damping")

    Q = torch.zeros_like(W)
    scales: list[torch.Tensor] = []
    zeros: list[torch.Tensor] = []
    losses = torch.zeros(out_features, device=W.device)
    scale = zero = None
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % gs == 0:
                # Parameters of the group from its current (error-compensated) weights.
                upcoming = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :gs]
                scale, zero = _group_params(upcoming, spec)
                scales.append(scale)
                zeros.append(zero)
            w = W1[:, i]
            d = Hinv1[i, i]
            q = _quant(w, scale, zero, spec.maxq)
            Q1[:, i] = q
            err = (w - scale * (q - zero)) / d
            losses += (w - scale * (q - zero)) ** 2 / d**2 / 2
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return (Q.to(torch.int32), torch.stack(scales), torch.stack(zeros).to(torch.int32), float(losses.sum()))


# ----------------------------------------------------------------------------------------------------------------
# Model-level: which linears, loading a checkpoint through the PyTorch path


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The repeated decoder blocks (Qwen-1 ``transformer.h``, Qwen2+ ``model.layers``)."""
    for name in ("transformer.h", "model.layers", "model.language_model.layers"):
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(mod, nn.ModuleList):
            return name, mod
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and (n is None or len(mod) == n):
            return name, mod
    raise GPTQError(f"cannot find the decoder blocks of {type(model).__name__}")


_ROUTERS = ("mlp.gate", "shared_expert_gate")  # MoE routers stay full precision, as gptqmodel/auto-gptq leave them


def quantizable_linears(model: nn.Module, bits: int = 4) -> dict[str, nn.Linear]:
    """Every nn.Linear inside the decoder blocks (embeddings and lm_head stay full precision, as published), except
    MoE routers and layers whose sizes do not pack into int32 words (kept full precision, with a warning)."""
    prefix, blocks = decoder_blocks(model)
    per = 32 // bits
    out = {}
    for n, m in blocks.named_modules():
        if not isinstance(m, nn.Linear) or n.endswith(_ROUTERS):
            continue
        if m.in_features % per or m.out_features % per:
            log.warning("%s.%s (%dx%d) does not pack into %d-bit words: kept full precision", prefix, n,
                        m.in_features, m.out_features, bits)
            continue
        out[f"{prefix}.{n}"] = m
    return out


def _weight_files(path: Path) -> list[Path]:
    st = sorted(path.glob("*.safetensors"))
    return st or sorted(f for f in path.iterdir() if f.suffix in (".bin", ".pt", ".pth") and f.is_file())


def iter_checkpoint_tensors(path: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    path = Path(path)
    files = _weight_files(path)
    if not files:
        raise GPTQError(f"{path}: no weight files (*.safetensors or *.bin)")
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():
                    yield k, fh.get_tensor(k)
        else:
            yield from torch.load(f, map_location="cpu", weights_only=True).items()


def quantized_prefixes(path: str | os.PathLike) -> set[str]:
    """Module names that have a ``qweight`` in the checkpoint (read from the file headers only)."""
    path = Path(path)
    names: set[str] = set()
    for f in _weight_files(path):
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(f), framework="pt") as fh:
                keys = list(fh.keys())
        else:
            keys = list(torch.load(f, map_location="cpu", weights_only=True, mmap=True).keys())
        names |= {k[: -len(".qweight")] for k in keys if k.endswith(".qweight")}
    return names


def has_gptq_tensors(path: str | os.PathLike) -> bool:
    """Whether the weights hold GPTQ tensors (``*.qweight``), from the index or the safetensors headers only."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    try:
        if index.is_file():
            return any(k.endswith(".qweight") for k in json.loads(index.read_text())["weight_map"])
        return bool(path.is_dir() and any(f.suffix == ".safetensors" for f in path.iterdir())
                    and quantized_prefixes(path))
    except (OSError, ValueError, KeyError):
        return False


def gptqmodel_available() -> bool:
    """optimum + gptqmodel, what transformers' GPTQ integration needs (checked without importing them)."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("optimum", "gptqmodel"))


def _replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def load_gptq_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                    attn_implementation: str = "sdpa") -> nn.Module:
    """A GPTQ checkpoint as a model whose quantized linears are :class:`GPTQLinear` (no optimum/gptqmodel needed).

    The model class is the one transformers picks for the config (the bundled Qwen-1 class for model_type qwen);
    everything not quantized (embeddings, norms, lm_head) is cast to ``dtype``.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from . import qwen1  # noqa: F401 - registers model_type "qwen"

    path = Path(path)
    q = read_quantization_config(path)
    if q is None:
        raise GPTQError(f"{path}: no GPTQ quantization config (config.json quantization_config or "
                        "quantize_config.json)")
    spec = spec_from_config(q, str(path))
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with init_empty_weights(include_buffers=False):  # parameters on meta, buffers (rotary tables) real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    prefixes = quantized_prefixes(path)
    if not prefixes:
        raise GPTQError(f"{path}: the config says GPTQ but the weights hold no `qweight` tensors")
    modules = dict(model.named_modules())
    for name in sorted(prefixes):
        old = modules.get(name)
        if not isinstance(old, nn.Linear):
            raise GPTQError(f"{path}: quantized tensor {name}.qweight has no matching linear layer in "
                            f"{type(model).__name__}")
        _replace_module(model, name, GPTQLinear(old.in_features, old.out_features, old.bias is not None, spec))
    state: dict[str, torch.Tensor] = {}
    for key, t in iter_checkpoint_tensors(path):
        if any(key.endswith("." + s) for s in QUANT_SUFFIXES) or (key.endswith(".bias") and
                                                                   key[: -len(".bias")] in prefixes):
            state[key] = t
        elif t.is_floating_point():
            state[key] = t.to(dtype)
        else:
            state[key] = t
    expected = model.state_dict()
    for key, t in state.items():
        if key in expected and tuple(expected[key].shape) != tuple(t.shape):
            raise GPTQError(f"{path}: {key} has shape {list(t.shape)}, the model expects {list(expected[key].shape)} "
                            "(bits or group_size in the quantization config do not match the weights?)")
    result = model.load_state_dict(state, strict=False, assign=True)
    tied = getattr(config, "tie_word_embeddings", False)
    missing = [k for k in result.missing_keys if not (tied and k.endswith("lm_head.weight"))]
    if missing:
        raise GPTQError(f"{path}: the checkpoint lacks {', '.join(missing[:3])}"
                        f"{' and more' if len(missing) > 3 else ''}")
    unexpected = [k for k in result.unexpected_keys if not k.endswith("inv_freq")]
    if unexpected:
        log.warning("%s: ignored %d tensors the model does not use (e.g. %s)", path, len(unexpected), unexpected[0])
    if tied:
        model.tie_weights()
    meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if meta:
        raise GPTQError(f"{path}: no weights for {', '.join(meta[:3])}")
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    model.config.quantization_config = q  # the model is (and stays) quantized: peft and merge read this
    model.quantization_method = "gptq"  # what peft's prepare_model_for_kbit_training checks
    model.config._name_or_path = str(path)
    model.name_or_path = str(path)
    model.eval()
    return model


def gptq_modules(model: nn.Module) -> dict[str, GPTQLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, GPTQLinear)}


# ----------------------------------------------------------------------------------------------------------------
# Dequantizing a checkpoint (for merging)


def dequantize_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, dtype: str | None = None) -> Path:
    """Write ``dst``: the GPTQ checkpoint ``src`` as a plain one (every GPTQ layer a ``weight``), config without
    ``quantization_config``, tokenizer and every other non-weight file copied. Streams layer by layer.

    ``dtype`` (bf16/fp16/fp32) defaults to the checkpoint's own dtype; fp32 holds the dequantized weights exactly.
    """
    from huggingface_hub import save_torch_state_dict

    src, dst = Path(src), Path(dst)
    q = read_quantization_config(src)
    if q is None:
        raise GPTQError(f"{src}: not a GPTQ checkpoint (no quantization config)")
    spec = spec_from_config(q, str(src))
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    out_dtype = dtype or _checkpoint_dtype(config)
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[out_dtype]
    groups: dict[str, dict[str, torch.Tensor]] = {}
    state: dict[str, torch.Tensor] = {}
    for key, t in iter_checkpoint_tensors(src):
        mod, _, leaf = key.rpartition(".")
        if leaf in QUANT_SUFFIXES:
            groups.setdefault(mod, {})[leaf] = t
        elif t.is_floating_point():
            state[key] = t.to(torch_dtype)
        else:
            state[key] = t
    for mod, parts in groups.items():
        missing = [s for s in ("qweight", "qzeros", "scales") if s not in parts]
        if missing:
            raise GPTQError(f"{src}: {mod} lacks {', '.join(missing)}")
        w = dequantize(parts["qweight"], parts["qzeros"], parts["scales"], parts.get("g_idx"), spec, torch.float32)
        state[f"{mod}.weight"] = w.t().contiguous().to(torch_dtype)
    tmp = dst.with_name(dst.name + f".tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_torch_state_dict(state, tmp, max_shard_size="4GB")
    config.pop("quantization_config", None)
    _set_config_dtype(config, out_dtype)
    (tmp / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    copy_extra_files(src, tmp, skip={"quantize_config.json"})
    if dst.exists():
        shutil.rmtree(dst)
    tmp.rename(dst)
    return dst


def _checkpoint_dtype(config: dict[str, Any]) -> str:
    name = str(config.get("dtype") or config.get("torch_dtype") or "").replace("torch.", "")
    table = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}
    if name in table:
        return table[name]
    for short in ("bf16", "fp16", "fp32"):  # Qwen-1 precision flags
        if config.get(short):
            return short
    return "fp16"


def _set_config_dtype(config: dict[str, Any], short: str) -> None:
    long = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[short]
    config["torch_dtype"] = config["dtype"] = long
    if config.get("model_type") == "qwen":
        for s in ("bf16", "fp16", "fp32"):
            config[s] = s == short


def copy_extra_files(src: Path, dst: Path, skip: Iterable[str] = ()) -> list[str]:
    """Tokenizer, generation config, model code, README, ...: every file of ``src`` except weights and config.json."""
    skip = set(skip) | {"config.json"}
    copied = []
    for f in sorted(src.iterdir()):
        name = f.name
        if (name in skip or name.startswith(".") or name.endswith(WEIGHT_SUFFIXES) or name.endswith(".index.json")
                or not f.is_file()):
            continue
        shutil.copy2(f, dst / name)  # follows links: the output is self-contained
        copied.append(name)
    return copied


# ----------------------------------------------------------------------------------------------------------------
# Quantizing a model: calibration through the blocks, one block at a time


class _Stop(Exception):
    pass


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    error: float  # ||(W - Q) X||^2-style proxy (GPTQ) or plain squared weight error (RTN)


def _capture_block_inputs(model: nn.Module, block: nn.Module,
                          samples: list[torch.Tensor]) -> list[tuple[tuple, dict]]:
    captured: list[tuple[tuple, dict]] = []

    def hook(_mod, args, kwargs):
        captured.append((args, kwargs))
        raise _Stop

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids in samples:
            try:
                model(input_ids=ids, use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def _run_block(block: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    out = block(*args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


@torch.no_grad()
def quantize_model(model: nn.Module, samples: list[torch.Tensor], spec: GPTQSpec, algorithm: str = "gptq",
                   damp_percent: float = 0.01, progress: Callable[[str], None] | None = None
                   ) -> tuple[dict[str, dict[str, torch.Tensor]], list[LayerReport]]:
    """Quantize every linear of the decoder blocks; returns {module name: packed tensors} and per-layer errors.

    GPTQ runs block by block: the inputs of block ``b`` come from blocks ``0..b-1`` already quantized (so later
    blocks compensate for earlier rounding), and every linear of the block gets the Hessian ``2 X X^T / n`` of its
    own inputs over all calibration tokens. Linears inside one block are quantized together from the block's
    inputs (true_sequential false). RTN needs no samples. The model's weights are replaced by their quantized
    values as it goes (it ends up computing what the checkpoint computes).
    """
    if algorithm not in ("gptq", "rtn"):
        raise GPTQError(f"unknown quantization algorithm {algorithm!r} (gptq or rtn)")
    model.eval()
    prefix, blocks = decoder_blocks(model)
    packed: dict[str, dict[str, torch.Tensor]] = {}
    reports: list[LayerReport] = []
    say = progress or (lambda msg: log.info(msg))

    def finish(name: str, lin: nn.Linear, qint, scales, zeros, err) -> None:
        packed[name] = pack_layer(qint, scales, zeros, spec, lin.bias)
        p = packed[name]
        w = dequantize(p["qweight"], p["qzeros"], p["scales"], p["g_idx"], spec, torch.float32).t()
        lin.weight.data.copy_(w.to(lin.weight.dtype))
        if lin.bias is not None:
            lin.bias.data.copy_(p["bias"].to(lin.bias.dtype))
        reports.append(LayerReport(name, tuple(lin.weight.shape), err))

    if algorithm == "rtn":
        for name, lin in quantizable_linears(model, spec.bits).items():
            before = lin.weight.detach().float().clone()
            qint, scales, zeros = rtn_quantize(lin.weight, spec)
            finish(name, lin, qint, scales, zeros, 0.0)
            reports[-1].error = float(((lin.weight.float() - before) ** 2).sum())
        return packed, reports

    if not samples:
        raise GPTQError("GPTQ needs calibration samples (--calib FILE), or use --algorithm rtn")
    inputs = _capture_block_inputs(model, blocks[0], samples)
    wanted = quantizable_linears(model, spec.bits)
    for b, block in enumerate(blocks):
        linears = {n: m for n, m in block.named_modules() if f"{prefix}.{b}.{n}" in wanted}
        hess = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float32, device=m.weight.device)
                for n, m in linears.items()}
        counts = dict.fromkeys(linears, 0)

        def make_hook(n: str):
            def hook(_mod, args, _out):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                hess[n].addmm_(x.t(), x)
                counts[n] += x.shape[0]
            return hook

        handles = [m.register_forward_hook(make_hook(n)) for n, m in linears.items()]
        try:
            for args, kwargs in inputs:
                _run_block(block, args, kwargs)
        finally:
            for h in handles:
                h.remove()
        for n, lin in linears.items():
            name = f"{prefix}.{b}.{n}"
            if counts[n] == 0:  # e.g. an MoE expert no calibration token reached
                log.warning("%s saw no calibration tokens: round-to-nearest", name)
                qint, scales, zeros = rtn_quantize(lin.weight, spec)
                finish(name, lin, qint, scales, zeros, float("nan"))
                continue
            H = hess[n] * (2.0 / counts[n])
            qint, scales, zeros, err = gptq_quantize(lin.weight, H, spec, damp_percent)
            finish(name, lin, qint, scales, zeros, err)
        say(f"quantized block {b + 1}/{len(blocks)} ({len(linears)} linear layers)")
        inputs = [_with_hidden(args, kwargs, _run_block(block, args, kwargs)) for args, kwargs in inputs]
        del hess
    return packed, reports


def quantization_config_dict(spec: GPTQSpec, algorithm: str, damp_percent: float) -> dict[str, Any]:
    """config.json ``quantization_config`` as auto-gptq writes it, with the format stated explicitly."""
    return {
        "bits": spec.bits,
        "group_size": spec.group_size,
        "damp_percent": damp_percent,
        "desc_act": False,
        "static_groups": False,
        "sym": spec.sym,
        "true_sequential": False,
        "model_name_or_path": None,
        "model_file_base_name": "model",
        "quant_method": "gptq",
        "checkpoint_format": spec.format,  # gptq = v1 (zero - 1 stored), gptq_v2 = zero stored
        "format": spec.format,  # the same, under the name newer transformers/optimum use
        "meta": {"quantizer": ["qwen-tune"], "algorithm": algorithm},
    }


def save_gptq_checkpoint(model: nn.Module, packed: dict[str, dict[str, torch.Tensor]], src: str | os.PathLike,
                         out: str | os.PathLike, spec: GPTQSpec, algorithm: str, damp_percent: float,
                         dtype: str = "fp16", max_shard_size: str = "4GB") -> Path:
    """The published layout: safetensors with ``qweight/qzeros/scales/g_idx(/bias)`` for every quantized linear and
    the other weights in ``dtype``; config.json with ``quantization_config``; quantize_config.json; tokenizer and
    every other non-weight file of ``src``."""
    from huggingface_hub import save_torch_state_dict

    src, out = Path(src), Path(out)
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    state: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict().items():
        mod = key.rpartition(".")[0]
        if mod in packed:
            continue
        state[key] = t.detach().to(torch_dtype).contiguous() if t.is_floating_point() else t.detach().contiguous()
    if getattr(model.config, "tie_word_embeddings", False):
        state = {k: v for k, v in state.items() if not k.endswith("lm_head.weight")}
    for mod, tensors in packed.items():
        for leaf, t in tensors.items():
            state[f"{mod}.{leaf}"] = t.contiguous()
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_torch_state_dict(state, tmp, max_shard_size=max_shard_size, metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    qcfg = quantization_config_dict(spec, algorithm, damp_percent)
    prefix, blocks = decoder_blocks(model)
    in_blocks = {n for n, m in blocks.named_modules() if isinstance(m, nn.Linear)}  # "0.self_attn.q_proj", ...
    done = {name[len(prefix) + 1:] for name in packed}
    if in_blocks - done:  # some linears stayed full precision: say which are quantized (optimum reads this)
        qcfg["modules_in_block_to_quantize"] = [sorted({n.split(".", 1)[1] for n in done})]
    config["quantization_config"] = qcfg
    _set_config_dtype(config, dtype)
    (tmp / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    auto_gptq = {k: v for k, v in qcfg.items() if k != "quant_method"}
    (tmp / "quantize_config.json").write_text(json.dumps(auto_gptq, indent=2) + "\n", encoding="utf-8")
    copy_extra_files(src, tmp, skip={"quantize_config.json"})
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Calibration data and the whole checkpoint -> checkpoint step


def read_calibration(path: str | os.PathLike, tokenizer: Any, n_samples: int = 128, seq_len: int = 512,
                     ) -> list[torch.Tensor]:
    """Token id rows [1, <=seq_len] from a calibration file.

    ``.txt``: one sample per paragraph (blank-line separated; one per line if there are no blank lines).
    ``.json``/``.jsonl``: records with a ``text`` string, or conversations in any training format (Qwen/ShareGPT,
    OpenAI messages, Alpaca), rendered as ChatML exactly as training renders them.
    """
    from ..data.formats import detect_file_format, read_records, to_conversation
    from ..data.template import ChatMLEncoder
    from ..data.tokenizer import encode_texts

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration file {path} does not exist")
    rows: list[list[int]] = []
    if path.suffix in (".json", ".jsonl"):
        records = [r for r in read_records(path) if r.error is None]
        texts = [r.value["text"] for r in records if isinstance(r.value, dict) and isinstance(r.value.get("text"), str)]
        if texts:
            rows = encode_texts(tokenizer, texts[:n_samples])
        else:
            fmt = detect_file_format(records)
            convs = []
            for r in records:
                try:
                    convs.append(to_conversation(r, fmt))
                except ValueError:
                    continue
                if len(convs) >= n_samples:
                    break
            rows = [s.input_ids for s in ChatMLEncoder(tokenizer, max_len=seq_len).encode(convs)]
    else:
        text = path.read_text(encoding="utf-8")
        parts = [p.strip() for p in text.split("\n\n") if p.strip()]
        if len(parts) <= 1:
            parts = [ln.strip() for ln in text.splitlines() if ln.strip()]
        rows = encode_texts(tokenizer, parts[:n_samples])
    rows = [r[:seq_len] for r in rows if len(r) >= 2][:n_samples]
    if not rows:
        raise GPTQError(f"calibration file {path} yields no samples (need text of at least two tokens)")
    return [torch.tensor([r]) for r in rows]


@dataclass
class QuantizeResult:
    out_dir: Path
    format: str
    algorithm: str
    samples: int
    tokens: int
    layers: int
    cosine: float | None = None  # logits of the written checkpoint (reloaded) vs the full-precision model
    max_abs_diff: float | None = None
    reload_diff: float | None = None  # reloaded checkpoint vs the in-memory quantized model


def _probe(tokenizer: Any, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    from ..export.merge import probe_batch

    return probe_batch(tokenizer, vocab_size)


@torch.no_grad()
def _probe_logits(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    ids, mask = batch
    dev = next(model.parameters()).device
    out = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False)
    return out.logits.float()[mask.to(dev).bool()].cpu()


def compare_logits(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(mean per-token cosine similarity, max abs diff) of two logits tensors [tokens, vocab]."""
    cos = F.cosine_similarity(a.float(), b.float(), dim=-1).mean()
    return float(cos), float((a.float() - b.float()).abs().max())


def quantize_checkpoint(model_dir: str | os.PathLike, out_dir: str | os.PathLike, *, bits: int = 4,
                        group_size: int = 128, sym: bool = True, fmt: str = "v1", calib: str | os.PathLike | None,
                        algorithm: str = "gptq", n_samples: int = 128, seq_len: int = 512,
                        damp_percent: float = 0.01, dtype: str = "fp16", device: str | None = None,
                        overwrite: bool = False, verify: bool = True,
                        progress: Callable[[str], None] | None = None) -> QuantizeResult:
    """Quantize a full-precision checkpoint to a GPTQ checkpoint in the published Int4 layout."""
    from transformers import AutoModelForCausalLM

    from ..data.tokenizer import load_tokenizer
    from . import qwen1  # noqa: F401

    model_dir, out = Path(model_dir), Path(out_dir)
    say = progress or (lambda msg: log.info(msg))
    if fmt not in FORMATS:
        raise GPTQError(f"--format must be v1 or v2, got {fmt!r}")
    if bits not in SUPPORTED_BITS:
        raise GPTQError(f"--bits {bits} is not supported (choose from {SUPPORTED_BITS}; Qwen's Int4 models use 4)")
    if group_size != -1 and (group_size <= 0 or group_size % (32 // bits)):
        raise GPTQError(f"--group-size must be -1 or a positive multiple of {32 // bits}, got {group_size}")
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: not a checkpoint directory (no config.json)")
    if read_quantization_config(model_dir) is not None:
        raise GPTQError(f"{model_dir} is already quantized: quantize the full-precision checkpoint")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise GPTQError(f"output directory {out} is not empty: pass --overwrite to replace it")
    if out.resolve() == model_dir.resolve():
        raise GPTQError("--out must differ from --model")
    if algorithm == "gptq" and calib is None:
        raise GPTQError("GPTQ needs calibration text: pass --calib FILE (or --algorithm rtn for round-to-nearest)")
    spec = GPTQSpec(bits=bits, group_size=group_size, sym=sym, format=FORMATS[fmt])
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")

    tokenizer = load_tokenizer(model_dir)
    samples = read_calibration(calib, tokenizer, n_samples, seq_len) if calib is not None else []
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    linears = quantizable_linears(model, bits)
    if not linears:
        raise GPTQError(f"{model_dir}: no linear layer of the decoder blocks can be quantized to {bits} bits")
    probe = reference = None
    if verify:
        probe = _probe(tokenizer, model.get_input_embeddings().weight.shape[0])
        reference = _probe_logits(model, probe)
    say(f"quantizing {len(linears)} linear layers of {model_dir} to {bits}-bit GPTQ ({fmt}, group {group_size}, "
        f"{'sym' if sym else 'asym'}) with {algorithm.upper()}"
        + (f" on {len(samples)} calibration samples ({sum(s.numel() for s in samples)} tokens)" if samples else ""))
    samples = [s.to(device) for s in samples]
    packed, _reports = quantize_model(model, samples, spec, algorithm, damp_percent, progress=say)
    packed = {n: {k: v.cpu() for k, v in t.items()} for n, t in packed.items()}
    in_memory = _probe_logits(model, probe) if verify else None
    model = model.cpu()
    save_gptq_checkpoint(model, packed, model_dir, out, spec, algorithm, damp_percent, dtype)
    del model
    result = QuantizeResult(out, spec.format, algorithm, len(samples), sum(int(s.numel()) for s in samples),
                            len(packed))
    if verify:
        reloaded = load_gptq_model(out, torch.float32)
        got = _probe_logits(reloaded, probe)
        result.cosine, result.max_abs_diff = compare_logits(got, reference)
        result.reload_diff = float((got - in_memory).abs().max())
        say(f"verified {out}: logits vs the full-precision model: cosine {result.cosine:.5f}, max abs diff "
            f"{result.max_abs_diff:.4g}; vs the in-memory quantized model: max abs diff {result.reload_diff:.3g}")
    return result
