"""What training needs to know per Qwen family: LoRA targets and embedding/head names."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import read_json_object


@dataclass(frozen=True)
class Family:
    name: str
    lora_targets: tuple[str, ...]
    embedding: str  # module name of the input embedding
    lm_head: str = "lm_head"


_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_QWEN2_LINEARS = _ATTN + ("gate_proj", "up_proj", "down_proj")
# In transformers 5 the routed experts of MoE models are fused 3-D parameters, not nn.Linear: LoRA on them
# multiplies adapter size by the expert count (and peft then refuses dropout). Defaults stay on attention;
# name expert parameters in lora.target_modules to train them too.
_QWEN3_NEXT_LINEARS = _ATTN + ("in_proj_qkvz", "in_proj_ba", "out_proj")  # + Gated DeltaNet projections
_QWEN3_5_LINEAR_ATTN = ("in_proj_qkv", "in_proj_z", "out_proj")

FAMILIES: dict[str, Family] = {
    "qwen": Family("qwen", ("c_attn", "c_proj", "w1", "w2"), "wte"),
    "qwen2": Family("qwen2", _QWEN2_LINEARS, "embed_tokens"),
    "qwen2_moe": Family("qwen2_moe", _ATTN, "embed_tokens"),
    "qwen3": Family("qwen3", _QWEN2_LINEARS, "embed_tokens"),
    "qwen3_moe": Family("qwen3_moe", _ATTN, "embed_tokens"),
    "qwen3_next": Family("qwen3_next", _QWEN3_NEXT_LINEARS, "embed_tokens"),
    "qwen3_5_text": Family("qwen3_5_text", _QWEN2_LINEARS + _QWEN3_5_LINEAR_ATTN, "embed_tokens"),
    "qwen3_5_moe_text": Family("qwen3_5_moe_text", _ATTN + _QWEN3_5_LINEAR_ATTN, "embed_tokens"),
}


def read_model_type(path: str | Path) -> str:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"{path}: not a checkpoint directory (no config.json)")
    model_type = read_json_object(cfg, str(cfg)).get("model_type")
    if not isinstance(model_type, str):
        raise ValueError(f"{cfg}: cannot read model_type (no `model_type` string)")
    return model_type


def get_family(model_type: str) -> Family:
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    if model_type.startswith("qwen"):
        # A newer Qwen generation: its dense linears almost always follow the Qwen2 naming.
        return Family(model_type, _QWEN2_LINEARS, "embed_tokens")
    raise ValueError(f"model_type {model_type!r} is not a Qwen family supported by qwen-tune "
                     f"(known: {', '.join(FAMILIES)})")


# Gated DeltaNet layers (Qwen3-Next, Qwen3.5) carry a causal-conv window and a recurrent state along the row.
# transformers' torch implementations of both ignore sample boundaries (cu_seqlens / seq_idx are dropped), so
# in a packed row each sample would start from the previous one's state: only the attention layers see the
# block mask.
_RECURRENT_LAYER_TYPES = {"linear_attention"}
_RECURRENT_MODEL_TYPES = {"qwen3_next", "qwen3_5_text", "qwen3_5_moe_text", "qwen3_5", "qwen3_5_moe"}


def packing_is_exact(config: Any) -> bool:
    """Whether padding-free packing keeps the samples of a row independent for this model config."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "model_type", None) in _RECURRENT_MODEL_TYPES:
        return False
    return not set(getattr(text, "layer_types", None) or ()) & _RECURRENT_LAYER_TYPES
