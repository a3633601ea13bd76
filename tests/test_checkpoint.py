"""Checkpoint-directory helpers shared by merge, quantize and dequantize (qwen_tune/checkpoint.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from qwen_tune.checkpoint import (checkpoint_dtype, copy_extra_files, detect_is_chat, publish,
                                  read_quantization_config, weight_files)


def test_extra_files_never_follow_links_out_of_the_source(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("private key")
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "README.md").write_text("readme")
    (src / "model.safetensors").write_bytes(b"weights")
    (src / "tokenizer.json").symlink_to(src / "README.md")  # inside: copied as a file
    (src / "leak.txt").symlink_to(secret)  # outside: never copied
    (src / "sub" / "notes.txt").write_text("notes")
    (src / "sub" / "leak.txt").symlink_to(secret)
    (src / "linked_dir").symlink_to(tmp_path)  # a folder link out of the source
    dst = tmp_path / "out"
    dst.mkdir()
    copied = copy_extra_files(src, dst)
    assert sorted(copied) == ["README.md", "sub", "tokenizer.json"]
    assert (dst / "tokenizer.json").read_text() == "readme" and not (dst / "tokenizer.json").is_symlink()
    assert (dst / "sub" / "notes.txt").read_text() == "notes"
    assert not (dst / "leak.txt").exists() and not (dst / "sub" / "leak.txt").exists()
    assert not (dst / "linked_dir").exists() and not (dst / "model.safetensors").exists()
    assert not (dst / "config.json").exists()


def test_hub_cache_snapshot_links_into_its_blobs_are_copied(tmp_path: Path) -> None:
    repo = tmp_path / "models--Qwen--Qwen2-0.5B"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "abc").write_text('{"x": 1}')
    snap = repo / "snapshots" / "rev1"
    snap.mkdir(parents=True)
    (snap / "tokenizer_config.json").symlink_to(Path("..") / ".." / "blobs" / "abc")
    dst = tmp_path / "out"
    dst.mkdir()
    assert copy_extra_files(snap, dst) == ["tokenizer_config.json"]
    assert json.loads((dst / "tokenizer_config.json").read_text()) == {"x": 1}


def test_one_dtype_rule() -> None:
    assert checkpoint_dtype({"torch_dtype": "bfloat16"}) == "bf16"
    assert checkpoint_dtype({"dtype": "torch.float16"}) == "fp16"
    assert checkpoint_dtype({"model_type": "qwen", "bf16": False, "fp16": True}) == "fp16"
    assert checkpoint_dtype({}) == "fp32"  # unstated: fp32, lossless


def test_weight_files_prefer_safetensors_and_quantization_config_sources(tmp_path: Path) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    assert [f.name for f in weight_files(tmp_path)] == ["pytorch_model.bin"]
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert [f.name for f in weight_files(tmp_path)] == ["model.safetensors"]
    (tmp_path / "config.json").write_text("{}")
    assert read_quantization_config(tmp_path) is None
    (tmp_path / "quantize_config.json").write_text('{"bits": 4}')
    assert read_quantization_config(tmp_path) == {"quant_method": "gptq", "bits": 4}
    assert read_quantization_config(tmp_path, config_json_only=True) is None
    assert read_quantization_config(None) is None


def test_chat_detection(tmp_path: Path) -> None:
    assert detect_is_chat(tmp_path)  # no generation config: assumed chat
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": 151643}')
    assert not detect_is_chat(tmp_path)
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [151645, 151643]}')
    assert detect_is_chat(tmp_path)
    (tmp_path / "generation_config.json").write_text('{"chat_format": "raw", "eos_token_id": 151645}')
    assert not detect_is_chat(tmp_path)


def test_publish_replaces_only_after_success(tmp_path: Path) -> None:
    out, tmp = tmp_path / "out", tmp_path / "out.tmp"
    out.mkdir()
    (out / "old").write_text("old")
    tmp.mkdir()
    (tmp / "new").write_text("new")
    publish(tmp, out)
    assert sorted(os.listdir(out)) == ["new"] and not tmp.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with pytest.raises(OSError):
        publish(tmp_path / "missing", out)
    assert (out / "new").is_file()  # the old output is restored when the rename fails
