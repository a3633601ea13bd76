"""Per-device training memory estimate from a recipe and a model's config.json (no weights read).

The estimate is a sum of named parts -- weights, gradients, optimizer states, activations, logits,
CUDA/framework overhead -- taken at the largest of three phases of a training step:

* forward/backward: weights + gradients + optimizer states + stored activations + the larger of
  (the LM-head logits at the loss) and (one decoder layer recomputed in backward). The logits are
  freed before the decoder layers run backward, so those two never coexist. Gradients count in
  full: gradient accumulation keeps them alive across micro-batches.
* end of backward: weights + gradients + optimizer states + the freshly computed [vocab, hidden]
  gradient of a trainable embedding / lm_head before it is added into the accumulated one.
* optimizer step: weights + gradients + optimizer states + step temporaries (DeepSpeed's fp32
  copy of the gradient partition; HF's default fused AdamW needs none).

Overhead is a fixed CUDA context plus a share of the rest for caching-allocator slack, plus
NCCL / DeepSpeed bucket / dequantization buffers where they apply.

Assumptions: tokens per micro-step are ``batch_size * max_len`` (packing concatenates
``batch_size`` samples of at most ``max_len`` tokens; padding pads to the longest), i.e. the worst
case, and every token is supervised (an upper bound for the chunked loss). The model, its
calibration against Qwen's published numbers and its limits are in docs/memory_estimator.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..config import ConfigError, Recipe, read_json_object
from ..models.families import get_family
from .distributed import check_combination
from .loss import estimate_logits_bytes

__all__ = ["ModelShape", "MemoryEstimate", "estimate_memory", "load_model_config", "QWEN1_PRESETS",
           "QWEN1_PUBLISHED", "reference_recipe", "reference_comparison", "GB"]

GB = 1e9  # the reported unit (the Qwen README's "G" columns are 10^9 bytes, see the docs)

# --------------------------------------------------------------------------- constants
# CUDA context + cuBLAS workspace on one device, as nvidia-smi counts it.
CUDA_CONTEXT_BYTES = int(1.0e9)
# Caching-allocator slack (reserved but unused blocks), as a share of everything allocated.
ALLOCATOR_SLACK = 0.05
# NCCL communicators and buffers, per device, when more than one device trains.
NCCL_BYTES = int(0.6e9)
# Bytes per parameter of a 4-bit quantized weight, scales included.
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit codes, 8-bit absmax per 64, fp32 per 256 absmax (double quant)
NF4_BYTES_NO_DQ = 0.5 + 4 / 64  # 4-bit codes, fp32 absmax per 64
GPTQ_BYTES = 0.5 + 2 / 128 + 0.5 / 128  # 4-bit codes, fp16 scale + 4-bit zero per group of 128
# The chunked loss holds, per chunk, the head's logits (compute dtype), their fp32 copy, the logsumexp
# temporary and the compute-dtype gradient: three fp32-sized [rows, vocab] buffers in bf16 (two in fp32);
# the plain loss's log-softmax + NLL backward holds three too. `estimate_logits_bytes` counts two fp32 ones.
LOSS_PEAK_FACTOR = 1.5

_DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# MoE families whose fused experts peft 0.21 + transformers 5 adapt (transformers' conversion table maps them to
# qwen2_moe's v4 layout; qwen2_moe itself is not converted, so its experts get no LoRA).
PEFT_MOE_CONVERTED = frozenset({"qwen3_moe", "qwen3_next", "qwen3_omni_moe", "qwen3_omni_moe_thinker",
                                "qwen3_omni_moe_text"})


# --------------------------------------------------------------------------- model shapes

@dataclass(frozen=True)
class Linear:
    """One kind of nn.Linear inside the decoder blocks, `count` instances in the whole model."""

    name: str
    d_in: int
    d_out: int
    count: int
    bias: bool = False

    @property
    def params(self) -> int:
        return (self.d_in * self.d_out + (self.d_out if self.bias else 0)) * self.count


@dataclass(frozen=True)
class LayerKind:
    """Per-token activation inputs of one kind of decoder layer (`count` such layers)."""

    count: int
    attn: str  # "full" or "linear" (Gated DeltaNet)
    mlp_width: int  # per-token width of each saved MLP tensor (dense ff, or top-k routed + shared)
    linears: tuple[str, ...]  # names of the Linear kinds a token passes through in this layer
    moe_tokens: int = 0  # extra per-token hidden copies gathered for routed experts (top-k)


@dataclass(frozen=True)
class ModelShape:
    model_type: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ff: int  # width of one dense MLP branch (Qwen-1: intermediate_size // 2)
    tied: bool
    linears: tuple[Linear, ...]
    other_block_params: int  # norms, conv1d, A_log, routers ... (never quantized)
    fused_expert_params: int  # MoE experts stored as 3-D parameters (no nn.Linear: no LoRA, no bnb)
    layer_kinds: tuple[LayerKind, ...]
    qk_norm: bool = False
    attn_gate: bool = False
    lin_attn_width: int = 0  # per-token width of a linear-attention layer's saved projections
    moe_layers: int = 0
    experts: int = 0
    moe_ff: int = 0
    notes: tuple[str, ...] = ()

    # ---- parameter counts
    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def lm_head_params(self) -> int:
        return 0 if self.tied else self.vocab * self.hidden

    @property
    def linear_params(self) -> int:
        return sum(lin.params for lin in self.linears)

    @property
    def linear_weight_params(self) -> int:
        return sum(lin.d_in * lin.d_out * lin.count for lin in self.linears)

    @property
    def total_params(self) -> int:
        return (self.embed_params + self.lm_head_params + self.linear_params + self.other_block_params
                + self.fused_expert_params + self.hidden)  # + final norm

    @property
    def largest_layer_params(self) -> int:
        per_layer = (self.linear_params + self.other_block_params + self.fused_expert_params) / max(self.layers, 1)
        return int(per_layer)

    @property
    def peft_converts_experts(self) -> bool:
        """peft (>= 0.18 with transformers 5) maps LoRA targets gate_proj/up_proj/down_proj (and the router
        `gate`) of these MoE families onto the fused 3-D expert parameters, and then no longer matches
        nn.Linear modules of those names (shared experts, dense MLP layers)."""
        return self.moe_layers > 0 and self.model_type in PEFT_MOE_CONVERTED

    def _target_names(self, targets: Any) -> set[str]:
        if targets == "all-linear":
            names = {lin.name for lin in self.linears}
            return names | ({"gate_proj", "up_proj", "down_proj", "gate"} if self.peft_converts_experts else set())
        return {targets} if isinstance(targets, str) else set(targets)

    def lora_linears(self, targets: Any) -> list[Linear]:
        """The block nn.Linear kinds peft's LoRA wraps for `target_modules` (names match the module's last part)."""
        names = self._target_names(targets)
        if self.peft_converts_experts:
            names -= {"gate_proj", "up_proj", "down_proj"}
        return [lin for lin in self.linears if lin.name in names]

    def expert_lora_params(self, targets: Any, r: int) -> int:
        """LoRA on fused MoE experts (peft ParamWrapper): rank r per expert, 2r on gate_up_proj when both
        gate_proj and up_proj are targeted; plus the router weight when `gate` is targeted."""
        if not self.peft_converts_experts:
            return 0
        names = self._target_names(targets)
        h, E, f = self.hidden, self.experts, self.moe_ff
        n = len(names & {"gate_proj", "up_proj"}) * r * E * (h + 2 * f)
        n += (r * E * (f + h)) if "down_proj" in names else 0
        n += (r * (h + E)) if "gate" in names else 0
        return n * self.moe_layers

    def lora_params(self, targets: Any, r: int) -> int:
        return (sum(r * (lin.d_in + lin.d_out) * lin.count for lin in self.lora_linears(targets))
                + self.expert_lora_params(targets, r))

    # ---- construction
    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "ModelShape":
        cfg = dict(cfg)
        notes: list[str] = []
        if "hidden_size" not in cfg and isinstance(cfg.get("text_config"), dict):
            top = cfg
            cfg = dict(cfg["text_config"])
            cfg.setdefault("model_type", top.get("model_type", "qwen2"))
            cfg.setdefault("tie_word_embeddings", top.get("tie_word_embeddings", False))
            cfg.setdefault("vocab_size", top.get("vocab_size"))
            notes.append("multimodal checkpoint: only the language model is counted (vision/audio towers excluded)")
        model_type = str(cfg.get("model_type", "qwen2"))
        try:
            h = int(cfg["hidden_size"])
            L = int(cfg["num_hidden_layers"])
            heads = int(cfg["num_attention_heads"])
            V = int(cfg["vocab_size"])
        except (KeyError, TypeError) as e:
            raise ConfigError(f"config.json lacks {e} needed for the memory estimate") from None
        if model_type == "qwen":
            return cls._qwen1(cfg, h, L, heads, V, notes)
        return cls._qwen2plus(cfg, model_type, h, L, heads, V, notes)

    @classmethod
    def _qwen1(cls, cfg: dict, h: int, L: int, heads: int, V: int, notes: list[str]) -> "ModelShape":
        hd = int(cfg.get("kv_channels", h // heads))
        ff = int(cfg.get("intermediate_size", 22016)) // 2  # w1 and w2 are intermediate_size // 2 wide
        proj = heads * hd
        bias = not cfg.get("no_bias", True)
        linears = (
            Linear("c_attn", h, 3 * proj, L, bias=True),  # c_attn keeps its bias even with no_bias
            Linear("c_proj", proj, h, L, bias=bias),
            Linear("w1", h, ff, L, bias=bias),
            Linear("w2", h, ff, L, bias=bias),
            Linear("c_proj", ff, h, L, bias=bias),  # mlp.c_proj: target "c_proj" matches both
        )
        kind = LayerKind(L, "full", ff, ("c_attn", "c_proj", "w1", "w2", "c_proj@mlp"))
        return cls("qwen", V, h, L, heads, heads, hd, ff, bool(cfg.get("tie_word_embeddings", False)),
                   linears, other_block_params=2 * h * L, fused_expert_params=0, layer_kinds=(kind,),
                   notes=tuple(notes))

    @classmethod
    def _qwen2plus(cls, cfg: dict, model_type: str, h: int, L: int, heads: int, V: int,
                   notes: list[str]) -> "ModelShape":
        kv = int(cfg.get("num_key_value_heads") or heads)
        hd = int(cfg.get("head_dim") or h // heads)
        ff = int(cfg.get("intermediate_size") or 4 * h)
        tied = bool(cfg.get("tie_word_embeddings", False))
        qkv_bias = bool(cfg.get("attention_bias", model_type in ("qwen2", "qwen2_moe", "qwen2_vl", "qwen2_5_vl")))
        qk_norm = model_type.startswith("qwen3")
        hybrid = model_type in ("qwen3_next",) or model_type.startswith("qwen3_5") or "linear_num_key_heads" in cfg
        attn_gate = hybrid or bool(cfg.get("attn_output_gate", False))

        # Which layers are full attention / linear attention, dense MLP / MoE.
        layer_types = cfg.get("layer_types")
        if hybrid and not layer_types:
            interval = int(cfg.get("full_attention_interval", 4))
            layer_types = ["linear_attention" if (i + 1) % interval else "full_attention" for i in range(L)]
        if hybrid:
            n_lin = sum(1 for t in layer_types if t == "linear_attention")
        else:
            n_lin = 0
        n_full = L - n_lin

        experts = int(cfg.get("num_experts") or cfg.get("n_routed_experts") or 0)
        if experts:
            topk = int(cfg.get("num_experts_per_tok", 8))
            moe_ff = int(cfg.get("moe_intermediate_size") or ff)
            shared_ff = int(cfg.get("shared_expert_intermediate_size") or 0)
            step = int(cfg.get("decoder_sparse_step", 1) or 1)
            mlp_only = set(cfg.get("mlp_only_layers") or [])
            moe_idx = [i for i in range(L) if i not in mlp_only and (i + 1) % step == 0]
            n_moe = len(moe_idx)
        else:
            topk = moe_ff = shared_ff = n_moe = 0
        n_dense = L - n_moe

        q_out = heads * hd * (2 if attn_gate else 1)
        linears: list[Linear] = []
        if n_full:
            linears += [Linear("q_proj", h, q_out, n_full, qkv_bias), Linear("k_proj", h, kv * hd, n_full, qkv_bias),
                        Linear("v_proj", h, kv * hd, n_full, qkv_bias), Linear("o_proj", heads * hd, h, n_full)]
        other = 2 * h * L + (2 * hd * n_full if qk_norm else 0)
        lin_width = 0
        if n_lin:
            nk = int(cfg.get("linear_num_key_heads", 16))
            nv = int(cfg.get("linear_num_value_heads", 32))
            dk = int(cfg.get("linear_key_head_dim", 128))
            dv = int(cfg.get("linear_value_head_dim", 128))
            kernel = int(cfg.get("linear_conv_kernel_dim", 4))
            qkv_dim = 2 * nk * dk + nv * dv
            if model_type == "qwen3_next":
                linears += [Linear("in_proj_qkvz", h, qkv_dim + nv * dv, n_lin), Linear("in_proj_ba", h, 2 * nv, n_lin)]
            else:
                linears += [Linear("in_proj_qkv", h, qkv_dim, n_lin), Linear("in_proj_z", h, nv * dv, n_lin),
                            Linear("in_proj_b", h, nv, n_lin), Linear("in_proj_a", h, nv, n_lin)]
            linears.append(Linear("out_proj", nv * dv, h, n_lin))
            other += n_lin * (qkv_dim * kernel + 2 * nv + dv)
            lin_width = 2 * qkv_dim + 3 * nv * dv  # projections, conv output, gated norm, output
            notes.append("hybrid linear-attention layers: activation model is approximate")
        if n_dense:
            linears += [Linear("gate_proj", h, ff, n_dense), Linear("up_proj", h, ff, n_dense),
                        Linear("down_proj", ff, h, n_dense)]
        fused = 0
        if n_moe:
            fused = n_moe * experts * 3 * h * moe_ff
            other += n_moe * experts * h  # router
            if shared_ff:
                linears += [Linear("gate_proj", h, shared_ff, n_moe), Linear("up_proj", h, shared_ff, n_moe),
                            Linear("down_proj", shared_ff, h, n_moe), Linear("shared_expert_gate", h, 1, n_moe)]
            notes.append(f"MoE: {experts} experts, top-{topk}; the routed experts are fused 3-D parameters in "
                         "transformers 5: 4-bit quantization leaves them in 16-bit"
                         + ("" if model_type in PEFT_MOE_CONVERTED else ", and LoRA does not reach them"))
        kinds: list[LayerKind] = []
        attn_names = ("q_proj", "k_proj", "v_proj", "o_proj")
        lin_names = tuple(lin.name for lin in linears if lin.name.startswith(("in_proj", "out_proj")))
        dense_names = ("gate_proj", "up_proj", "down_proj")
        for is_lin in (False, True):
            for is_moe in (False, True):
                n = sum(1 for i in range(L)
                        if (is_lin == (bool(layer_types) and layer_types[i] == "linear_attention"))
                        and (is_moe == (n_moe > 0 and i in set(moe_idx))))
                if not n:
                    continue
                names = (lin_names if is_lin else attn_names) + (
                    ("gate_proj", "up_proj", "down_proj", "shared_expert_gate") if (is_moe and shared_ff)
                    else (() if is_moe else dense_names))
                width = (topk * moe_ff + shared_ff) if is_moe else ff
                kinds.append(LayerKind(n, "linear" if is_lin else "full", width, names,
                                       moe_tokens=topk if is_moe else 0))
        return cls(model_type, V, h, L, heads, kv, hd, ff, tied, tuple(linears), other_block_params=other,
                   fused_expert_params=fused, layer_kinds=tuple(kinds), qk_norm=qk_norm, attn_gate=attn_gate,
                   lin_attn_width=lin_width, moe_layers=n_moe, experts=experts, moe_ff=moe_ff, notes=tuple(notes))


# --------------------------------------------------------------------------- presets (published config.json values)

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
    from ..config import recipe_from_dict

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
        data["deepspeed"] = str(Path(__file__).resolve().parents[2] / "ds_configs" / f"{ds}.json")
    if method == "qlora":
        data["quantization"] = {"method": "gptq"}
        cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    return recipe_from_dict(data), gpus, cfg


# --------------------------------------------------------------------------- result


@dataclass
class MemoryEstimate:
    """Bytes per device. `total` is the peak over the phases of a step (module docstring)."""

    weights: int
    gradients: int
    optimizer: int
    activations: int  # stored activations + (with gradient checkpointing) one recomputed layer
    logits: int
    overhead: int
    total: int
    activations_stored: int = 0
    activations_recompute: int = 0
    step_transient: int = 0
    grad_transient: int = 0  # end of backward: freshly computed vocab-matrix gradients before accumulation
    peak_phase: str = "forward/backward"
    forward_backward: int = 0  # peak of each phase, overhead included; total = the largest
    backward_end: int = 0
    optimizer_step: int = 0
    cpu_offload: int = 0  # host RAM per device process for offloaded states
    params_total: int = 0
    params_trainable: int = 0
    lora_params: int = 0
    tokens_per_step: int = 0
    gpus: int = 1
    zero_stage: Optional[int] = None
    precision: str = "bf16"
    weight_dtype: str = "bf16"
    method: str = "lora"
    activation_parts: dict[str, int] = field(default_factory=dict)
    details: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def state_peak(self) -> int:
        """The peak without CUDA/framework overhead or DeepSpeed buffers: the largest of weights + gradients +
        optimizer states + (stored activations + max(logits, recomputed layer) | embedding-grad temporaries |
        step temporaries). This is what a CPU run can measure."""
        common = self.weights + self.gradients + self.optimizer
        return common + max(self.activations_stored + max(self.logits, self.activations_recompute),
                            self.grad_transient, self.step_transient)

    @property
    def training_state(self) -> int:
        """weights + gradients + optimizer states + activations + logits (no overhead)."""
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits

    def table(self, unit: str = "GB") -> str:
        div = {"GB": 1e9, "GiB": 2**30}[unit]

        def fmt(x: float) -> str:
            return f"{x / div:9.2f} {unit}"

        engine = "no DeepSpeed" if self.zero_stage is None else f"DeepSpeed ZeRO-{self.zero_stage}"
        lines = [
            f"per-device memory estimate: {self.method}; {self.precision} compute, {self.weight_dtype} weights; "
            f"{engine}; {self.gpus} device(s)",
            f"parameters: {self.params_total / 1e9:.3f} B, trainable {self.params_trainable / 1e6:,.1f} M"
            + (f" (LoRA {self.lora_params / 1e6:,.1f} M)" if self.lora_params else ""),
            f"tokens per micro-step: {self.tokens_per_step:,} = batch_size x max_len (worst case; packing keeps "
            "it; all tokens supervised)",
            "",
        ]
        for name, val, key in (("weights", self.weights, "weights"), ("gradients", self.gradients, "gradients"),
                               ("optimizer states", self.optimizer, "optimizer"),
                               ("activations", self.activations, "activations"), ("logits", self.logits, "logits"),
                               ("embedding-grad temporaries", self.grad_transient, "grad_tmp"),
                               ("optimizer-step temporaries", self.step_transient, "step"),
                               ("CUDA/framework overhead", self.overhead, "overhead")):
            lines.append(f"  {name:27s}{fmt(val)}   {self.details.get(key, '')}".rstrip())
        lines.append("  " + "-" * 40)
        lines.append(f"  {'total (peak)':27s}{fmt(self.total)}   at the {self.peak_phase} phase "
                     f"(forward/backward {self.forward_backward / div:.2f}, end of backward "
                     f"{self.backward_end / div:.2f}, optimizer step {self.optimizer_step / div:.2f} {unit})")
        if self.gpus > 1:
            lines.append(f"  {'all devices':27s}{fmt(self.total * self.gpus)}")
        if self.cpu_offload:
            lines.append(f"  {'host RAM for offload':27s}{fmt(self.cpu_offload)}   per device process")
        lines.append("")
        lines.append("peak = weights + gradients + optimizer states + overhead + the largest of: stored activations "
                     "+ max(logits, recomputed layer); embedding-grad temporaries; optimizer-step temporaries")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


# --------------------------------------------------------------------------- inputs


def load_model_config(recipe: Recipe) -> dict[str, Any]:
    """config.json of model.from_config / model.path (a local directory, or a hub id whose config.json is
    already in the local HF cache; nothing is downloaded). Never touches weights."""
    if recipe.model.from_config:
        path: Optional[Path] = Path(recipe.model.from_config)
    else:
        local = Path(recipe.model.path or "")
        path = local / "config.json" if local.is_dir() else None
        if path is None and recipe.model.path and recipe.model.path.count("/") == 1 and not local.exists():
            try:
                from huggingface_hub import hf_hub_download

                path = Path(hf_hub_download(recipe.model.path, "config.json", local_files_only=True))
            except Exception:  # noqa: BLE001 - not cached, or no hub client: explained below
                path = None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"no config.json for model {recipe.model.from_config or recipe.model.path!r}: set "
                                "model.path to a local checkpoint directory, or pass --config path/to/config.json "
                                f"(or a preset: {', '.join(QWEN1_PRESETS)})")
    return read_json_object(path, str(path))


def _ds_config(path: Optional[str]) -> dict[str, Any]:
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"deepspeed: config file {path} not found")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed: {path} is not valid JSON: {e}") from None


def _num(v: Any, auto: float) -> float:
    return auto if v in (None, "auto") else float(v)


def _is_chat(recipe: Recipe, cfg: dict[str, Any]) -> bool:
    if recipe.model.is_chat is not None:
        return recipe.model.is_chat
    if "qwen_tune_is_chat" in cfg:
        return bool(cfg["qwen_tune_is_chat"])
    if recipe.model.path and (Path(recipe.model.path) / "config.json").is_file():
        from ..models.loading import detect_is_chat

        return detect_is_chat(recipe.model.path)
    name = (recipe.model.path or "").lower()
    return "chat" in name or "instruct" in name or not name


def _quant_method(recipe: Recipe, cfg: dict[str, Any]) -> str:
    if recipe.method != "qlora":
        return "none"
    if recipe.quantization.method != "none":
        return recipe.quantization.method
    q = cfg.get("quantization_config") or {}
    return "gptq" if q.get("quant_method") == "gptq" else "nf4"


# --------------------------------------------------------------------------- estimate


def estimate_memory(recipe: Recipe, gpus: int = 1, model_config: dict[str, Any] | None = None, *,
                    reference: bool = False) -> MemoryEstimate:
    """Estimate per-device training memory for `recipe` on `gpus` devices.

    `model_config` is a config.json dict (default: the recipe's own config.json, read without weights).
    `reference=True` models Qwen's 2023 finetune.py where it differs from qwen-tune: the original
    Qwen-1 loss (logits, a shifted copy and the cross-entropy in the compute dtype -- fp32 under
    torch autocast, 16-bit under DeepSpeed) and torch's foreach AdamW (one parameter-sized
    temporary at the step); the recipe's `training.loss` is then ignored.
    """
    if gpus < 1:
        raise ConfigError(f"--gpus must be >= 1, got {gpus}")
    cfg = model_config if model_config is not None else load_model_config(recipe)
    shape = ModelShape.from_config(cfg)
    t, lora = recipe.training, recipe.lora
    notes: list[str] = list(shape.notes)
    details: dict[str, str] = {}

    # ---- precision and engine
    if t.precision == "auto":
        precision = "fp32" if t.use_cpu else "bf16"
        notes.append("training.precision=auto taken as " + ("fp32 (use_cpu)" if t.use_cpu else
                     "bf16 (an Ampere or newer GPU; older GPUs train in fp16: same estimate)"))
    else:
        precision = t.precision
    b = _DTYPE_BYTES[precision]  # compute dtype bytes
    half = b == 2
    weight_dtype = recipe.model.dtype if recipe.model.dtype != "auto" else precision
    p = _DTYPE_BYTES[weight_dtype]
    ds = _ds_config(recipe.deepspeed)
    zo = ds.get("zero_optimization", {}) if ds else {}
    stage: Optional[int] = int(zo.get("stage", 0)) if ds else None
    fsdp = (recipe.fsdp or "").lower()
    if fsdp and stage is None:
        stage_like = 3 if ("full_shard" in fsdp or "hybrid_shard" in fsdp) else 2 if "shard_grad_op" in fsdp else 0
        notes.append(f"FSDP ({recipe.fsdp}) approximated as ZeRO-{stage_like}-like sharding in the parameters' own "
                     "dtype (no fp32 master copy)")
    else:
        stage_like = stage if stage is not None else 0
    off_opt = str((zo.get("offload_optimizer") or {}).get("device", "none")) == "cpu"
    off_par = str((zo.get("offload_param") or {}).get("device", "none")) == "cpu"
    d = gpus
    shard_opt = d if stage_like >= 1 else 1
    shard_grad = d if stage_like >= 2 else 1
    shard_par = d if stage_like >= 3 else 1
    mixed = bool(ds) and half  # DeepSpeed: 16-bit module + fp32 master weights and Adam states
    if mixed:
        p = b  # the DeepSpeed engine casts the module to its bf16/fp16 setting
    autocast = half and not ds  # HF Trainer without DeepSpeed trains under torch.autocast

    # ---- which parameters train
    family = get_family(shape.model_type)
    targets = lora.target_modules if lora.target_modules != "auto" else list(family.lora_targets)
    N = shape.total_params
    q_method = _quant_method(recipe, cfg)
    lora_n = emb_train = 0
    if recipe.method == "full":
        trainable_n = N
        if t.freeze:
            notes.append("training.freeze is not modelled: every parameter counted as trainable")
        check_combination(recipe)
    else:
        lora_n = shape.lora_params(targets, lora.r)
        if lora_n == 0:
            raise ConfigError(f"lora.target_modules {targets!r} match no linear layer of this {shape.model_type} model")
        if lora.modules_to_save is not None:
            wanted = bool(lora.modules_to_save)
        elif lora.trainable_embeddings is not None:
            wanted = lora.trainable_embeddings
        else:
            wanted = not _is_chat(recipe, cfg)
        if wanted and recipe.method == "qlora":
            notes.append("Q-LoRA: embeddings/lm_head stay frozen (a quantized base cannot train them)")
            wanted = False
        check_combination(recipe, trainable_embeddings=wanted)
        if shape.expert_lora_params(targets, lora.r):
            notes.append("LoRA reaches the fused MoE experts (peft ParamWrapper): each forward materializes the "
                         "experts' effective 16-bit weights layer by layer (counted in activations)")
            if lora.dropout > 0:
                notes.append("peft refuses lora.dropout != 0 on fused MoE experts: set lora.dropout=0 to train "
                             "this recipe")
        if wanted:
            emb_train = 2 * shape.vocab * shape.hidden  # trainable copies of the embedding and lm_head modules
            notes.append("trainable embeddings: peft trains copies of the embedding and lm_head (2 x vocab x hidden "
                         "params) next to the frozen originals")
        trainable_n = lora_n + emb_train

    # ---- bytes per trainable parameter (storage dtype a) and the frozen base
    if recipe.method == "full":
        a = p
    elif mixed:
        a = b
    else:
        a = 4 if (p == 2 or recipe.method == "qlora") else p  # peft autocasts 16-bit adapters to fp32
    emb_a = p  # modules_to_save copies keep the base dtype
    if recipe.method == "qlora":
        qbytes = {"gptq": GPTQ_BYTES, "nf4": NF4_BYTES if recipe.quantization.double_quant else NF4_BYTES_NO_DQ}[
            q_method]
        quantized = shape.linear_weight_params
        rest = N - quantized
        # peft's prepare_model_for_kbit_training upcasts every other 16-bit parameter to fp32 (not for GPTQ)
        rest_bytes = 2 if (q_method == "gptq" or mixed) else 4
        frozen_bytes = quantized * qbytes + rest * rest_bytes
        details["weights"] = (f"{q_method} 4-bit block linears ({quantized / 1e9:.2f} B params) + {rest / 1e9:.2f} B "
                              f"others in {'fp32' if rest_bytes == 4 else '16-bit'}")
        if shape.fused_expert_params and rest_bytes == 4:
            notes.append("Q-LoRA on this MoE: the fused expert weights are not quantized and are upcast to fp32")
    elif recipe.method == "lora":
        frozen_bytes = N * p
        details["weights"] = f"base {N / 1e9:.2f} B params x {p} B"
    else:
        frozen_bytes = 0
        details["weights"] = f"{N / 1e9:.2f} B params x {p} B"
    train_bytes = N * p if recipe.method == "full" else lora_n * a + emb_train * emb_a
    if recipe.method != "full":
        details["weights"] += f" + trainable {trainable_n / 1e6:,.1f} M"

    if stage_like >= 3:
        weights = 0.0 if off_par else (frozen_bytes + train_bytes) / shard_par
        # gathered parameters in flight: the larger of (lm_head/embedding, two decoder layers) + the prefetch bucket
        prefetch = _num(zo.get("stage3_prefetch_bucket_size"), 0.9 * shape.hidden ** 2)
        gathered = b * (max(shape.vocab * shape.hidden, 2 * shape.largest_layer_params) + prefetch)
        weights += gathered
        details["weights"] += (f"; {'offloaded to CPU' if off_par else f'partitioned over {d}'}, "
                               f"+{gathered / GB:.2f} GB gathered working set")
    else:
        weights = frozen_bytes + train_bytes

    # ---- gradients, optimizer states, step temporaries
    grad_bytes = N * p if recipe.method == "full" else lora_n * a + emb_train * emb_a
    cpu_offload = 0.0
    if ds:
        if mixed:
            master_adam = trainable_n * 12
            if stage_like >= 3:  # ZeRO-3 steps one sub-group at a time: fp32 gradients of <= sub_group_size params
                sub = _num(zo.get("sub_group_size"), 1e9)
                step_tmp = 4 * min(trainable_n / shard_opt, sub) * shard_opt
            else:  # fp32 copy of the gradient partition + the flattened 16-bit gradients it is made from
                step_tmp = trainable_n * (4 + b)
            opt_detail = "fp32 master weights + fp32 Adam m, v (12 B/param)"
            if stage_like == 0 and precision == "bf16":
                grad_bytes = trainable_n * 4  # DeepSpeed's BF16_Optimizer accumulates gradients in fp32
        else:
            master_adam, step_tmp = trainable_n * 8, 0
            opt_detail = "Adam m, v (8 B/param)"
        gradients = grad_bytes / shard_grad
        optimizer = master_adam / shard_opt
        step_transient = step_tmp / shard_opt
        if off_opt:
            cpu_offload += optimizer + step_transient
            optimizer = step_transient = 0.0
            opt_detail += ", offloaded to CPU"
        if off_par:
            cpu_offload += (frozen_bytes + train_bytes) / shard_par
        details["optimizer"] = opt_detail + (f", partitioned over {d}" if shard_opt > 1 and not off_opt else "")
        details["gradients"] = (f"{b} B/param" + (f", partitioned over {d}" if shard_grad > 1 else ""))
        if step_transient:
            details["step"] = "fp32 gradients for the optimizer (step only)"
    else:
        gradients = grad_bytes / shard_grad
        optimizer = 2 * grad_bytes / shard_opt  # AdamW m, v in the trainable parameters' dtype
        # HF's default optimizer (adamw_torch_fused) updates in place; the 2023 reference ran torch's
        # foreach AdamW, whose sqrt(v) is one parameter-sized temporary.
        step_transient = grad_bytes / shard_opt if reference else 0.0
        gd = a if recipe.method != "full" else p
        details["optimizer"] = f"AdamW m, v in the trainable parameters' dtype ({2 * gd} B/param)"
        details["gradients"] = f"{gd} B/param" + (f", sharded over {d}" if shard_grad > 1 else "")
        if step_transient:
            details["step"] = "foreach AdamW temporary (step only)"
        if recipe.method == "full" and p == 2:
            notes.append(f"full training without DeepSpeed: {weight_dtype} weights, gradients and AdamW states, no "
                         "fp32 master copy (8 B/param); model.dtype=fp32 keeps fp32 weights and states (16 B/param), "
                         "a DeepSpeed config keeps fp32 master weights + Adam states (16 B/param + fp32 gradients "
                         "at the step)")
    if recipe.method != "full" and a == 4 and not ds:
        notes.append("LoRA adapters train in fp32 (peft upcasts 16-bit adapters): 16 B per adapter param")

    # ---- activations
    T = t.batch_size * recipe.data.max_len
    rows, S = (1, T) if recipe.data.packing else (t.batch_size, recipe.data.max_len)
    parts = _activations(shape, recipe, b, a, p, T, rows, S, targets, autocast)
    if t.gradient_checkpointing:
        act_stored = parts["checkpoints"] + parts["head"] + parts["embedding"] + parts["mask"]
        act_recompute = parts["recompute"]
        details["activations"] = (f"{shape.layers} layer inputs {parts['checkpoints'] / GB:.2f} + one recomputed "
                                  f"layer {act_recompute / GB:.2f} GB (gradient checkpointing)")
    else:
        act_stored = parts["layers"] + parts["head"] + parts["embedding"] + parts["mask"]
        act_recompute = 0
        details["activations"] = f"all {shape.layers} layers kept (no gradient checkpointing)"
    if parts["mask"] > 0.05 * GB:
        details["activations"] += f"; {S}x{S} attention mask {parts['mask'] / GB:.2f} GB (flash_attention_2 has none)"
    if parts["scores"]:
        details["activations"] += f"; eager attention scores {parts['scores'] / GB:.2f} GB (use sdpa/flash)"

    # ---- logits
    V = shape.vocab
    if reference:
        loss_bytes = 4 if (autocast or not half) else b  # Qwen-1's own loss: 16-bit under DeepSpeed
        logits = LOSS_PEAK_FACTOR * estimate_logits_bytes(T, V, None) * loss_bytes / 4
        details["logits"] = (f"Qwen-1 reference loss: {T:,} x {V:,} in "
                             f"{'fp32' if loss_bytes == 4 else precision}")
    elif t.loss == "chunked":
        logits = LOSS_PEAK_FACTOR * estimate_logits_bytes(T, V, t.loss_chunk_size)
        details["logits"] = f"chunked loss: {min(t.loss_chunk_size, T):,} rows x {V:,} vocab in fp32 at a time"
    else:
        logits = LOSS_PEAK_FACTOR * estimate_logits_bytes(T, V, None)
        details["logits"] = f"plain loss: {T:,} rows x {V:,} vocab in fp32"
        if T > t.loss_chunk_size:
            chunked = LOSS_PEAK_FACTOR * estimate_logits_bytes(T, V, t.loss_chunk_size)
            notes.append(f"training.loss=chunked would hold {chunked / GB:.2f} GB of logits instead of "
                         f"{logits / GB:.2f} GB")

    # ---- end of backward: the embedding / lm_head gradients are produced as new [vocab, hidden] tensors and
    # then added into the accumulated .grad (or a ZeRO bucket); a tied matrix sums its two uses first.
    vh = shape.vocab * shape.hidden
    if recipe.method == "full":
        grad_transient = vh * p * (3 if shape.tied else 1)
    elif emb_train:
        grad_transient = vh * emb_a
    else:
        grad_transient = 0
    if grad_transient:
        times = "3 x " if recipe.method == "full" and shape.tied else ""
        details["grad_tmp"] = f"{times}vocab x hidden gradient (end of backward)"

    # ---- overhead (buffers); the allocator slack is added at the peak below
    buffers = 0.0
    ov = [f"CUDA context {CUDA_CONTEXT_BYTES / GB:.1f} GB", f"allocator slack {ALLOCATOR_SLACK:.0%}"]
    if d > 1:
        buffers += NCCL_BYTES
        ov.append(f"NCCL {NCCL_BYTES / GB:.1f} GB")
    if ds and stage_like in (1, 2) and zo.get("contiguous_gradients", True):
        ipg = _num(zo.get("reduce_bucket_size"), 5e8) * b * (2 if zo.get("overlap_comm", False) else 1)
        buffers += ipg
        ov.append(f"ZeRO reduce buckets {ipg / GB:.1f} GB")
    elif ds and stage_like >= 3:
        red = 2 * _num(zo.get("reduce_bucket_size"), shape.hidden ** 2) * b
        buffers += red
        ov.append(f"ZeRO-3 reduce buckets {red / GB:.2f} GB")
    if not ds and not fsdp and d > 1:
        buffers += gradients  # DDP reducer buckets: a second copy of the gradients
        ov.append("DDP gradient buckets")
    if recipe.method == "qlora":
        # 4-bit kernels dequantize for training; autograd keeps the 16-bit weights of the recomputed layer
        deq = shape.linear_weight_params / shape.layers * b
        buffers += deq
        ov.append(f"dequantized layer weights {deq / GB:.2f} GB")
    details["overhead"] = ", ".join(ov)

    common = weights + gradients + optimizer + buffers
    fb = common + act_stored + max(logits, act_recompute)
    st = common + step_transient
    be = common + grad_transient
    fb_total, be_total, st_total = (x * (1 + ALLOCATOR_SLACK) + CUDA_CONTEXT_BYTES for x in (fb, be, st))
    peak = max(fb, be, st)
    overhead = buffers + CUDA_CONTEXT_BYTES + ALLOCATOR_SLACK * peak
    total = max(fb_total, be_total, st_total)
    phase = "forward/backward" if fb == peak else "end-of-backward" if be == peak else "optimizer step"

    method = recipe.method + (" + trainable embeddings" if emb_train else "") + (
        f" ({q_method} 4-bit)" if recipe.method == "qlora" else "")
    if d > 1 and stage is None and not fsdp:
        notes.append(f"{d} devices without DeepSpeed/FSDP: plain data parallel, every device holds everything")
    if t.loss == "chunked" and not reference:
        notes.append("with liger-kernel installed on CUDA, the fused loss needs less than the chunked estimate")
    return MemoryEstimate(
        weights=int(weights), gradients=int(gradients), optimizer=int(optimizer),
        activations=int(act_stored + act_recompute), logits=int(logits), overhead=int(overhead), total=int(total),
        activations_stored=int(act_stored), activations_recompute=int(act_recompute),
        step_transient=int(step_transient), grad_transient=int(grad_transient), peak_phase=phase,
        forward_backward=int(fb_total), backward_end=int(be_total), optimizer_step=int(st_total),
        cpu_offload=int(cpu_offload), params_total=N, params_trainable=trainable_n, lora_params=lora_n,
        tokens_per_step=T, gpus=d, zero_stage=stage, precision=precision, weight_dtype=weight_dtype if not mixed
        else precision, method=method, activation_parts=parts, details=details, notes=notes)


def _activations(shape: ModelShape, recipe: Recipe, b: int, a: int, p: int, T: int, rows: int, S: int,
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
    # Packed rows: QwenTrainer passes one float block mask shared by all layers. Padded rows: transformers passes
    # a boolean mask, which SDPA converts to a new float tensor in every layer and keeps for that layer's backward.
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
    if sdpa and recipe.data.packing:
        mask = rows * S * S * b
    elif sdpa and rows > 1:
        mask = rows * S * S
    else:
        mask = 0
    return {
        "layers": int(layers),
        "checkpoints": int(b * h * T * shape.layers),
        "recompute": int(worst + 2 * b * h * T),
        "head": int((4 * h + b * h) * T),  # final norm (+ the hidden rows the loss reads)
        "embedding": int(b * h * T),
        "mask": int(mask),  # the mask tensor passed to every layer
        "scores": int(scores),
    }


def reference_comparison() -> list[dict[str, Any]]:
    """Every row of the Qwen-1 README table next to `estimate_memory(..., reference=True)` (sum over GPUs)."""
    out = []
    for (model, method, _), row in QWEN1_PUBLISHED.items():
        for seq, published in row.items():
            recipe, n, cfg = reference_recipe(model, method, seq)
            est = estimate_memory(recipe, gpus=n, model_config=cfg, reference=True)
            total = est.total * n / GB
            out.append({"model": model, "method": method, "gpus": n, "seq": seq, "published": published,
                        "estimate": round(total, 1), "error_pct": round(100 * (total - published) / published, 1)})
    return out


if __name__ == "__main__":  # calibration report: python -m qwen_tune.train.memory
    rows = reference_comparison()
    for r in rows:
        flag = "" if abs(r["error_pct"]) <= 15 else "   outside 15%"
        print(f"{r['model']:10s} {r['method']:15s} {r['gpus']} {r['seq']:5d} {r['published']:7.1f} "
              f"{r['estimate']:7.1f} {r['error_pct']:+6.1f}%{flag}")
    errs = [abs(r["error_pct"]) for r in rows]
    print(f"rows {len(rows)}, within 15%: {sum(e <= 15 for e in errs)}, mean |error| {sum(errs) / len(errs):.1f}%, "
          f"max {max(errs):.1f}%")
