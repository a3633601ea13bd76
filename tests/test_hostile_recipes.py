"""Hostile recipes and CLI arguments: one short line naming the key (or the override), never a traceback."""

from __future__ import annotations

import json
import logging
import time

import pytest
from conftest import run_cli

from qwen_tune.config import ConfigError, load_recipe
from qwen_tune.train.recipe_checks import (check_device_settings, check_max_len, check_output_dir_writable,
                                           check_resume_path)


def _error(overrides, recipe="tiny"):
    with pytest.raises(ConfigError) as e:
        load_recipe(recipe, overrides)
    return str(e.value)


@pytest.mark.parametrize("item", [
    "training.lr=-1", "training.lr=0", "training.batch_size=0", "training.grad_accum=0", "training.grad_accum=-2",
    "output.logging_steps=0", "output.save_steps=-5", "training.loss_chunk_size=0", "training.warmup_ratio=1",
    "training.warmup_ratio=5", "training.warmup_ratio=-0.1", "training.epochs=0", "data.num_proc=0",
])
def test_out_of_range_values_are_refused_and_blamed_on_the_override(item):
    """Before: accepted (lr=-1 trained uphill, warmup_ratio=5 silently became 5 warmup steps, 0 steps crashed)."""
    msg = _error([item])
    key = item.split("=")[0]
    assert msg.startswith(f"override {item}: `{key}`:") and "\n" not in msg, msg


def test_warmup_ratio_stays_a_ratio():
    from qwen_tune.train.run import training_arguments

    args = training_arguments(load_recipe("tiny", ["training.warmup_ratio=0.5", "training.use_cpu=true"]),
                              __import__("pathlib").Path("unused"), False)
    assert args.get_warmup_steps(100) == 50


def test_errors_in_the_file_name_the_file_and_overrides_the_override(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {from_config: x.json}\ntraining: {lr: -1}\n")
    assert _error([], str(recipe)) == f"{recipe}: `training.lr`: Input should be greater than 0 (got -1)"
    msg = _error(["training.lr=1e-4", "training.lrr=3"], str(recipe))
    assert msg == "override training.lrr=3: unknown key `training.lrr`; did you mean `training.lr`?"


def test_yaml_alias_bomb_is_refused_with_a_short_line(tmp_path):
    """Before: the expansion reached pydantic and the error line repeated the whole expanded value."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text("\n".join(lines) + "\nmodel: {from_config: x.json}\ntraining: {lr: *a8}\n")
    start = time.monotonic()
    msg = _error([], str(recipe))
    assert time.monotonic() - start < 5 and "expands to more than" in msg and len(msg) < 300


def test_long_bad_values_are_cut_short():
    msg = _error(["training.lr=" + "x" * 10_000])
    assert msg.startswith("override training.lr=xxx") and len(msg) <= 300 and "\n" not in msg


@pytest.mark.parametrize("kind", ["dir", "latin1"])
def test_recipe_that_is_a_directory_or_not_utf8(tmp_path, kind, capsys):
    """Before: IsADirectoryError / UnicodeDecodeError tracebacks."""
    path = tmp_path / "r.yaml"
    if kind == "dir":
        path.mkdir()
    else:
        path.write_bytes(b"model:\n  path: caf\xe9\n")
    assert run_cli("train", "--recipe", str(path)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path}: ") and "\n" not in err, err


def test_fp16_on_cpu_and_flash_attention_without_flash_attn():
    with pytest.raises(ConfigError, match="training.precision: fp16 needs a CUDA GPU"):
        check_device_settings(load_recipe("tiny", ["training.precision=fp16", "training.use_cpu=true"]))
    with pytest.raises(ConfigError, match="model.attn_implementation: flash_attention_2 needs"):
        check_device_settings(load_recipe("tiny", ["model.attn_implementation=flash_attention_2",
                                                   "training.use_cpu=true"]))


def test_max_len_above_the_model_positions():
    positions = json.loads(load_recipe("tiny").model.from_config and
                           open(load_recipe("tiny").model.from_config).read())["max_position_embeddings"]
    check_max_len(load_recipe("tiny", [f"data.max_len={positions}"]))
    with pytest.raises(ConfigError, match=f"data.max_len: {positions + 1} exceeds the model's {positions} positions"):
        check_max_len(load_recipe("tiny", [f"data.max_len={positions + 1}"]))


def test_unwritable_output_dir_is_refused_up_front(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=f"output.dir: cannot write to {blocker}/out"):
        check_output_dir_writable(load_recipe("tiny", [f"output.dir={blocker}/out"]))
    check_output_dir_writable(load_recipe("tiny", [f"output.dir={tmp_path}/ok"]))
    assert not (tmp_path / "ok").exists()  # the probe, and the folder it had to create, are removed again


def test_resume_path_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "plain").mkdir()
    for path, why in ((tmp_path / "nope", "does not exist"), (tmp_path / "plain", "holds no trainer_state.json")):
        with pytest.raises(ConfigError, match=f"output.resume_from_checkpoint: {path} {why}"):
            check_resume_path(load_recipe("tiny", [f"output.resume_from_checkpoint={path}"]))
    (tmp_path / "plain" / "trainer_state.json").write_text("{}")
    check_resume_path(load_recipe("tiny", [f"output.resume_from_checkpoint={tmp_path / 'plain'}"]))


def test_lora_settings_with_method_full_are_reported(caplog):
    with caplog.at_level(logging.WARNING):
        load_recipe("tiny", ["method=full", "lora.r=8"])
    assert "lora: " in caplog.text and "ignored: method is full" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_recipe("full", ["model.path=x"])
    assert "ignored: method is full" not in caplog.text  # the bundled full recipes carry no lora section


def test_os_errors_name_the_path(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"conversations": [{"from": "user", "value": "a"},
                                                  {"from": "assistant", "value": "b"}]}) + "\n")
    assert run_cli("data", "tokenize", "--data", str(data), "--out", str(blocker / "x" / "o.jsonl")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {blocker}") and "\n" not in err, err
