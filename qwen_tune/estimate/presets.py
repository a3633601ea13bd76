"""config.json facts of the published Qwen2.5 / Qwen3 / Qwen3-MoE checkpoints, so `qwen-tune estimate` sizes a
model before anything is downloaded. Only the fields the estimator reads; values from each model's config.json
on huggingface.co/Qwen (the Instruct / post-trained checkpoints: base and Instruct share the architecture).

Qwen3.5 is left out: its config.json facts could not be verified here (use --config path/to/config.json).
"""

from __future__ import annotations

import re
from typing import Any

from .tables import QWEN1_PRESETS


def _qwen25(h: int, ff: int, layers: int, heads: int, kv: int, big: bool) -> dict[str, Any]:
    # 0.5B-3B tie the head to the embedding and have the 151,936-row vocabulary; 7B and up do not, with 152,064.
    return {"model_type": "qwen2", "hidden_size": h, "intermediate_size": ff, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": 152064 if big else 151936,
            "tie_word_embeddings": not big, "max_position_embeddings": 32768}


def _qwen3(h: int, ff: int, layers: int, heads: int, tie: bool, kv: int = 8) -> dict[str, Any]:
    return {"model_type": "qwen3", "hidden_size": h, "intermediate_size": ff, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": 128, "vocab_size": 151936,
            "tie_word_embeddings": tie, "max_position_embeddings": 40960, "attention_bias": False}


def _qwen3_moe(h: int, ff: int, moe_ff: int, layers: int, heads: int) -> dict[str, Any]:
    return {**_qwen3(h, ff, layers, heads, tie=False, kv=4), "model_type": "qwen3_moe",
            "moe_intermediate_size": moe_ff, "num_experts": 128, "num_experts_per_tok": 8,
            "decoder_sparse_step": 1, "mlp_only_layers": []}


MODEL_PRESETS: dict[str, dict[str, Any]] = {
    **QWEN1_PRESETS,
    "qwen2.5-0.5b": _qwen25(896, 4864, 24, 14, 2, big=False),
    "qwen2.5-1.5b": _qwen25(1536, 8960, 28, 12, 2, big=False),
    "qwen2.5-3b": _qwen25(2048, 11008, 36, 16, 2, big=False),
    "qwen2.5-7b": _qwen25(3584, 18944, 28, 28, 4, big=True),
    "qwen2.5-14b": _qwen25(5120, 13824, 48, 40, 8, big=True),
    "qwen2.5-32b": _qwen25(5120, 27648, 64, 40, 8, big=True),
    "qwen2.5-72b": _qwen25(8192, 29568, 80, 64, 8, big=True),
    "qwen3-0.6b": _qwen3(1024, 3072, 28, 16, tie=True),
    "qwen3-1.7b": _qwen3(2048, 6144, 28, 16, tie=True),
    "qwen3-4b": _qwen3(2560, 9728, 36, 32, tie=True),
    "qwen3-8b": _qwen3(4096, 12288, 36, 32, tie=False),
    "qwen3-14b": _qwen3(5120, 17408, 40, 40, tie=False),
    "qwen3-32b": _qwen3(5120, 25600, 64, 64, tie=False),
    "qwen3-30b-a3b": _qwen3_moe(2048, 6144, 768, 48, 32),
    "qwen3-235b-a22b": _qwen3_moe(4096, 12288, 1536, 94, 64),
}

# Checkpoint-name suffixes that do not change the architecture (Qwen/Qwen2.5-7B-Instruct -> qwen2.5-7b).
_SUFFIXES = re.compile(r"(-(instruct|chat|base|thinking|2507|fp8|awq|gptq-int4|gptq-int8|int4|int8))+$")


def preset_key(name: str) -> str | None:
    """The preset a model name or hub id refers to, or None: `qwen2.5-7b`, `Qwen/Qwen2.5-7B-Instruct`,
    `Qwen/Qwen-1_8B-Chat`, `Qwen/Qwen3-30B-A3B-Instruct-2507`."""
    key = name.strip().lower().rsplit("/", 1)[-1].replace("_", ".")
    key = _SUFFIXES.sub("", key)
    return key if key in MODEL_PRESETS else None


def preset_config(name: str) -> dict[str, Any] | None:
    key = preset_key(name)
    return dict(MODEL_PRESETS[key]) if key else None
