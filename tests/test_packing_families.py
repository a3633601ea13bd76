"""Packed == separate for every supported family: a packed row's per-sample logits are those of each sample alone.

Families whose linear-attention layers cannot keep packed samples apart must have fallen back to padding (per-sample
rows), which is exact. The batch goes through `make_collator` exactly as `run_training` builds it; packed rows run
with the dense block mask and with per-sample SDPA ("sdpa_packed"), QwenTrainer's two packed SDPA paths.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from qwen_tune.data.collators import PackingCollator, PaddingCollator, make_collator
from qwen_tune.data.formats import Conversation
from qwen_tune.data.template import ChatMLEncoder
from qwen_tune.models.families import FAMILIES, packing_is_exact
from qwen_tune.models.packed_attention import use_packed_sdpa
from qwen_tune.models.qwen1 import QWenConfig
from qwen_tune.train.trainer import packed_attention_mask

PAD = 151643
SMALL = dict(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32)
# Layer 0 linear attention (Gated DeltaNet), layer 1 full attention.
LINEAR_ATTN = dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8,
                   full_attention_interval=2)
CASES = {"qwen2": {}, "qwen2_moe": MOE, "qwen3": {}, "qwen3_moe": MOE, "qwen3_next": {**MOE, **LINEAR_ATTN},
         "qwen3_5_text": LINEAR_ATTN, "qwen3_5_moe_text": {**MOE, **LINEAR_ATTN}}
RECURRENT = {"qwen3_next", "qwen3_5_text", "qwen3_5_moe_text"}


def test_every_family_is_covered():
    assert set(FAMILIES) == set(CASES) | {"qwen"}


def _model(model_type: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if model_type == "qwen":
        # seq_length above the samples' lengths: Qwen-1's dynamic NTK stays off, as for real checkpoints (8k).
        config = QWenConfig(vocab_size=151936, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            kv_channels=8, intermediate_size=64, seq_length=2048, max_position_embeddings=2048,
                            initializer_range=0.2)
    else:
        config = AutoConfig.for_model(model_type, **SMALL, **CASES[model_type], initializer_range=0.2)
    config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(config).eval()
    model.config.use_cache = False
    return model


@pytest.fixture(scope="module")
def samples(tokenizer):
    convs = [Conversation("a", [("user", "What is 2+2?"), ("assistant", "4")]),
             Conversation("b", [("user", "Write a haiku about rain."), ("assistant", "Soft rain on the roof\nthe "
                                "gutters hum a low song\nmorning smells of earth")]),
             Conversation("c", [("user", "你好"), ("assistant", "你好！有什么可以帮你？")], system="Answer in Chinese.")]
    return [{"input_ids": s.input_ids, "labels": s.labels} for s in ChatMLEncoder(tokenizer, 512).encode(convs)]


def _logits(model, batch) -> torch.Tensor:
    kwargs = {k: v for k, v in batch.items() if k != "labels"}
    if "position_ids" in kwargs and "attention_mask" not in kwargs:  # what QwenTrainer adds for packed SDPA rows
        kwargs["attention_mask"] = packed_attention_mask(kwargs["position_ids"], torch.float32)
    return model(**kwargs, use_cache=False).logits.float()


def _ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                             ignore_index=-100, reduction="sum").item()


@pytest.mark.parametrize("model_type", ["qwen", *CASES])
def test_packed_equals_separate(model_type, samples):
    if model_type != "qwen" and model_type not in CONFIG_MAPPING:
        pytest.skip(f"installed transformers has no {model_type}")
    model = _model(model_type)
    assert packing_is_exact(model.config) == (model_type not in RECURRENT)
    collator = make_collator(True, PAD, None, "sdpa", packing_exact=packing_is_exact(model.config))
    batch = collator(samples)
    lens = [len(s["input_ids"]) for s in samples]
    with torch.no_grad():
        alone = [_logits(model, PaddingCollator(PAD)([s]))[0] for s in samples]
        got = _logits(model, batch)
        if model_type not in RECURRENT:  # and per-sample SDPA, the trainer's default for packed rows
            assert use_packed_sdpa(model)
            per_sample = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits.float()
            for i, (a, b) in enumerate(zip(per_sample[0].split(lens), alone)):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4,
                                           msg=lambda m: f"{model_type} per-sample SDPA, sample {i}: {m}")
    if model_type in RECURRENT:
        assert isinstance(collator, PaddingCollator)
        rows = [got[i, :n] for i, n in enumerate(lens)]
    else:
        assert isinstance(collator, PackingCollator)
        rows = list(got[0].split(lens))
    for i, (a, b) in enumerate(zip(rows, alone)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=lambda m: f"{model_type} sample {i}: {m}")
    # The loss the Trainer sees equals the sum of the samples' own losses (the collator masks each first label).
    separate = sum(_ce_sum(a[None], PaddingCollator(PAD)([s])["labels"]) for a, s in zip(alone, samples))
    assert _ce_sum(got, batch["labels"]) == pytest.approx(separate, rel=1e-5)
