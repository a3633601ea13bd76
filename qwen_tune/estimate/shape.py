"""The shape model of the estimator: the parameter counts and per-layer linears of a Qwen model, from its
config.json alone (no weights, no model construction), for every Qwen family (Qwen-1, Qwen1.5/2/2.5, Qwen3, MoE,
hybrid linear attention). tests/test_estimate.py checks the counts against models built from the same configs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import ConfigError

# MoE families whose fused experts peft 0.21 + transformers 5 adapt (transformers' conversion table maps them to
# qwen2_moe's v4 layout; qwen2_moe itself is not converted, so its experts get no LoRA).
PEFT_MOE_CONVERTED = frozenset({"qwen3_moe", "qwen3_next", "qwen3_omni_moe", "qwen3_omni_moe_thinker",
                                "qwen3_omni_moe_text"})



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
