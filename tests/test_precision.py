"""16-bit autocast training keeps trainable weights in fp32: fp16 GradScaler works, small bf16 updates are kept.

Runs `run_training` on CPU with training.precision fp16 / bf16 (CPU autocast + CPU GradScaler, the same
Trainer code paths as on GPUs without / with bf16).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from qwen_tune.config import load_recipe
from qwen_tune.models.loading import build_from_config
from qwen_tune.train.precision import autocast_master_weights, load_dtype, upcast_trainable
from qwen_tune.train.run import run_training
from test_train import TINY


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("precision_bases")
    out = {}
    for chat in (True, False):
        cfg = root / f"cfg_{chat}.json"
        cfg.write_text(json.dumps({**TINY, "qwen_tune_is_chat": chat}))
        out[chat] = build_from_config(cfg, root / ("chat" if chat else "base"), seed=1)
    return out


def _recipe(base, out, method, *extra):
    return load_recipe("lora", [f"model.path={base}", "data.path=data_examples/example.json", f"output.dir={out}",
                                f"method={method}", "data.max_len=128", "training.batch_size=2",
                                "training.grad_accum=1", "training.max_steps=3", "training.warmup_ratio=0",
                                "training.weight_decay=0", "training.use_cpu=true", "output.logging_steps=1",
                                "output.report_to=[]", "output.save_steps=100", "lora.r=4", "lora.dropout=0",
                                *extra])


@pytest.mark.parametrize("method,chat", [("full", True), ("lora", False)], ids=["full", "lora-trainable-embeddings"])
def test_fp16_autocast_grad_scaler_steps(bases, method, chat):
    """Before: "Attempting to unscale FP16 gradients" at the first step (fp16 weights trained under the GradScaler).

    accelerate autocasts fp16 only on accelerators, so this runs what the Trainer runs there, step by step:
    run_training's loading and preparation, then torch's fp16 autocast and GradScaler (on CPU).
    """
    from qwen_tune.train.loading import load_model
    from qwen_tune.train.methods import apply_method

    recipe = _recipe(bases[chat], "unused", method, "training.precision=fp16")
    autocast = autocast_master_weights("fp16", None, use_cpu=False)  # a GPU without bf16
    loaded = load_model(bases[chat], dtype=load_dtype(method, "auto", "fp16", autocast))
    model = apply_method(loaded.model, recipe, loaded.family, loaded.is_chat)
    upcast_trainable(model, autocast)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
    if method == "lora":
        assert any("embed_tokens" in n for n in trainable) and any("lm_head" in n for n in trainable)
        assert any(p.dtype == torch.float16 for p in model.parameters())  # the frozen base stays 16-bit
    before = {n: p.detach().clone() for n, p in trainable.items()}
    opt = torch.optim.AdamW(trainable.values(), lr=1e-3, weight_decay=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)  # small enough that this first step is not skipped
    ids = torch.tensor([[151644, 872, 198, 9707, 11, 1879, 0, 151645, 198, 151644, 77091, 198, 9707, 151645]])
    with torch.autocast("cpu", dtype=torch.float16):
        loss = model(input_ids=ids, labels=ids).loss
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    scaler.step(opt)
    scaler.update()
    assert torch.isfinite(loss) and scaler.get_scale() == 1024.0  # no inf/nan gradient: the step was taken
    assert all(not torch.equal(before[n], p) for n, p in trainable.items() if "lora_A" not in n), "did not step"


def test_bf16_full_finetuning_small_lr_moves_weights(bases, tmp_path):
    """Pure bf16 AdamW rounds 1e-5 updates away (most weights never change); fp32 master weights keep them."""
    run_training(_recipe(bases[True], tmp_path / "out", "full", "training.precision=bf16", "training.lr=1e-5"))
    before = load_file(bases[True] / "model.safetensors")
    after = load_file(tmp_path / "out" / "model.safetensors")
    moved = total = 0
    for k, w in after.items():
        if k.endswith("norm.weight") or "embed_tokens" in k:
            continue  # norms start at 1.0 (coarse spacing in any dtype); unseen tokens' embedding rows get no gradient
        moved += int((w != before[k].to(w.dtype)).sum())  # compared in the dtype training kept the weights in
        total += w.numel()
    assert moved / total > 0.95, f"only {moved / total:.1%} of the weights moved"


def test_load_dtype_and_upcast():
    assert autocast_master_weights("bf16", None, use_cpu=True) and autocast_master_weights("fp16", None, False)
    assert not autocast_master_weights("fp16", None, use_cpu=True)  # accelerate does not autocast fp16 on CPU
    assert not autocast_master_weights("bf16", "ds_configs/zero3.json", False)  # DeepSpeed keeps fp32 masters
    assert not autocast_master_weights("fp32", None, False)
    assert load_dtype("full", "auto", "bf16", autocast=True) == "fp32"
    assert load_dtype("full", "auto", "bf16", autocast=False) == "bf16"
    assert load_dtype("lora", "auto", "fp16", autocast=True) == "fp16"  # the frozen base stays 16-bit
    assert load_dtype("full", "bf16", "bf16", autocast=True) == "bf16"  # an explicit model.dtype wins
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)).half()
    model[0].requires_grad_(False)
    assert upcast_trainable(model, autocast=False) == 0
    assert upcast_trainable(model, autocast=True) == 2
    assert model[0].weight.dtype == torch.float16 and model[1].weight.dtype == torch.float32


def test_full_finetuning_saves_in_the_base_dtype(bases, tmp_path):
    """fp32 master weights during training, but a bf16 base leaves as a bf16 model (not twice its size)."""
    import shutil

    from safetensors.torch import save_file

    base = tmp_path / "bf16_base"
    shutil.copytree(bases[True], base)
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(bases[True] / "model.safetensors").items()},
              str(base / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**cfg, "torch_dtype": "bfloat16", "dtype": "bfloat16"}))
    run_training(_recipe(base, tmp_path / "out", "full", "training.precision=bf16", "training.max_steps=1"))
    saved = load_file(tmp_path / "out" / "model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    size = (tmp_path / "out" / "model.safetensors").stat().st_size
    assert size < 1.05 * (base / "model.safetensors").stat().st_size
