"""Qwen1.5+ families load through transformers' native classes and take LoRA on their default targets."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from qwen_tune.models.families import get_family

SMALL = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32)
LINEAR_ATTN = dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8,
                   full_attention_interval=2)
CASES = {"qwen2": {}, "qwen2_moe": MOE, "qwen3": {}, "qwen3_moe": MOE, "qwen3_next": {**MOE, **LINEAR_ATTN},
         "qwen3_5_text": LINEAR_ATTN}


@pytest.mark.parametrize("model_type", list(CASES))
def test_family_default_lora_targets_train(model_type):
    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"installed transformers has no {model_type}")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **SMALL, **CASES[model_type]))
    family = get_family(model_type)
    assert family.embedding == "embed_tokens" and model.get_input_embeddings() is getattr(model.model, "embed_tokens")
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05,
                                                  target_modules=list(family.lora_targets)))
    wrapped = {name.rsplit(".", 1)[-1] for name, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped and wrapped <= set(family.lora_targets)
    assert {"q_proj", "v_proj"} <= wrapped or {"in_proj_qkv", "in_proj_qkvz"} & wrapped
    ids = torch.randint(0, 500, (1, 12))
    peft_model(input_ids=ids, labels=ids).loss.backward()
    grads = {n for n, p in peft_model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)


def test_unknown_family_is_refused():
    with pytest.raises(ValueError, match="not a Qwen family"):
        get_family("llama")
