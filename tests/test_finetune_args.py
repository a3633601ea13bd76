"""Qwen's finetune.py flags on the reference scripts and `qwen-tune train -- ...`: mapped to recipe keys."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import yaml

from conftest import EXAMPLES, ROOT
from qwen_tune.cli.finetune_args import convert
from qwen_tune.config import ConfigError
from qwen_tune.models.loading import build_from_config

SMALL = {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 32, "intermediate_size": 64,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "max_position_embeddings": 1024, "tie_word_embeddings": False, "qwen_tune_is_chat": True}


def test_finetune_flags_map_to_recipe_keys():
    mapped, notes = convert("--model_name_or_path /m --data_path d.json --output_dir o --model_max_length 512 "
                            "--lora_r 8 --lora_alpha 16 --lora_dropout 0.05 --num_train_epochs 5 "
                            "--per_device_train_batch_size 2 --gradient_accumulation_steps 8 --learning_rate 3e-4 "
                            "--weight_decay 0.1 --adam_beta2 0.95 --warmup_ratio 0.01 --lr_scheduler_type cosine "
                            "--logging_steps 1 --save_steps 1000 --save_total_limit 10 --q_lora True --use_lora True "
                            "--bf16 True --gradient_checkpointing --deepspeed ds.json --report_to none "
                            "--lazy_preprocess True training.seed=3".split())
    assert mapped == ["model.path=/m", "data.path=d.json", "output.dir=o", "data.max_len=512", "lora.r=8",
                      "lora.alpha=16", "lora.dropout=0.05", "training.epochs=5", "training.batch_size=2",
                      "training.grad_accum=8", "training.lr=3e-4", "training.weight_decay=0.1",
                      "training.adam_beta2=0.95", "training.warmup_ratio=0.01", "training.scheduler=cosine",
                      "output.logging_steps=1", "output.save_steps=1000", "output.save_total_limit=10",
                      "method=qlora", "training.precision=bf16", "training.gradient_checkpointing=true",
                      "deepspeed=ds.json", "output.report_to=[]", "training.seed=3"]
    assert notes == ["--lazy_preprocess ignored: data is tokenized once and cached"]
    with pytest.raises(ConfigError, match=r"unknown finetune.py flag --lora_rank; did you mean --lora_r\?"):
        convert(["--lora_rank", "8"])


def test_reference_script_takes_finetune_flags(tmp_path):
    base = build_from_config(_write(tmp_path / "c.json", SMALL), tmp_path / "base", seed=0)
    data = _write(tmp_path / "d.json", json.loads((EXAMPLES / "example.json").read_text())[:4])
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("MODEL", "DATA")} | {"PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        ["bash", "scripts/finetune_lora_single_gpu.sh", "--model_name_or_path", str(base), "--data_path", str(data),
         "--output_dir", str(out), "--model_max_length", "96", "--max_steps", "1", "--lora_r", "2",
         "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--report_to", "none",
         "--bf16", "False", "--gradient_checkpointing", "False", "--lazy_preprocess", "True"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    recorded = yaml.safe_load((out / "qwen_tune_recipe.yaml").read_text())
    assert (recorded["data"]["max_len"], recorded["lora"]["r"], recorded["training"]["max_steps"]) == (96, 2, 1)
    assert recorded["training"]["gradient_checkpointing"] is False and recorded["output"]["report_to"] == []
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 1


def _write(path, obj):
    path.write_text(json.dumps(obj, ensure_ascii=False))
    return path


def test_train_takes_overrides_as_flags_without_a_double_dash(capsys):
    from conftest import run_cli
    from qwen_tune.cli.main import build_parser
    from qwen_tune.cli.train import route_overrides
    from qwen_tune.config import load_recipe

    argv = ["train", "--lora_r", "8", "--recipe", "tiny", "--training.lr=2e-4", "lora_alpha=32", "--model_max_length",
            "96", "output.dir=o", "--report_to", "none", "--verbose"]
    args = build_parser().parse_args(route_overrides(argv))
    assert args.recipe == "tiny" and args.nproc is None
    overrides, _ = convert(args.overrides)
    assert overrides == ["lora.r=8", "training.lr=2e-4", "lora.alpha=32", "data.max_len=96", "output.dir=o",
                         "output.report_to=[]"]
    recipe = load_recipe("tiny", overrides)
    assert (recipe.lora.r, recipe.training.lr, recipe.lora.alpha, recipe.data.max_len) == (8, 2e-4, 32, 96)
    # the old spelling still works, and train's own options are found anywhere, abbreviated as argparse allows
    assert route_overrides(["train", "--rec", "tiny", "--", "--lora_r", "8"]) == ["train", "--rec", "tiny", "--",
                                                                                 "--lora_r", "8"]
    assert route_overrides(["train", "x.y=1", "--nproc", "2", "--recipe=r"]) == ["train", "--nproc", "2",
                                                                                 "--recipe=r", "--", "x.y=1"]
    # through main(): a bad value is named as an override, not rejected by argparse as an unknown option
    assert run_cli("train", "--recipe", "tiny", "--lora_r", "8", "--training.lr", "oops") == 2
    err = capsys.readouterr().err
    assert "override training.lr=oops" in err and "unrecognized arguments" not in err


def test_undotted_keys_map_only_when_unambiguous():
    mapped, _ = convert(["lr=1e-4", "method=full", "seed=3", "data_path=d.json", "eval_path=e.json"])
    assert mapped == ["training.lr=1e-4", "method=full", "training.seed=3", "data.path=d.json", "data.eval_path=e.json"]
    mapped, _ = convert(["loss=sigmoid", "path=x"])  # training.loss / preference.loss, model.path / data.path
    assert mapped == ["loss=sigmoid", "path=x"]
    from qwen_tune.config import load_recipe

    with pytest.raises(ConfigError, match="loss"):
        load_recipe("tiny", mapped[:1])
