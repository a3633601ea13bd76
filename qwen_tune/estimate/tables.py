"""Published reference data the estimator is calibrated against: Qwen-1 config.json presets, the memory table of
the Qwen-1 README, and the recipes that model each of its rows."""

from __future__ import annotations

from typing import Any

from ..config import DS_CONFIGS_DIR, Recipe, recipe_from_dict

_QWEN1_COMMON = {"model_type": "qwen", "kv_channels": 128, "no_bias": True, "tie_word_embeddings": False}
QWEN1_PRESETS: dict[str, dict[str, Any]] = {
    # huggingface.co/Qwen/Qwen-1_8B, Qwen-7B, Qwen-14B, Qwen-72B config.json
    "qwen-1.8b": {**_QWEN1_COMMON, "hidden_size": 2048, "num_hidden_layers": 24, "num_attention_heads": 16,
                  "intermediate_size": 11008, "vocab_size": 151936, "seq_length": 8192},
    "qwen-7b": {**_QWEN1_COMMON, "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
                "intermediate_size": 22016, "vocab_size": 151936, "seq_length": 8192},
    "qwen-14b": {**_QWEN1_COMMON, "hidden_size": 5120, "num_hidden_layers": 40, "num_attention_heads": 40,
                 "intermediate_size": 27392, "vocab_size": 152064, "seq_length": 2048},
    "qwen-72b": {**_QWEN1_COMMON, "hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 64,
                 "intermediate_size": 49152, "vocab_size": 152064, "seq_length": 32768},
}

# Qwen-1 README, "Profiling of Memory and Speed" (A100-SXM4-80G, CUDA 11.8, torch 2.0, flash-attention 2,
# batch 1, grad-accum 8, gradient checkpointing, LoRA r=64 on c_attn/c_proj/w1/w2). Values are the "G"
# column: for multi-GPU rows the sum over all GPUs. (model, method, nodes x gpus) -> {seq_len: G}.
QWEN1_PUBLISHED: dict[tuple[str, str, int], dict[int, float]] = {
    ("qwen-1.8b", "lora", 1): {256: 6.7, 512: 7.4, 1024: 8.4, 2048: 11.0, 4096: 16.2, 8192: 21.8},
    ("qwen-1.8b", "lora_emb", 1): {256: 13.7, 512: 14.0, 1024: 14.0, 2048: 15.1, 4096: 19.7, 8192: 27.7},
    ("qwen-1.8b", "qlora", 1): {256: 5.8, 512: 6.0, 1024: 6.6, 2048: 7.8, 4096: 10.2, 8192: 15.8},
    ("qwen-1.8b", "full", 1): {256: 43.5, 512: 43.5, 1024: 43.5, 2048: 43.5, 4096: 47.1, 8192: 48.3},
    ("qwen-7b", "lora", 1): {256: 20.1, 512: 20.4, 1024: 21.5, 2048: 23.8, 4096: 29.7, 8192: 36.6},
    ("qwen-7b", "lora_emb", 1): {256: 33.7, 512: 34.1, 1024: 35.2, 2048: 35.1, 4096: 39.2, 8192: 48.5},
    ("qwen-7b", "qlora", 1): {256: 11.5, 512: 11.5, 1024: 12.3, 2048: 13.9, 4096: 16.9, 8192: 23.5},
    ("qwen-7b", "full", 2): {256: 139.2, 512: 148.0, 1024: 162.0},
    ("qwen-7b", "lora_multinode", 4): {256: 74.7, 512: 77.6, 1024: 84.9, 2048: 95.1, 4096: 121.1, 8192: 155.5},
    ("qwen-14b", "lora", 1): {256: 34.6, 512: 35.1, 1024: 35.3, 2048: 37.4, 4096: 42.5, 8192: 55.2},
    ("qwen-14b", "lora_emb", 1): {256: 51.2, 512: 51.1, 1024: 51.5, 2048: 54.1, 4096: 56.8, 8192: 67.7},
    ("qwen-14b", "qlora", 1): {256: 18.7, 512: 18.4, 1024: 18.9, 2048: 19.9, 4096: 23.0, 8192: 27.9},
    ("qwen-72b", "lora_zero3", 4): {256: 215.4, 512: 217.7, 1024: 222.6, 2048: 228.8, 4096: 249.0, 8192: 289.2},
    ("qwen-72b", "qlora", 1): {256: 61.4, 512: 61.4, 1024: 62.9, 2048: 64.1, 4096: 68.0, 8192: 75.6},
}


def reference_recipe(model: str, method: str, seq_len: int) -> tuple[Recipe, int, dict[str, Any]]:
    """(recipe, gpus, config.json) modelling one row of the Qwen-1 README table with Qwen's own scripts:

    * LoRA / LoRA (emb): finetune_lora_single_gpu.sh -- bf16 torch autocast, no DeepSpeed;
      LoRA (emb) = a base model, so wte + lm_head train as modules_to_save.
    * Q-LoRA: finetune_qlora_single_gpu.sh -- the GPTQ Int4 chat model, fp16, single-GPU ZeRO-2.
    * Full-parameter: finetune_ds.sh -- bf16 DeepSpeed; ZeRO-3 for 7B on 2 GPUs (the README says the
      script uses ZeRO 3; ZeRO-2 could not fit 7B in 2 x 80 GB), ZeRO-2 for 1.8B on 1 GPU (the
      script's current config; see docs/memory_estimator.md for the ZeRO-3 alternative).
    * LoRA (multinode): finetune_lora_ds.sh -- ZeRO-2 over 2 nodes x 2 GPUs.
    * 72B LoRA + ZeRO-3 on 4 GPUs.
    Common: batch 1, grad-accum 8, gradient checkpointing, flash-attention 2, padding to the
    length, LoRA r=64 on c_attn/c_proj/w1/w2 with dropout 0.05.
    """
    cfg = dict(QWEN1_PRESETS[model])
    gpus = {"full": 2 if model == "qwen-7b" else 1, "lora_multinode": 4, "lora_zero3": 4}.get(method, 1)
    ds = {"qlora": "zero2", "full": "zero3" if model == "qwen-7b" else "zero2", "lora_multinode": "zero2",
          "lora_zero3": "zero3"}.get(method)
    data: dict[str, Any] = {
        "model": {"path": f"Qwen/{model}", "attn_implementation": "flash_attention_2"},
        "data": {"max_len": seq_len, "packing": False},
        "method": method if method in ("full", "qlora") else "lora",
        "lora": {"r": 64, "alpha": 16, "dropout": 0.05, "target_modules": ["c_attn", "c_proj", "w1", "w2"],
                 "trainable_embeddings": method == "lora_emb"},
        "training": {"batch_size": 1, "grad_accum": 8, "gradient_checkpointing": True, "loss": "plain",
                     "precision": "fp16" if method == "qlora" else "bf16"},
    }
    if ds:
        data["deepspeed"] = str(DS_CONFIGS_DIR / f"{ds}.json")
    if method == "qlora":
        data["quantization"] = {"method": "gptq"}
        cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    return recipe_from_dict(data), gpus, cfg
