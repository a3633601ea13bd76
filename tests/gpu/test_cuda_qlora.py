"""Q-LoRA steps on GPU whose loss falls: bitsandbytes NF4 (quantized on load) and a GPTQ Int4 checkpoint, through
qwen-tune's PyTorch GPTQ layer and, when installed, gptqmodel's kernels. Real training through run_training."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from cuda_helpers import DEVICE, DRY, record, size, small_chat_data
from qwen_tune.config import load_recipe
from qwen_tune.export.quantize import quantize_checkpoint
from qwen_tune.quant.backend import gptqmodel_available
from qwen_tune.models.loading import build_from_config
from qwen_tune.train.run import run_training

pytestmark = pytest.mark.cuda

# Linear sizes are multiples of 128 so that GPTQ's group_size 128 applies as in the real models.
QWEN2 = {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": size(512, 128),
         "intermediate_size": size(1024, 256), "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 2048, "tie_word_embeddings": False}
STEPS = size(8, 3)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cuda_qlora")
    (root / "qwen2.json").write_text(json.dumps(QWEN2))
    return build_from_config(root / "qwen2.json", root / "qwen2", seed=3)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return small_chat_data(tmp_path_factory.mktemp("cuda_qlora_data") / "small.json")


def _recipe(model: Path, data: Path, out: Path, *extra: str):
    return load_recipe("qlora", [
        f"model.path={model}", f"data.path={data}", f"output.dir={out}", "method=qlora", "data.max_len=128",
        "training.batch_size=2", "training.grad_accum=1", f"training.max_steps={STEPS}", "training.lr=1e-2",
        "training.gradient_checkpointing=true", "training.warmup_ratio=0", "training.weight_decay=0",
        "training.scheduler=constant", f"training.use_cpu={str(DRY).lower()}", "output.logging_steps=1",
        "output.report_to=[]", "output.save_steps=1000", "output.save_final=false", "lora.r=8", "lora.alpha=16",
        "lora.dropout=0", "lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head]",
        *extra])


def _check_falls(name: str, result) -> None:
    losses = [h["loss"] for h in result.log_history if "loss" in h]
    record("qlora_loss", quant=name, losses=[round(x, 4) for x in losses],
           peak_memory_gb=result.summary.get("peak_memory_gb"))
    assert len(losses) == STEPS
    assert all(x == x and x < float("inf") for x in losses), losses
    assert losses[-1] < losses[0] - 0.3 and min(losses[-2:]) <= min(losses), losses


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
def test_nf4_qlora_loss_falls(base, data, tmp_path):
    import torch

    from bitsandbytes.nn import Linear4bit

    from transformers import TrainerCallback

    seen = {}

    class Probe(TrainerCallback):  # what the Trainer really trains: 4-bit layers, on the device
        def on_train_begin(self, args, state, control, model=None, **kw):
            seen["nf4"] = sum(isinstance(m, Linear4bit) for m in model.modules())
            seen["device"] = next(p.device.type for p in model.parameters())

    r = run_training(_recipe(base, data, tmp_path / "nf4", "quantization.method=nf4"), callbacks=[Probe()])
    _check_falls("nf4", r)
    assert seen["nf4"] == 14 and seen["device"] == DEVICE, seen  # 7 linears x 2 layers are 4-bit, on the device
    if not DRY:
        assert torch.cuda.max_memory_allocated() > 0


@pytest.fixture(scope="module")
def int4(base, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cuda_int4") / "int4"
    quantize_checkpoint(base, out, calib=None, algorithm="rtn", dtype="fp16", device=DEVICE, verify=False)
    return out


@pytest.mark.parametrize("backend", ["torch", pytest.param("gptqmodel", marks=pytest.mark.skipif(
    DRY or not gptqmodel_available(), reason="gptqmodel's kernels: CUDA only, when optimum/gptqmodel are installed "
                                             "(its CPU path is covered by tests/test_qlora.py)"))])
def test_gptq_qlora_loss_falls(int4, data, tmp_path, backend, monkeypatch):
    monkeypatch.setenv("QWEN_TUNE_GPTQ_BACKEND", backend)
    r = run_training(_recipe(int4, data, tmp_path / f"gptq_{backend}", "quantization.method=gptq"))
    _check_falls(f"gptq-{backend}", r)
    recipe = json.dumps(open(tmp_path / f"gptq_{backend}" / "qwen_tune_recipe.yaml").read())
    assert ("fp32" if DRY else "fp16") in recipe  # auto precision: fp16 on GPU (the GPTQ kernels' dtype)
