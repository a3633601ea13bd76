"""Runs that restart, rotate checkpoints, or split data: what must stay reproducible and intact."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import EXAMPLES
from qwen_tune.config import load_recipe
from qwen_tune.train.run import run_training

SMALL = {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 32, "intermediate_size": 64,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "max_position_embeddings": 1024, "tie_word_embeddings": False, "qwen_tune_is_chat": True}


@pytest.fixture(scope="module")
def small_config(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("cfg") / "small_qwen2.json"
    p.write_text(json.dumps(SMALL))
    return p


@pytest.fixture(scope="module")
def data16(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("data") / "d.json"
    p.write_text(json.dumps(json.loads((EXAMPLES / "example.json").read_text())[:16], ensure_ascii=False))
    return p


def tiny(config: Path, data: Path, out: Path, *extra: str):
    return load_recipe("tiny", [f"model.from_config={config}", f"data.path={data}", f"output.dir={out}",
                                "data.max_len=128", "training.batch_size=2", "training.max_steps=3",
                                "training.warmup_ratio=0", "output.report_to=[]", "output.logging_steps=1",
                                "output.save_steps=100", "lora.r=4", *extra])


def _losses(history) -> list[float]:
    return [h["loss"] for h in history if "loss" in h]


def test_restart_before_first_checkpoint_reproduces_losses(small_config, data16, tmp_path):
    """A run killed before its first checkpoint finds base_model/ on restart: it must draw the same LoRA init."""
    first = run_training(tiny(small_config, data16, tmp_path / "a"))
    restart = tmp_path / "b"
    restart.mkdir()
    shutil.copytree(tmp_path / "a" / "base_model", restart / "base_model")  # what the killed run left behind
    again = run_training(tiny(small_config, data16, restart))
    assert _losses(first.log_history) == _losses(again.log_history)
