"""Configuration of the Qwen-1 ("QWen") architecture.

Reads the original Qwen-1 ``config.json`` keys unchanged. Legacy keys of the remote code that do not change the
architecture (``bf16``, ``fp16``, ``fp32``, ``use_flash_attn``, ``softmax_in_fp32``, ``scale_attn_weights``,
``use_cache_quantization``, ``use_cache_kernel``, ``onnx_safe``, ...) are kept as plain attributes and ignored:
the dtype comes from ``from_pretrained(dtype=...)`` and the attention kernel from ``attn_implementation``.
"""

from transformers import PreTrainedConfig


class QWenConfig(PreTrainedConfig):
    model_type = "qwen"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    # Standard names that generic transformers/peft code looks up. Qwen-1 has no grouped-query attention.
    attribute_map = {
        "num_key_value_heads": "num_attention_heads",
        "head_dim": "kv_channels",
        "rms_norm_eps": "layer_norm_epsilon",
    }

    vocab_size: int = 151936
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    kv_channels: int = 128
    # As in the original, w1 and w2 map hidden -> intermediate_size // 2.
    intermediate_size: int = 22016
    rotary_pct: float = 1.0
    rotary_emb_base: float = 10000
    # Training context length: dynamic NTK and logn scaling start beyond it.
    seq_length: int = 8192
    max_position_embeddings: int = 8192
    use_dynamic_ntk: bool = True
    use_logn_attn: bool = True
    layer_norm_epsilon: float = 1e-6
    # Applies to every linear layer except attn.c_attn, which always has a bias.
    no_bias: bool = True
    emb_dropout_prob: float = 0.0
    attn_dropout_prob: float = 0.0
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads")
        if not 0.0 < self.rotary_pct <= 1.0:
            raise ValueError(f"rotary_pct must be in (0, 1], got {self.rotary_pct}")
        super().__post_init__(**kwargs)


__all__ = ["QWenConfig"]
