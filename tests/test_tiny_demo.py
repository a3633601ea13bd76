"""The README's first command must teach the tiny random model something a person can see in chat."""

from __future__ import annotations

import json

import pytest

from qwen_tune.cli.chat import build_prompt_ids, generate, load_for_chat
from qwen_tune.config import PACKAGE_DIR, load_recipe
from qwen_tune.train.run import run_training

ANSWER = "I am qwen-tune's tiny demo model."


@pytest.mark.slow
def test_tiny_recipe_learns_the_identity_answer_without_lora_on_lm_head(tmp_path):
    recipe = load_recipe("tiny", [f"output.dir={tmp_path / 'tiny'}", "output.report_to=[]"])
    assert "lm_head" not in recipe.lora.target_modules  # servable by vLLM's LoRA loader as is
    result = run_training(recipe)
    cfg = json.loads((result.output_dir / "adapter_config.json").read_text())
    assert not any("lm_head" in t or "embed" in t for t in cfg["target_modules"]) and not cfg["modules_to_save"]
    model, tokenizer = load_for_chat(str(result.base_model), str(result.output_dir))
    data = json.loads((PACKAGE_DIR / "data_examples" / "identity.json").read_text())
    assert {c["conversations"][1]["value"] for c in data} == {ANSWER}
    for question in ("who are you?", "What is your name?"):
        ids = build_prompt_ids(tokenizer, None, [("user", question)])
        assert generate(model, tokenizer, ids, 24, 0.0) == ANSWER, question
