"""Reading what a GPTQ checkpoint really holds before any backend loads it: the zero-point convention, zero points
that gptqmodel's v1 conversion mangles, and the bias tensors AutoGPTQ writes for layers that have none.

Why by hand: the quantization config is not always right about its own tensors, and gptqmodel converts v1 zero
points with one integer add per packed word (``qzeros += 0x11111111`` for 4 bits), which carries into the next
field when a stored v1 zero is ``2**bits - 1`` (a true zero point of 0, what asymmetric quantization gives an
all-positive group). qwen-tune's PyTorch layer unpacks field by field and is exact there, so such checkpoints load
through it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from safetensors import safe_open

from ..checkpoint import weight_files
from ..models import qwen1  # noqa: F401 - registers model_type "qwen" with the Auto classes
from .format import GPTQError, GPTQSpec, unpack_cols

log = logging.getLogger(__name__)


@dataclass
class GPTQCheck:
    spec: GPTQSpec  # the config's spec, with the zero-point format the tensors actually use
    relabeled: bool = False  # config says v1, every zero point is v2's symmetric midpoint: read as v2
    wrapped_zeros: int = 0  # v1 zero points of 0 (stored 2**bits - 1): gptqmodel's conversion gets them wrong
    zero_biases: list[str] = field(default_factory=list)  # all-zero bias tensors of layers without a bias: dropped

    def announce(self, path: Path) -> None:
        """One log line per finding (``inspect_gptq`` does it unless told not to)."""
        if self.relabeled:
            word = sum(1 << (self.spec.bits * i) for i in range(32 // self.spec.bits)) << (self.spec.bits - 1)
            log.warning("%s: the quantization config says GPTQ v1 but every zero point is stored in the v2 "
                        "convention (0x%X words): reading them as v2", path, word)
        if self.zero_biases:
            log.info("%s: dropped %d all-zero bias tensors of layers without a bias (AutoGPTQ writes them), e.g. %s",
                     path, len(self.zero_biases), self.zero_biases[0])

    @property
    def needs_exact_path(self) -> str | None:
        """Why gptqmodel cannot load this checkpoint as is (None when it can)."""
        if self.wrapped_zeros:
            return (f"{self.wrapped_zeros} v1 zero points of 0 (stored 0x{self.spec.maxq:X}), which gptqmodel's v1->v2 "
                    "conversion overflows into the neighbouring zero point")
        if self.relabeled:
            return "its config says v1 (gptq) but its zero points are v2, and transformers reads only the config"
        return None


def linear_biases(path: str | os.PathLike) -> dict[str, bool]:
    """Every nn.Linear of the model the config describes -> whether it has a bias (built on the meta device)."""
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    return {n: m.bias is not None for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def _small_tensors(path: Path):
    """(key, tensor) for the qzeros/bias tensors only, and the names of the qweights (never read)."""
    for f in weight_files(path):
        if f.suffix == ".safetensors":
            with safe_open(str(f), framework="pt") as fh:
                for key in fh.keys():
                    yield key, (fh.get_tensor(key) if key.endswith((".qzeros", ".bias")) else None)
        else:
            for key, t in torch.load(f, map_location="cpu", weights_only=True, mmap=True).items():
                yield key, t


def inspect_gptq(path: str | os.PathLike, spec: GPTQSpec, biases: dict[str, bool] | None = None,
                 announce: bool = True) -> GPTQCheck:
    """Read the qzeros and bias tensors of ``path`` (small: no qweight is unpacked) and check them against ``spec``.

    ``biases`` (module -> has a bias, :func:`linear_biases` by default) decides what a quantized layer's ``bias``
    tensor is: the model's own bias, or AutoGPTQ's placeholder for a layer without one, which must be all zero.
    """
    path = Path(path)
    biases = linear_biases(path) if biases is None else biases
    check = GPTQCheck(spec)
    all_midpoint, seen_zeros = True, False
    placeholder: dict[str, torch.Tensor] = {}
    quantized: set[str] = set()
    for key, t in _small_tensors(path):
        mod, _, leaf = key.rpartition(".")
        if leaf == "qzeros":
            quantized.add(mod)
            z = unpack_cols(t, spec.bits)
            seen_zeros = True
            all_midpoint &= bool((z == 2 ** (spec.bits - 1)).all())
            if spec.v1:
                check.wrapped_zeros += int((z == spec.maxq).sum())
        elif leaf == "qweight":
            quantized.add(mod)
        elif leaf == "bias" and not biases.get(mod, True):
            placeholder[mod] = t
    if spec.v1 and spec.sym and seen_zeros and all_midpoint:
        # v1 stores the symmetric zero 2**(bits-1) minus one (0x77777777 for 4 bits); every word at the midpoint
        # itself (0x88888888) is v2 written under a v1 label: read as v1 it would sit one scale step off.
        check.spec = dataclasses.replace(spec, format="gptq_v2")
        check.relabeled, check.wrapped_zeros = True, 0
    for mod, t in sorted(placeholder.items()):
        if mod not in quantized:
            continue
        nonzero = int((t != 0).sum())
        if nonzero:
            raise GPTQError(f"{path}: {mod}.bias has {nonzero} nonzero values but the model's {mod} has no bias "
                            f"(max |bias| {float(t.abs().max()):.3g}): this checkpoint does not fit the model class, "
                            "refusing rather than dropping them")
        check.zero_biases.append(f"{mod}.bias")
    if announce:
        check.announce(path)
    return check
