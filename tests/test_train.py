"""Training through `qwen-tune train` on tiny Qwen2 checkpoints: methods, outputs, resume, config errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import EXAMPLES, run_cli
from qwen_tune.config import ConfigError, load_recipe
from qwen_tune.models.loading import build_from_config
from qwen_tune.train.run import run_training

TINY = {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
        "tie_word_embeddings": False}


def make_base(root: Path, chat: bool) -> Path:
    cfg = root / f"cfg_{chat}.json"
    cfg.write_text(json.dumps({**TINY, "qwen_tune_is_chat": chat}))
    return build_from_config(cfg, root / ("chat" if chat else "base"), seed=1)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return {"chat": make_base(root, True), "base": make_base(root, False)}


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    recs = json.loads((EXAMPLES / "example.json").read_text())[:24]
    p = tmp_path_factory.mktemp("data") / "small.json"
    p.write_text(json.dumps(recs, ensure_ascii=False))
    return p


def overrides(base: Path, data: Path, out: Path, method: str, *extra: str) -> list[str]:
    return [f"model.path={base}", f"data.path={data}", f"output.dir={out}", f"method={method}",
            "data.max_len=128", "training.batch_size=2", "training.grad_accum=2", "training.max_steps=6",
            "training.gradient_checkpointing=true", "training.warmup_ratio=0", "training.weight_decay=0",
            "output.logging_steps=1", "output.report_to=[]", "output.save_steps=3", "lora.r=8",
            "lora.dropout=0", *extra]


def recipe(base: Path, data: Path, out: Path, method: str, *extra: str):
    return load_recipe("lora", overrides(base, data, out, method, *extra))


def snapshot(model_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in load_file(model_dir / "model.safetensors").items()}


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


PROBE = torch.tensor([[151644, 872, 198, 9707, 11, 1879, 0, 151645, 198, 151644, 77091, 198]])


def test_lora_trains_saves_and_reloads_with_peft(bases, small_data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    r = run_training(recipe(bases["chat"], small_data, tmp_path / "out", "lora", "training.lr=3e-2",
                            "lora.target_modules=[q_proj,v_proj,down_proj,lm_head]"))
    losses = [h["loss"] for h in r.log_history if "loss" in h]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.3
    out = tmp_path / "out"
    assert (out / "adapter_model.safetensors").exists() and (out / "adapter_config.json").exists()
    assert (out / "qwen_tune_recipe.yaml").exists() and (out / "loss_curve.png").exists()
    summary = json.loads((out / "train_summary.json").read_text())
    # r=8 LoRA pairs: q_proj 32->32, v_proj 32->16, down_proj 64->32 in 2 layers, lm_head 32->151936.
    assert summary["steps"] == 6
    assert summary["trainable_params"] == 8 * (2 * ((32 + 32) + (32 + 16) + (64 + 32)) + (32 + 151936))
    adapter = load_file(out / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)  # chat model: no embeddings saved
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)
    # Plain transformers + peft reproduce the trained model.
    base = AutoModelForCausalLM.from_pretrained(bases["chat"], dtype=torch.float32)
    before = logits(base, PROBE)
    tuned = PeftModel.from_pretrained(base, out).eval()
    after = logits(tuned, PROBE)
    assert not torch.allclose(before, after, atol=1e-4)
    again = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(bases["chat"]), out).eval()
    torch.testing.assert_close(logits(again, PROBE), after)


def test_lora_on_base_model_trains_embeddings_automatically(bases, small_data, tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO)
    run_training(recipe(bases["base"], small_data, tmp_path / "out", "lora", "training.lr=1e-3"))
    assert "base (non-chat) checkpoint" in caplog.text
    adapter = load_file(tmp_path / "out" / "adapter_model.safetensors")
    names = list(adapter)
    assert any("embed_tokens" in k for k in names) and any("lm_head" in k for k in names)
    orig = load_file(bases["base"] / "model.safetensors")
    emb = next(v for k, v in adapter.items() if "embed_tokens" in k)
    assert not torch.equal(emb, orig["model.embed_tokens.weight"])  # trained copy differs from the base
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert set(cfg["modules_to_save"]) >= {"embed_tokens", "lm_head"}


def test_full_training_changes_exactly_the_unfrozen_weights(bases, small_data, tmp_path):
    from transformers import AutoModelForCausalLM

    run_training(recipe(bases["chat"], small_data, tmp_path / "out", "full", "training.lr=1e-3",
                        "training.freeze=[embed_tokens,layers.0.]"))
    before, after = snapshot(bases["chat"]), snapshot(tmp_path / "out")
    assert before.keys() == after.keys()
    for k in before:
        changed = not torch.equal(before[k], after[k])
        frozen = "embed_tokens" in k or ".layers.0." in k
        assert changed != frozen, k
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert m.model.layers[1].mlp.down_proj.weight.dtype == torch.float32


def test_resume_reproduces_uninterrupted_losses(bases, small_data, tmp_path):
    full = run_training(recipe(bases["chat"], small_data, tmp_path / "a", "lora", "training.lr=5e-3"))
    # Interrupted run: stop after the first checkpoint (step 3), as if killed, then resume.
    first = run_training(recipe(bases["chat"], small_data, tmp_path / "b", "lora", "training.lr=5e-3",
                                "training.max_steps=6", "output.save_final=false", "output.save_steps=3"))
    assert (tmp_path / "b" / "checkpoint-3" / "qwen_tune_complete").exists()
    import shutil

    shutil.rmtree(tmp_path / "b" / "checkpoint-6")  # the kill happened before step 6 was saved
    resumed = run_training(recipe(bases["chat"], small_data, tmp_path / "b", "lora", "training.lr=5e-3",
                                  "output.resume_from_checkpoint=auto"))
    ref = {h["step"]: h["loss"] for h in full.log_history if "loss" in h}
    got = {h["step"]: h["loss"] for h in resumed.log_history if "loss" in h}
    assert sorted(got) == [1, 2, 3, 4, 5, 6]  # restored history plus the resumed steps
    for step in (4, 5, 6):
        assert got[step] == pytest.approx(ref[step], rel=1e-4), step
    assert first.global_step == 6


def test_incomplete_checkpoint_is_not_resumed(tmp_path):
    from qwen_tune.train.trainer import latest_complete_checkpoint, mark_complete

    for step in (2, 4, 6):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "model.safetensors").write_bytes(b"x" * 100)
        (tmp_path / f"checkpoint-{step}" / "optimizer.pt").write_bytes(b"y" * 100)
    mark_complete(tmp_path / "checkpoint-2", 2)
    mark_complete(tmp_path / "checkpoint-4", 4)
    (tmp_path / "checkpoint-4" / "optimizer.pt").unlink()  # half-deleted: its marker vouches for a missing file
    (tmp_path / "checkpoint-6" / "qwen_tune_complete").write_text("6")  # a marker that vouches for nothing
    assert latest_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
    (tmp_path / "checkpoint-2" / "model.safetensors").write_bytes(b"x" * 50)  # truncated after the save
    assert latest_complete_checkpoint(tmp_path) is None


class _Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs."""


def test_kill_during_checkpoint_rotation_leaves_a_resumable_checkpoint(bases, small_data, tmp_path, monkeypatch):
    import shutil

    from qwen_tune.train.trainer import latest_complete_checkpoint

    out = tmp_path / "rot"
    real_rmtree = shutil.rmtree

    def killed_while_deleting(path, *a, **kw):
        path = Path(path)
        if not path.name.startswith("checkpoint-"):
            return real_rmtree(path, *a, **kw)
        next(f for f in sorted(path.iterdir()) if f.name != "qwen_tune_complete").unlink()  # half deleted
        raise _Killed

    monkeypatch.setattr(shutil, "rmtree", killed_while_deleting)
    with pytest.raises(_Killed):  # at step 4, rotating checkpoint-2 away (save_total_limit=1)
        run_training(recipe(bases["chat"], small_data, out, "lora", "training.max_steps=4", "output.save_steps=2",
                            "output.save_total_limit=1"))
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    assert latest_complete_checkpoint(out) == str(out / "checkpoint-4")
    assert not (out / "checkpoint-2" / "qwen_tune_complete").exists()
    resumed = run_training(recipe(bases["chat"], small_data, out, "lora", "training.max_steps=5",
                                  "output.save_steps=2", "output.save_total_limit=1",
                                  "output.resume_from_checkpoint=auto"))
    assert resumed.global_step == 5 and sorted(h["step"] for h in resumed.log_history if "loss" in h) == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-5"]


@pytest.mark.parametrize("override, expected", [
    ("training.learning_rate=1e-4", "unknown key `training.learning_rate`; did you mean `training.lr`?"),
    ("trainig.lr=1", "unknown key `trainig`; did you mean `training`?"),
    ("training.batch_size=two", "`training.batch_size`: Input should be a valid integer"),
    ("method=dpo", "`method`: Input should be 'full', 'lora' or 'qlora'"),
])
def test_config_errors_are_one_clear_line(override, expected, capsys):
    assert run_cli("train", "--recipe", "lora", override) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_missing_data_file_is_one_clear_line(bases, tmp_path, capsys):
    rc = run_cli("train", "--recipe", "lora", f"model.path={bases['chat']}", "data.path=/nonexistent/data.json",
                 f"output.dir={tmp_path / 'o'}", "output.report_to=[]")
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "/nonexistent/data.json" in err and "Traceback" not in err


def test_bundled_recipe_lookup_and_listing(capsys):
    assert run_cli("recipes") == 0
    out = capsys.readouterr().out
    for name in ("tiny", "lora", "lora_base", "full", "qlora", "lora_ds", "full_ds"):
        assert name in out
    with pytest.raises(ConfigError, match="not found"):
        load_recipe("no_such_recipe")


def test_nan_loss_stops_before_the_optimizer_step(bases, small_data, tmp_path, capsys):
    out = tmp_path / "nan"
    common = [f"model.path={bases['chat']}", f"data.path={small_data}", f"output.dir={out}", "method=full",
              "data.max_len=128", "training.batch_size=2", "training.grad_accum=1", "training.warmup_ratio=0",
              "training.gradient_checkpointing=false", "output.report_to=[]", "output.save_steps=1",
              "training.max_grad_norm=0", "training.scheduler=constant"]
    # A huge learning rate blows the weights up after the first updates; the loss then becomes non-finite.
    rc = run_cli("train", "--recipe", "full", *common, "training.lr=1e30", "training.max_steps=8")
    err = capsys.readouterr().err
    assert rc == 3 and "loss became" in err and "last checkpoint is intact" in err
    from qwen_tune.train.trainer import latest_complete_checkpoint

    ckpt = latest_complete_checkpoint(out)
    step = int(err.split("at step ")[1].split(";")[0])
    # Every step before the bad one was saved; the bad step was neither applied nor saved.
    assert ckpt == str(out / f"checkpoint-{step - 1}") and not (out / f"checkpoint-{step}").exists()
    weights = load_file(Path(ckpt) / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_trained_label_tokens_exclude_evaluation(bases, small_data, tmp_path):
    common = ["training.max_steps=4", "training.grad_accum=1", "output.save_steps=100"]
    plain = run_training(recipe(bases["chat"], small_data, tmp_path / "a", "lora", *common))
    evaluated = run_training(recipe(bases["chat"], small_data, tmp_path / "b", "lora", *common,
                                    f"data.eval_path={small_data}", "training.eval_steps=1"))
    assert any("eval_loss" in h for h in evaluated.log_history)
    got = evaluated.summary["trained_label_tokens_this_session"]
    assert got == plain.summary["trained_label_tokens_this_session"] > 0


def test_tokens_per_s_excludes_the_first_step(bases, small_data, tmp_path):
    import time

    from transformers import TrainerCallback

    class OneTimeCompile(TrainerCallback):  # what DeepSpeed's op JIT costs on a fresh machine, once
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 0:
                time.sleep(4)

    r = run_training(recipe(bases["chat"], small_data, tmp_path / "o", "lora", "training.max_steps=3",
                            "output.save_steps=100"), callbacks=[OneTimeCompile()])
    s = r.summary
    window = s["tokens_per_s_window"]
    assert window["from"] == "end of the first step" and window["seconds"] <= s["runtime_s"] - 4
    assert 0 < window["input_tokens"] < s["input_tokens"]
    # the window's seconds are rounded to 1 ms in the summary: compare to that precision
    assert s["tokens_per_s"] == pytest.approx(window["input_tokens"] / window["seconds"], rel=2e-3)
    assert s["tokens_per_s"] > s["input_tokens"] / s["runtime_s"]


@pytest.fixture
def small_tmpfs(mount_tmpfs):
    """A 30 MB filesystem: one LoRA checkpoint of the tiny model (~19 MB, mostly tokenizer.json) fits, two do not."""
    return mount_tmpfs(30)


def test_disk_full_during_a_checkpoint_save(bases, small_data, small_tmpfs, capsys, caplog):
    import logging
    import subprocess

    caplog.set_level(logging.INFO)

    from qwen_tune.train.trainer import latest_complete_checkpoint

    out = small_tmpfs / "run"
    args = overrides(bases["chat"], small_data, out, "lora", "training.max_steps=2", "output.save_steps=1",
                     "output.save_total_limit=null", "output.resume_from_checkpoint=auto")
    rc = run_cli("train", "--recipe", "lora", *args)
    err = capsys.readouterr().err
    assert rc == 4 and "Traceback" not in err and err.count("error: ") == 1, err[-3000:]
    line = err[err.index("error: "):].splitlines()[0]  # (after tqdm's last progress bar, on the same line)
    assert "disk full while saving" in line and f"{out / 'checkpoint-1'}, is intact" in line
    assert latest_complete_checkpoint(out) == str(out / "checkpoint-1")
    assert not (out / "checkpoint-2").exists()  # the partial save is gone, not left looking resumable
    # Space freed: the same command resumes from checkpoint-1 and finishes.
    subprocess.run(["mount", "-o", "remount,size=120m", str(small_tmpfs)], check=True)
    assert run_cli("train", "--recipe", "lora", *args) == 0
    assert "resuming from " + str(out / "checkpoint-1") in caplog.text
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 2
    assert latest_complete_checkpoint(out) == str(out / "checkpoint-2")


@pytest.mark.parametrize("precision", ["auto", "fp32", "bf16"])
def test_cpu_bf16_hint_only_for_auto_on_a_bf16_cpu(bases, small_data, tmp_path, caplog, precision):
    """precision auto stays fp32 on CPU; where the CPU multiplies bf16 natively the log names the faster knob."""
    import logging

    from qwen_tune.models.loading import cpu_bf16_matmul
    from qwen_tune.train.run import setup_run

    caplog.set_level(logging.INFO)
    r = recipe(bases["chat"], small_data, tmp_path / "out", "lora", f"training.precision={precision}")
    setup_run(r, tmp_path / "out")
    hint = "this CPU has native bf16 matmuls" in caplog.text
    assert hint == (precision == "auto" and cpu_bf16_matmul() is not None)
    if hint:
        assert f"({cpu_bf16_matmul()})" in caplog.text
