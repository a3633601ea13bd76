"""The training recipe, top to bottom: recipe -> model -> data -> method -> Trainer -> outputs."""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainingArguments, set_seed

from ..config import ConfigError, Recipe
from ..data.collators import make_collator
from ..data.dataset import prepare_data
from ..models.families import get_family
from ..models.loading import build_from_config, detect_is_chat, load_model, resolve_precision
from .distributed import (check_combination, fsdp_arguments, init_distributed_for_cpu, quiet_non_main_ranks,
                          single_process_group_env, zero3_init_disabled, zero_stage)
from .methods import apply_method, count_parameters, lora_modules_to_save
from .quant import prepare_loaded_model, quantization_kwargs, resolve_quantized_precision
from .trainer import CheckpointSaveError, QwenTrainer, first_line, is_disk_full, latest_complete_checkpoint

log = logging.getLogger("qwen_tune")
RECIPE_FILE = "qwen_tune_recipe.yaml"


@dataclass
class RunResult:
    output_dir: Path
    base_model: Path
    global_step: int
    log_history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def _use_cpu(recipe: Recipe) -> bool:
    return recipe.training.use_cpu if recipe.training.use_cpu is not None else not torch.cuda.is_available()


def _check_output_dir(out: Path, recipe: Recipe) -> str | None:
    """Returns the checkpoint to resume from; refuses to silently mix two runs in one directory."""
    resume = recipe.output.resume_from_checkpoint
    if resume == "auto":
        ckpt = latest_complete_checkpoint(out)
        if ckpt:
            log.info("resuming from %s", ckpt)
        else:
            log.info("resume_from_checkpoint=auto: no complete checkpoint in %s, starting fresh", out)
        return ckpt
    if resume:
        if not Path(resume).is_dir():
            raise ConfigError(f"output.resume_from_checkpoint: {resume} is not a checkpoint directory")
        return resume
    if out.exists() and any(out.glob("checkpoint-*")) and not recipe.output.overwrite:
        raise ConfigError(f"{out} already holds checkpoints of an earlier run: set output.resume_from_checkpoint=auto "
                          "to continue it, output.overwrite=true to start over, or another output.dir")
    if out.exists() and recipe.output.overwrite:
        for d in out.glob("checkpoint-*"):
            shutil.rmtree(d, ignore_errors=True)
    return None


def _planned_trainable_embeddings(recipe: Recipe) -> bool:
    """Whether LoRA will train embeddings/lm_head, decided from config files alone (no weights, no tokenizer).

    Only ZeRO-3 refuses it, so only then are the checkpoint's files read.
    """
    if recipe.method == "full" or zero_stage(recipe.deepspeed) != 3:
        return False
    if recipe.model.from_config:
        cfg = json.loads(Path(recipe.model.from_config).read_text())
        model_type, chat = cfg.get("model_type", "qwen2"), bool(cfg.get("qwen_tune_is_chat", True))
    else:
        path = Path(recipe.model.path)
        if not (path / "config.json").is_file():
            return False  # a hub name: decided after download, in apply_method
        model_type, chat = json.loads((path / "config.json").read_text())["model_type"], detect_is_chat(path)
    if recipe.model.is_chat is not None:
        chat = recipe.model.is_chat
    return bool(lora_modules_to_save(recipe, get_family(model_type), chat))


def check_before_launch(recipe: Recipe) -> None:
    """Every method x engine refusal, before any process is spawned or any model loaded (one line, rank 0 alike)."""
    check_combination(recipe, trainable_embeddings=_planned_trainable_embeddings(recipe))


class ThroughputWindow(TrainerCallback):
    """Times training from the end of the first optimizer step of this session to the end of training.

    The first step carries one-time costs (DeepSpeed's op JIT compilation, allocator and kernel warm-up): issue 12
    measured 26 tokens/s reported vs 283 trained on a fresh machine when it was included.
    """

    def __init__(self) -> None:
        self.start: tuple[float, int] | None = None
        self.end: tuple[float, int] | None = None

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        mark = (time.perf_counter(), int(state.num_input_tokens_seen or 0))
        if self.start is None:
            self.start = mark
        self.end = mark


def training_arguments(recipe: Recipe, out: Path, has_eval: bool) -> TrainingArguments:
    t, o = recipe.training, recipe.output
    use_cpu = _use_cpu(recipe)
    precision = resolve_precision(t.precision, use_cpu)
    return TrainingArguments(
        output_dir=str(out),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay,
        adam_beta2=t.adam_beta2,
        max_grad_norm=t.max_grad_norm,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=use_cpu,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=o.logging_steps,
        save_strategy="steps",
        save_steps=o.save_steps,
        save_total_limit=o.save_total_limit,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=t.eval_steps or o.save_steps,
        report_to=o.report_to or "none",
        remove_unused_columns=False,  # collators pick their columns; the model signature may be wrapped
        include_num_input_tokens_seen="non_padding",
        prediction_loss_only=True,
        deepspeed=recipe.deepspeed,
        **fsdp_arguments(recipe.fsdp),
        dataloader_num_workers=t.dataloader_workers,
        ddp_find_unused_parameters=False,
    )


def run_training(recipe: Recipe, callbacks: list[Any] | None = None) -> RunResult:
    """Train as the recipe says; `callbacks` are extra transformers TrainerCallbacks (e.g. a profiler's timer)."""
    quiet_non_main_ranks()
    out = Path(recipe.output.dir)
    resume = _check_output_dir(out, recipe)
    check_before_launch(recipe)
    if recipe.fsdp and _use_cpu(recipe):
        log.warning("fsdp: FSDP needs GPUs; on CPU the Trainer silently trains with plain DDP (no sharding)")
    resolve_quantized_precision(recipe, _use_cpu(recipe))  # GPTQ: bf16 refused, auto -> fp16 (GPU) / fp32 (CPU)
    if recipe.deepspeed:
        single_process_group_env()
        if _use_cpu(recipe):
            init_distributed_for_cpu()

    # TrainingArguments come first: under ZeRO-3 they make from_pretrained partition weights on load.
    args = training_arguments(recipe, out, bool(recipe.data.eval_datasets or recipe.data.eval_split_ratio))
    if args.should_save:
        out.mkdir(parents=True, exist_ok=True)
        (out / RECIPE_FILE).write_text(recipe.to_yaml(), encoding="utf-8")

    base = recipe.model.path
    if recipe.model.from_config:
        with args.main_process_first(desc="building the base model"), zero3_init_disabled():
            base = str(build_from_config(recipe.model.from_config, out / "base_model", recipe.model.seed))
    # Seeded after the base exists: building it draws from the RNG, reusing it does not, and a restarted run
    # (which finds base_model/) must draw the same LoRA init and dropout masks as the first attempt.
    set_seed(recipe.training.seed)
    precision = resolve_precision(recipe.training.precision, _use_cpu(recipe))
    dtype = recipe.model.dtype if recipe.model.dtype != "auto" else precision
    loaded = load_model(base, dtype=dtype, attn_implementation=recipe.model.attn_implementation,
                        tokenizer_path=recipe.model.tokenizer, is_chat=recipe.model.is_chat,
                        **quantization_kwargs(recipe, base))
    prepare_loaded_model(loaded.model)
    log.info("model: %s (%s family, %s checkpoint) from %s", type(loaded.model).__name__, loaded.family.name,
             "chat" if loaded.is_chat else "base", base)

    with args.main_process_first(desc="tokenizing"):
        data = prepare_data(recipe.data, loaded.tokenizer, seed=recipe.training.seed)
    for report in data.reports:
        for line in report.lines():
            log.info(line)
    if args.should_save:
        (out / "data_report.json").write_text(json.dumps([r.to_dict() for r in data.reports], indent=2))

    model = apply_method(loaded.model, recipe, loaded.family, loaded.is_chat)
    trainable, total = count_parameters(model)
    log.info("trainable parameters: %s of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1))

    collator = make_collator(recipe.data.packing, loaded.tokenizer.pad_token_id, recipe.data.pad_to_multiple_of,
                             recipe.model.attn_implementation)
    trainer = QwenTrainer(model=model, args=args, train_dataset=data.train, eval_dataset=data.eval,
                          data_collator=collator, processing_class=loaded.tokenizer,
                          callbacks=[*(callbacks or []), window := ThroughputWindow()],
                          loss_mode=recipe.training.loss, loss_chunk_size=recipe.training.loss_chunk_size)
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    elapsed = time.perf_counter() - start

    if recipe.output.save_final:
        try:
            trainer.save_model(str(out))
            if args.should_save:
                loaded.tokenizer.save_pretrained(str(out))
                _copy_generation_config(Path(base), out)
        except Exception as e:
            if not is_disk_full(e):
                raise
            raise CheckpointSaveError(f"disk full while saving the final model to {out} ({first_line(e)}); the "
                                      f"checkpoints in {out} are intact: free space and rerun with "
                                      "output.resume_from_checkpoint=auto") from None
    summary = _summary(trainer, result, elapsed, trainable, total, window)
    summary["engine"] = engine_info(trainer)
    if args.should_save:
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
        plot_loss_curve(trainer.state.log_history, out / "loss_curve.png")
    return RunResult(out, Path(base), trainer.state.global_step, trainer.state.log_history, summary)


def _copy_generation_config(base: Path, out: Path) -> None:
    src = base / "generation_config.json"
    if src.exists() and not (out / "generation_config.json").exists():
        shutil.copy2(src, out / "generation_config.json")


def _peak_memory_bytes() -> int:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _summary(trainer: QwenTrainer, result: Any, elapsed: float, trainable: int, total: int,
             window: ThroughputWindow) -> dict[str, Any]:
    label_tokens = trainer.label_tokens
    seen = int(trainer.state.num_input_tokens_seen or 0)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        t = torch.tensor([label_tokens], device=trainer.args.device)
        torch.distributed.all_reduce(t)
        label_tokens = int(t.item())
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if window.start and window.end and window.end[0] > window.start[0]:
        span, tokens = window.end[0] - window.start[0], window.end[1] - window.start[1]
        window_desc = {"from": "end of the first step", "seconds": round(span, 3), "input_tokens": tokens}
    else:
        span, tokens = elapsed, seen
        window_desc = {"from": "start (one step only: includes warm-up)", "seconds": round(span, 3),
                       "input_tokens": tokens}
    tokens_per_s = round(tokens / span, 1) if span > 0 else None
    return {
        "steps": trainer.state.global_step,
        "train_loss": result.training_loss,
        "first_logged_loss": losses[0] if losses else None,
        "last_logged_loss": losses[-1] if losses else None,
        "eval_loss": next((h["eval_loss"] for h in reversed(trainer.state.log_history) if "eval_loss" in h), None),
        "input_tokens": seen,
        "trained_label_tokens_this_session": label_tokens,
        # After the first optimizer step (see ThroughputWindow); the whole session when it ran only one step.
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_window": window_desc,
        "runtime_s": round(elapsed, 2),
        "peak_memory_gb": round(_peak_memory_bytes() / 2**30, 3),
        "trainable_params": trainable,
        "total_params": total,
    }


def engine_info(trainer: QwenTrainer) -> dict[str, Any]:
    """What actually trained: tests and users can check that DeepSpeed/FSDP really ran (not a silent DDP fallback)."""
    engine = trainer.model_wrapped
    stage = None
    if trainer.is_deepspeed_enabled and hasattr(engine, "zero_optimization_stage"):  # a DeepSpeedEngine
        stage = int(engine.zero_optimization_stage())
    import torch.distributed.fsdp as fsdp_mod

    fsdp_types = tuple(t for t in (getattr(fsdp_mod, "FullyShardedDataParallel", None),  # FSDP1
                                   getattr(fsdp_mod, "FSDPModule", None)) if t is not None)  # FSDP2 (fully_shard)
    fsdp = isinstance(engine, fsdp_types) or any(isinstance(m, fsdp_types) for m in engine.modules())
    return {"deepspeed_zero_stage": stage, "fsdp": bool(fsdp), "wrapper": type(engine).__name__,
            "distributed_type": str(trainer.accelerator.distributed_type).rpartition(".")[2],
            "world_size": trainer.accelerator.num_processes}


def plot_loss_curve(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    if not train:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
