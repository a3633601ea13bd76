"""`training.gradient_checkpointing: auto`: the CLI resolves it with the memory estimator before training."""

from __future__ import annotations

import pytest

from qwen_tune.cli.auto_settings import GiB, device_memory, resolve_gradient_checkpointing
from qwen_tune.config import Recipe, load_recipe
from qwen_tune.estimate import QWEN1_PRESETS, estimate_memory


def test_default_is_auto_and_explicit_values_are_kept():
    assert Recipe.model_validate({"model": {"path": "x"}}).training.gradient_checkpointing == "auto"
    for v in (True, False):
        r = load_recipe("tiny", [f"training.gradient_checkpointing={str(v).lower()}"])
        assert resolve_gradient_checkpointing(r) == (r, None)


def test_tiny_recipe_resolves_off_on_this_machine():
    recipe = load_recipe("tiny", ["training.gradient_checkpointing=auto"])
    resolved, line = resolve_gradient_checkpointing(recipe)
    assert resolved.training.gradient_checkpointing is False, line
    assert recipe.training.gradient_checkpointing == "auto"  # the caller's recipe is not modified
    assert line.startswith("gradient_checkpointing auto -> off:") and "GiB" in line
    avail, where = device_memory()
    assert where in line and f"{avail / GiB:.2f}" in line


def test_huge_step_resolves_on():
    cfg = dict(QWEN1_PRESETS["qwen-7b"])
    recipe = load_recipe("lora", ["training.gradient_checkpointing=auto", "data.max_len=32768",
                                  "model.path=Qwen/qwen-7b"])
    resolved, line = resolve_gradient_checkpointing(recipe, model_config=cfg)
    assert resolved.training.gradient_checkpointing is True, line
    assert line.startswith("gradient_checkpointing auto -> on:")
    # The decision follows the estimate: on exactly when the step without checkpointing exceeds the device.
    resolved.training.gradient_checkpointing = False
    without = estimate_memory(resolved, model_config=cfg).total
    r_fit, _ = resolve_gradient_checkpointing(recipe, model_config=cfg, memory=(without + 1, "test device"))
    r_tight, _ = resolve_gradient_checkpointing(recipe, model_config=cfg, memory=(without - 1, "test device"))
    assert (r_fit.training.gradient_checkpointing, r_tight.training.gradient_checkpointing) == (False, True)


def test_unsizable_model_resolves_on_with_the_reason(tmp_path):
    recipe = load_recipe("lora", ["training.gradient_checkpointing=auto", f"model.path={tmp_path / 'missing'}"])
    resolved, line = resolve_gradient_checkpointing(recipe)
    assert resolved.training.gradient_checkpointing is True
    assert "memory estimate failed" in line and "config.json" in line


@pytest.mark.parametrize("value", ["auto", True, False])
def test_apply_method_treats_unresolved_auto_as_on(value):
    from qwen_tune.models.families import get_family
    from qwen_tune.train.methods import apply_method
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=1, vocab_size=128)
    model = AutoModelForCausalLM.from_config(cfg)
    recipe = load_recipe("tiny", [f"training.gradient_checkpointing={str(value).lower()}"])
    out = apply_method(model, recipe, get_family("qwen2"), is_chat=True)
    assert model.is_gradient_checkpointing is (value is not False)
    assert out is not None
