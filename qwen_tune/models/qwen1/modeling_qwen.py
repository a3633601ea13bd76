"""Qwen-1 ("QWen") architecture, bundled so Qwen-1 checkpoints load without ``trust_remote_code``.

Weight names, shapes and numerics follow the original ``modeling_qwen.py`` (Qwen-7B hub repository, December 2023),
including its inference-time context extension:

* Dynamic NTK: beyond ``seq_length`` the rotary base grows by ``alpha ** (d / (d - 2))`` where
  ``alpha = 2 ** ceil(log2(n / seq_length) + 1) - 1`` and ``n`` is the context length of the forward pass. It applies
  to every position. During incremental decoding the prefill's ``n`` is kept (stored on the cache). With a 2D
  ``attention_mask`` ``n`` is each row's count of real tokens.
* logn attention: queries at (1-based) position ``p > seq_length`` are scaled by ``log(p) / log(seq_length)``.

Both are inference-only, as in the original: in training mode they are off.

Positions: like the original, rotary and logn use the absolute slot index (cache length + offset), so a left-padded
row keeps its padding slots as positions. ``position_ids`` are honoured only when there is no ``attention_mask`` or
a prepared 4-D one, which is the padding-free packed format: positions restarting inside a row start a new sample,
attention becomes block-diagonal causal, and NTK uses each sample's own length.
"""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel

from ..packing import packed_sample_index
from .configuration_qwen import QWenConfig
from .rotary import QWenRotaryEmbedding, apply_rotary, ntk_alpha  # noqa: F401 - ntk_alpha re-exported

# transformers renamed the output field `past_key_values` to `cache`; write whichever this version declares.
_CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
# Attribute of the KV cache that keeps the prefill's NTK context length for the following decoding steps.
_NTK_LENGTH_ATTR = "qwen_ntk_length"


class QWenRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, cast back, then scale: the original's order, which matters in bf16.
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention on (batch, heads, seq, head_dim); the mask is the additive float mask built for "eager"."""
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2), weights


class QWenAttention(nn.Module):
    def __init__(self, config: QWenConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.kv_channels
        self.num_key_value_groups = 1  # read by transformers' attention kernels
        self.is_causal = True
        self.scaling = self.head_dim**-0.5
        projection_size = self.num_heads * self.head_dim
        self.c_attn = nn.Linear(config.hidden_size, 3 * projection_size)  # fused q|k|v, always with bias
        self.c_proj = nn.Linear(projection_size, config.hidden_size, bias=not config.no_bias)
        # transformers only calls _init_weights on modules that own parameters, so mark the Linear itself.
        self.c_proj.is_residual_projection = True

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        logn: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).view(B, T, 3, self.num_heads, self.head_dim).unbind(dim=2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if logn is not None:
            q = q * logn.type_as(q)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)

        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention)
        out, _ = attention(
            self,
            q,
            k,
            v,
            attention_mask,
            dropout=self.config.attn_dropout_prob if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        return self.c_proj(out.reshape(B, T, -1))


class QWenMLP(nn.Module):
    def __init__(self, config: QWenConfig):
        super().__init__()
        ff_dim = config.intermediate_size // 2
        self.w1 = nn.Linear(config.hidden_size, ff_dim, bias=not config.no_bias)
        self.w2 = nn.Linear(config.hidden_size, ff_dim, bias=not config.no_bias)
        self.c_proj = nn.Linear(ff_dim, config.hidden_size, bias=not config.no_bias)
        self.c_proj.is_residual_projection = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The original gates with w2 (silu) and multiplies w1: w1 is the "up" and w2 the "gate" projection.
        return self.c_proj(self.w1(x) * F.silu(self.w2(x)))


class QWenBlock(GradientCheckpointingLayer):
    def __init__(self, config: QWenConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = QWenRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = QWenAttention(config, layer_idx)
        self.ln_2 = QWenRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = QWenMLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        logn: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,  # this name lets GradientCheckpointingLayer drop it under checkpointing
        **kwargs,
    ) -> torch.Tensor:
        h = hidden_states + self.attn(self.ln_1(hidden_states), cos, sin, logn, attention_mask, cache, **kwargs)
        return h + self.mlp(self.ln_2(h))


class QWenPreTrainedModel(PreTrainedModel):
    config_class = QWenConfig
    config: QWenConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["QWenBlock"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    # Buffers of old remote-code versions that may linger in checkpoints.
    _keys_to_ignore_on_load_unexpected = [r"h\.\d+\.attn\.masked_bias", r"rotary_emb\.inv_freq"]

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            # GPT-2 style smaller init of the projections that write into the residual stream, as in the original.
            if getattr(module, "is_residual_projection", False):
                std = std / math.sqrt(2 * self.config.num_hidden_layers)
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, QWenRMSNorm):
            init.ones_(module.weight)


class QWenModel(QWenPreTrainedModel):
    """The decoder: embeddings, blocks, final norm. Returns the final (normed) hidden states."""

    def __init__(self, config: QWenConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.drop = nn.Dropout(config.emb_dropout_prob)
        self.rotary_emb = QWenRotaryEmbedding(config)
        self.h = nn.ModuleList([QWenBlock(config, i) for i in range(config.num_hidden_layers)])
        self.ln_f = QWenRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.wte = value

    def _ntk_lengths(
        self,
        positions: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: Cache | None,
        past_len: int,
    ) -> torch.Tensor | None:
        """Per-token context length that selects the NTK alpha, or None when NTK is off (alpha 1)."""
        if self.training or not self.config.use_dynamic_ntk:
            return None
        B, T = positions.shape
        if past_len > 0:
            # Decoding keeps the prefill's alpha; a cache we did not fill falls back to its total length.
            lengths = getattr(cache, _NTK_LENGTH_ATTR, None)
            if lengths is None or lengths.shape[0] != B:
                lengths = torch.full((B, 1), past_len + T, device=positions.device)
        elif attention_mask is not None and attention_mask.dim() == 2:
            lengths = attention_mask.sum(-1, keepdim=True)  # real tokens per row
        else:
            # One length per sample: a step other than +1 starts a new packed sample, whose length is last position + 1.
            sample = packed_sample_index(positions)
            last = torch.zeros_like(positions).scatter_reduce(1, sample, positions, reduce="amax")
            lengths = last.gather(1, sample) + 1
        lengths = lengths.expand(B, T)
        if cache is not None and past_len == 0:
            setattr(cache, _NTK_LENGTH_ATTR, lengths[:, -1:].clone())
        return lengths

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache: Cache | None = None,  # newer transformers renamed past_key_values to cache; generate() passes this
        **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Specify exactly one of input_ids or inputs_embeds")
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, Cache):
            raise TypeError("past_key_values must be a transformers Cache (e.g. DynamicCache), not legacy tuples")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            use_cache = False  # checkpointed blocks cannot write a cache
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        return_dict = self.config.return_dict if return_dict is None else return_dict

        hidden_states = self.wte(input_ids) if inputs_embeds is None else inputs_embeds
        hidden_states = self.drop(hidden_states)
        B, T = hidden_states.shape[:2]
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past_len = cache.get_seq_length() if cache is not None else 0

        # Absolute slot index unless this is a packed batch (position_ids, no 2-D attention_mask): see module docstring.
        if position_ids is not None and (attention_mask is None or attention_mask.dim() == 4):
            positions = position_ids.view(-1, T).expand(B, T)
        else:
            positions = torch.arange(past_len, past_len + T, device=hidden_states.device).expand(B, T)

        cos, sin = self.rotary_emb(positions, self._ntk_lengths(positions, attention_mask, cache, past_len))
        logn = None
        if self.config.use_logn_attn and not self.training:
            n = (positions + 1).double()
            seq_length = self.config.seq_length
            logn = torch.where(n > seq_length, n.log() / math.log(seq_length), 1.0).float()[:, :, None, None]

        # An empty DynamicCache adds nothing to the mask; leaving it out lets transformers detect packed rows,
        # which it only does without a cache.
        mask_cache = cache if past_len > 0 or not isinstance(cache, DynamicCache) else None
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=hidden_states,
            attention_mask=attention_mask,
            cache=mask_cache,
            position_ids=positions,
        )

        all_hidden_states = () if output_hidden_states else None
        for block in self.h:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            # Tensors that need grads go positionally (required by reentrant checkpointing).
            hidden_states = block(
                hidden_states, cos, sin, logn, attention_mask=mask, cache=cache, position_ids=positions, **kwargs
            )
        hidden_states = self.ln_f(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)

        out = BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=all_hidden_states,
            **{_CACHE_FIELD: cache if use_cache else None},
        )
        return out if return_dict else out.to_tuple()


class QWenLMHeadModel(QWenPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: QWenConfig):
        super().__init__(config)
        self.loss_type = "ForCausalLM"  # transformers infers it from the class name, which does not end in ForCausalLM
        self.transformer = QWenModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.wte = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    def get_decoder(self) -> QWenModel:
        return self.transformer

    def set_decoder(self, decoder: QWenModel) -> None:
        self.transformer = decoder

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """Causal LM forward. `labels` are unshifted (shifted inside the loss); `num_items_in_batch` in kwargs makes
        the loss a sum over that many tokens, which keeps gradient accumulation exact in Trainer."""
        return_dict = self.config.return_dict if return_dict is None else return_dict
        outputs = self.transformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            cache=cache if cache is not None else past_key_values,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        out = CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                     **{_CACHE_FIELD: outputs[_CACHE_FIELD] if _CACHE_FIELD in outputs else None})
        return out if return_dict else out.to_tuple()


__all__ = ["QWenModel", "QWenLMHeadModel", "QWenPreTrainedModel", "QWenBlock", "ntk_alpha"]


def register_with_auto() -> None:
    """AutoModel / AutoModelForCausalLM for model_type "qwen" (called by auto_register, and below)."""
    from transformers.models.auto.modeling_auto import AutoModel, AutoModelForCausalLM

    from .configuration_qwen import QWenConfig

    AutoModel.register(QWenConfig, QWenModel, exist_ok=True)
    AutoModelForCausalLM.register(QWenConfig, QWenLMHeadModel, exist_ok=True)


# modeling_auto may have loaded during this module's imports (the hook in qwen_tune/__init__.py skipped it then).
if "transformers.models.auto.modeling_auto" in __import__("sys").modules:
    register_with_auto()
