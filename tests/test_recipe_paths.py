"""One rule for a recipe's paths: relative to the recipe file when written in it, to the cwd when overridden;
outputs of bundled recipes in the cwd; a run that fails before training leaves no output dir."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from conftest import EXAMPLES, run_cli
from qwen_tune.config import PACKAGE_DIR, load_recipe
from qwen_tune.train.run import run_training

SMALL = {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 32, "intermediate_size": 64,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "max_position_embeddings": 1024, "tie_word_embeddings": False, "qwen_tune_is_chat": True}


@pytest.fixture
def copied(tmp_path) -> Path:
    """The tiny recipe copied next to its own model config and data, every path relative."""
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "small.json").write_text(json.dumps(SMALL))
    (exp / "d.json").write_text(json.dumps(json.loads((EXAMPLES / "example.json").read_text())[:4], ensure_ascii=False))
    recipe = yaml.safe_load((PACKAGE_DIR / "recipes" / "tiny.yaml").read_text())
    recipe["model"]["from_config"] = "small.json"
    recipe["data"].update(path="d.json", max_len=96)
    recipe["training"].update(max_steps=1, batch_size=2)
    recipe["lora"]["r"] = 2
    recipe["output"].update(dir="out", report_to=[], save_steps=100)
    (exp / "my.yaml").write_text(yaml.safe_dump(recipe))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    return exp


def test_paths_written_in_a_recipe_are_relative_to_it(copied, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path / "elsewhere")
    r = load_recipe(copied / "my.yaml")
    assert r.model.from_config == str(copied / "small.json")
    assert r.data.datasets[0].path == str(copied / "d.json")
    assert r.output.dir == str(copied / "out")  # was relative to the cwd
    # Overrides are relative to the cwd.
    r = load_recipe(copied / "my.yaml", ["output.dir=o2", "data.path=../exp/d.json"])
    assert r.output.dir == str(tmp_path / "elsewhere" / "o2")
    assert r.data.datasets[0].path == str(copied / "d.json")
    # A hub name is no local path: kept as written.
    assert load_recipe(copied / "my.yaml", ["model.path=Qwen/Qwen2.5-7B-Instruct"]).model.path == "Qwen/Qwen2.5-7B-Instruct"


def test_bundled_recipe_reads_package_files_and_writes_to_the_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = load_recipe("tiny")
    assert r.model.from_config == str(PACKAGE_DIR / "assets" / "tiny_qwen2.json")
    assert r.data.datasets[0].path == str(PACKAGE_DIR / "data_examples" / "identity.json")
    assert r.output.dir == str(tmp_path / "outputs" / "tiny-lora")
    assert load_recipe("lora_ds").deepspeed == str(PACKAGE_DIR / "ds_configs" / "zero2.json")


def test_copied_recipe_trains_from_another_cwd_and_adapter_loads_anywhere(copied, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert run_cli("train", "--recipe", str(copied / "my.yaml")) == 0
    out = copied / "out"
    assert (out / "adapter_model.safetensors").exists() and not (tmp_path / "elsewhere" / "out").exists()
    recorded = yaml.safe_load((out / "qwen_tune_recipe.yaml").read_text())
    assert recorded["model"]["from_config"] == str(copied / "small.json")
    assert recorded["data"]["datasets"][0]["path"] == str(copied / "d.json")
    assert recorded["output"]["dir"] == str(out)
    base = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert os.path.isabs(base) and Path(base) == out / "base_model"
    # Plain peft, from a third directory: the adapter finds its base by itself.
    third = tmp_path / "third"
    third.mkdir()
    monkeypatch.chdir(third)
    from peft import AutoPeftModelForCausalLM

    model = AutoPeftModelForCausalLM.from_pretrained(str(out))
    assert model.peft_config["default"].r == 2


def test_failed_run_leaves_no_output_dir(copied, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path / "elsewhere")
    with pytest.raises(Exception, match="missing.json"):  # found missing after the base model was built
        run_training(load_recipe(copied / "my.yaml", ["data.path=missing.json"]))
    assert not (copied / "out").exists()
