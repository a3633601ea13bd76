"""A regular (non-editable) install: the wheel alone must carry recipes, DeepSpeed configs and the demo's data."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 900) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_lists_recipes_and_trains_the_tiny_demo(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    # Build from a copy: the checkout's own build/ and egg-info stay untouched.
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy2(ROOT / "pyproject.toml", src)
    shutil.copy2(ROOT / "README.md", src)
    shutil.copytree(ROOT / "qwen_tune", src / "qwen_tune", ignore=shutil.ignore_patterns("__pycache__"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", ".", "-w",
          str(tmp_path / "dist")], src, env)
    wheel = next((tmp_path / "dist").glob("qwen_tune-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for want in ("qwen_tune/recipes/tiny.yaml", "qwen_tune/ds_configs/zero3.json", "qwen_tune/assets/tiny_qwen2.json",
                 "qwen_tune/data_examples/example.json"):
        assert want in names, f"{want} not in the wheel"

    # Dependencies come from this interpreter's site-packages (no network); qwen-tune itself only from the wheel.
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], tmp_path, env)
    _run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
         tmp_path, env)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run([str(venv / "bin" / "python"), "-c", "import qwen_tune; print(qwen_tune.__file__)"], elsewhere, env)
    assert where.strip().startswith(str(venv)), where

    listing = _run([str(venv / "bin" / "qwen-tune"), "recipes"], elsewhere, env)
    for name in ("tiny", "lora", "full_ds", "qlora"):
        assert any(line.split()[0] == name for line in listing.splitlines()), listing
    _run([str(venv / "bin" / "qwen-tune"), "train", "--recipe", "tiny", "training.max_steps=1", "output.dir=out",
          "output.report_to=[]", "data.max_len=128", "training.batch_size=1", "output.save_steps=100"], elsewhere, env)
    summary = json.loads((elsewhere / "out" / "train_summary.json").read_text())
    assert summary["steps"] == 1
    assert (elsewhere / "out" / "adapter_model.safetensors").exists()
    assert (elsewhere / "out" / "base_model" / "config.json").exists()
