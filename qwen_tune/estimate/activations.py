"""The activation model of the estimator: bytes saved for backward per token and layer, by part."""

from __future__ import annotations

from typing import Any

from ..config import Recipe
from .shape import ModelShape


def activation_parts(shape: ModelShape, recipe: Recipe, b: int, a: int, p: int, T: int, rows: int, S: int,
                 targets: Any, autocast: bool) -> dict[str, int]:
    """Activation bytes for T tokens, by part.

    Per token and layer (b = compute dtype bytes): each RMSNorm saves its input upcast to fp32 (4h)
    and its b-byte output (plus the pre-weight tensor when the norm trains); attention saves q, k, v
    after RoPE, its output and the o_proj input; the SwiGLU MLP saves gate, up, silu(gate) and their
    product; each LoRA module saves its dropout mask (1 byte) and dropped input (b bytes) -- with
    dropout 0 only the autocast copy of an fp32 adapter's input. With gradient checkpointing only
    each layer's b-byte input is kept, and one layer is recomputed (plus gradients of its input and
    output) at a time in backward.
    """
    lora = recipe.lora
    h = shape.hidden
    hq = shape.heads * shape.head_dim
    kvd = shape.kv_heads * shape.head_dim
    norm = 4 * h + b * h + (b * h if recipe.method == "full" else 0)
    lora_in: dict[str, int] = {}
    if recipe.method != "full":
        for lin in shape.lora_linears(targets):
            mlp_cproj = shape.model_type == "qwen" and lin.name == "c_proj" and lin.d_in == shape.ff and lin.d_in != hq
            lora_in["c_proj@mlp" if mlp_cproj else lin.name] = lin.d_in
    drop = lora.dropout > 0
    if autocast:  # lora_A saves autocast's b-byte copy of its (dropped) input, next to the 1-byte dropout mask
        per_lora = (1 if drop else 0) + (b if (drop or a != b) else 0)
    else:  # the input is cast to the adapter dtype (a bytes) when it differs, then dropped
        per_lora = (1 + a) if drop else (a if a != b else 0)
    eager = recipe.model.attn_implementation == "eager"
    # LoRA on fused experts: the parametrized (base + delta) expert weights of a MoE layer, kept for backward
    expert_eff = (3 * shape.hidden * shape.moe_ff * shape.experts * p
                  if recipe.method != "full" and shape.expert_lora_params(targets, lora.r) else 0)

    sdpa = recipe.model.attn_implementation == "sdpa"
    # Packed rows run per-sample SDPA (models/packed_attention.py): no mask, and the kernel keeps only each row's
    # logsumexp. Padded rows: transformers passes a boolean mask, which SDPA converts to a new float tensor in
    # every layer and keeps for that layer's backward.
    per_layer_mask = rows * S * S * b if sdpa and not recipe.data.packing and rows > 1 else 0
    layers = scores = worst = 0
    for kind in shape.layer_kinds:
        if kind.attn == "full":
            attn = (b * (3 * hq + 2 * kvd) + ((4 + b) * (hq + kvd) if shape.qk_norm else 0)
                    + (2 * b * hq if shape.attn_gate else 0))
        else:
            attn = b * shape.lin_attn_width
        mlp = 4 * b * kind.mlp_width + kind.moe_tokens * b * h
        lo = sum(per_lora * lora_in[n] + b * lora.r for n in kind.linears if n in lora_in)
        layer = (2 * norm + attn + mlp + lo) * T + (expert_eff if kind.moe_tokens else 0)
        if kind.attn == "full":
            layer += per_layer_mask
        if kind.attn == "full" and eager:  # eager attention keeps softmax probabilities per layer
            quad = rows * shape.heads * S * S * (4 + b)
            layer += quad
            scores += quad * kind.count
        layers += layer * kind.count
        worst = max(worst, layer)
    if sdpa and not recipe.data.packing and rows > 1:
        mask = rows * S * S
    else:
        mask = 0
    return {
        "layers": int(layers),
        "checkpoints": int(b * h * T * shape.layers),
        "recompute": int(worst + 2 * b * h * T),
        "head": int((4 * h + b * h) * T),  # final norm (+ the hidden rows the loss reads)
        "embedding": int(b * h * T),
        "mask": int(mask),  # the boolean mask transformers builds once for padded rows
        "scores": int(scores),
    }
