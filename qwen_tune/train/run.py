"""The training recipe, top to bottom: recipe -> model -> data -> method -> Trainer -> outputs."""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import TrainingArguments, set_seed

from ..checkpoint import keep_tokenizer_files, save_in_dtype
from ..models.chat_outputs import finish_chat_outputs
from ..config import ConfigError, Recipe
from ..data.collators import make_collator
from ..data.dataset import PreparedData, prepare_data
from ..data.report import write_errors
from ..models.families import packing_is_exact
from ..models.loading import build_from_config, cpu_bf16_matmul, resolve_precision
from ..quant.backend import quantization_kwargs, resolve_quantized_precision
from ..quant.training import prepare_loaded_model
from .distributed import (fsdp_arguments, init_distributed_for_cpu, quiet_non_main_ranks, single_process_group_env,
                          zero3_init_disabled)
from .devices import check_visible_devices
from .interrupt import GracefulStop
from .loading import LoadedModel, load_model
from .methods import apply_method, count_parameters
from .precision import autocast_master_weights, load_dtype, upcast_trainable
from .preflight import check_before_launch
from .summary import ThroughputWindow, engine_info, plot_loss_curve, summarize
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
    interrupted_by: int | None = None  # the signal that stopped the run early (its checkpoint is saved)


class RunAlreadyFinished(ConfigError):
    """The output dir holds a run that reached its last step: nothing to train (the CLI exits 0)."""


def _use_cpu(recipe: Recipe) -> bool:
    return recipe.training.use_cpu if recipe.training.use_cpu is not None else not torch.cuda.is_available()


def _check_output_dir(out: Path, recipe: Recipe) -> str | None:
    """Returns the checkpoint to resume from; refuses to silently mix two runs in one directory."""
    resume = recipe.output.resume_from_checkpoint
    if resume == "auto" and recipe.output.overwrite:
        resume = None  # start over: the old checkpoints are removed below
    if resume == "auto":
        ckpt = latest_complete_checkpoint(out)
        _refuse_finished(out, ckpt, recipe)
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


def _refuse_finished(out: Path, ckpt: str | None, recipe: Recipe) -> None:
    """Resuming a checkpoint at the run's last step would train one step past it (the Trainer re-enters its loop):
    say the run is done instead."""
    if not ckpt or not (out / "train_summary.json").is_file():
        return
    try:
        state = json.loads((Path(ckpt) / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return
    step, planned = int(state.get("global_step", 0)), int(state.get("max_steps", 0))
    target = recipe.training.max_steps if recipe.training.max_steps > 0 else planned
    if step >= target > 0:
        raise RunAlreadyFinished(f"{out} already holds a finished run ({step}/{target} steps): nothing to train. "
                                 "Raise training.max_steps to train further, or set output.overwrite=true or another "
                                 "output.dir to start over")


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
    """Train as the recipe says; `callbacks` are extra transformers TrainerCallbacks (e.g. a profiler's timer).

    The recipe, top to bottom: check and settle the run, build the TrainingArguments, the base model, the data, the
    trainable model and the trainer, train, save.
    """
    out = Path(recipe.output.dir)
    resume = setup_run(recipe, out)
    # TrainingArguments come first: under ZeRO-3 they make from_pretrained partition weights on load.
    args = training_arguments(recipe, out, bool(recipe.data.eval_datasets or recipe.data.eval_split_ratio))
    created = not out.exists()
    try:
        if args.should_save:
            out.mkdir(parents=True, exist_ok=True)
            (out / RECIPE_FILE).write_text(recipe.to_yaml(), encoding="utf-8")
        base, loaded = build_base_model(recipe, args, out)
        data = build_data(recipe, loaded.tokenizer, args, out)
        model, trainable, total = build_trainable_model(recipe, loaded)
        window = ThroughputWindow()
        stopper = GracefulStop(recipe.output.save_every_minutes)
        trainer = build_trainer(recipe, args, model, loaded.tokenizer, data, [*(callbacks or []), window, stopper])
    except BaseException:
        if created and args.should_save:  # failed before training: leave no stray output dir behind
            shutil.rmtree(out, ignore_errors=True)
        raise

    start = time.perf_counter()
    stopper.install()
    try:
        result = trainer.train(resume_from_checkpoint=resume)
    finally:
        stopper.restore()
    elapsed = time.perf_counter() - start
    if stopper.stop_signal is not None and trainer.state.global_step < trainer.state.max_steps:
        ckpt = latest_complete_checkpoint(out)
        log.warning("stopped at step %d of %d; %s holds its complete checkpoint: rerun the same command to resume "
                    "(output.resume_from_checkpoint=auto)", trainer.state.global_step, trainer.state.max_steps, ckpt)
        return RunResult(out, Path(base), trainer.state.global_step, trainer.state.log_history,
                         interrupted_by=stopper.stop_signal)

    summary = save_outputs(recipe, args, trainer, loaded.tokenizer, Path(base), out,
                           lambda: summarize(trainer, result, elapsed, trainable, total, window))
    return RunResult(out, Path(base), trainer.state.global_step, trainer.state.log_history, summary)


def setup_run(recipe: Recipe, out: Path) -> str | None:
    """Refuse what cannot run, settle precision and start distributed; returns the checkpoint to resume."""
    quiet_non_main_ranks()
    resume = _check_output_dir(out, recipe)
    check_before_launch(recipe)
    check_visible_devices(_use_cpu(recipe))
    if recipe.fsdp and _use_cpu(recipe):
        log.warning("fsdp: FSDP needs GPUs; on CPU the Trainer silently trains with plain DDP (no sharding)")
    resolve_quantized_precision(recipe, _use_cpu(recipe))  # GPTQ: bf16 refused, auto -> fp16 (GPU) / fp32 (CPU)
    if _use_cpu(recipe) and recipe.training.precision == "auto" and (isa := cpu_bf16_matmul()):
        # auto stays fp32 on CPU (the reference's exact numbers); the faster choice is one knob away.
        log.info("precision: auto -> fp32 on CPU; this CPU has native bf16 matmuls (%s): training.precision=bf16 "
                 "trains up to ~3x faster where matmuls dominate the step (bench/README.md), at bf16 rounding", isa)
    if recipe.deepspeed:
        single_process_group_env()  # ZeRO-3 without a launcher: a 1-process group instead of DeepSpeed's MPI probe
        if _use_cpu(recipe):
            init_distributed_for_cpu()
    return resume


def build_base_model(recipe: Recipe, args: TrainingArguments, out: Path) -> tuple[str, LoadedModel]:
    """The base checkpoint (built from a config first when the recipe asks), loaded with its tokenizer."""
    base = recipe.model.path
    if recipe.model.from_config:
        with args.main_process_first(desc="building the base model"), zero3_init_disabled():
            base = str(build_from_config(recipe.model.from_config, out / "base_model", recipe.model.seed))
    if Path(base).is_dir():
        # Absolute, so the adapter_config.json's base_model_name_or_path works from any directory (peft, vLLM).
        base = str(Path(base).resolve())
    # Seeded after the base exists: building it draws from the RNG, reusing it does not, and a restarted run
    # (which finds base_model/) must draw the same LoRA init and dropout masks as the first attempt.
    set_seed(recipe.training.seed)
    precision = resolve_precision(recipe.training.precision, _use_cpu(recipe))
    dtype = load_dtype(recipe.method, recipe.model.dtype, precision, _master_fp32(recipe))
    loaded = load_model(base, dtype=dtype, attn_implementation=recipe.model.attn_implementation,
                        tokenizer_path=recipe.model.tokenizer, is_chat=recipe.model.is_chat,
                        **quantization_kwargs(recipe, base))
    prepare_loaded_model(loaded.model)
    log.info("model: %s (%s family, %s checkpoint) from %s", type(loaded.model).__name__, loaded.family.name,
             "chat" if loaded.is_chat else "base", base)
    return base, loaded


def _master_fp32(recipe: Recipe) -> bool:
    """Whether trainable weights are kept in fp32 under 16-bit autocast (see train/precision.py)."""
    precision = resolve_precision(recipe.training.precision, _use_cpu(recipe))
    return autocast_master_weights(precision, recipe.deepspeed, _use_cpu(recipe))


def build_data(recipe: Recipe, tokenizer: Any, args: TrainingArguments, out: Path) -> PreparedData:
    """Tokenized train/eval sets (main process first: the others read its cache); the data report is logged."""
    with args.main_process_first(desc="tokenizing"):
        data = prepare_data(recipe.data, tokenizer, seed=recipe.training.seed)
    report_data(data.reports, args, out)
    return data


def report_data(reports: list[Any], args: TrainingArguments, out: Path) -> None:
    """The data reports in the log, in data_report.json, and every bad record in data_errors.jsonl (the report
    itself shows 3 a reason)."""
    for report in reports:
        for line in report.lines():
            log.info(line)
    if args.should_save:
        (out / "data_report.json").write_text(json.dumps([r.to_dict() for r in reports], indent=2))
        write_errors(out / "data_errors.jsonl", reports)


def build_trainable_model(recipe: Recipe, loaded: LoadedModel) -> tuple[torch.nn.Module, int, int]:
    """The model the method trains (full, LoRA or Q-LoRA), with its trainable and total parameter counts."""
    model = apply_method(loaded.model, recipe, loaded.family, loaded.is_chat)
    upcast_trainable(model, _master_fp32(recipe))
    trainable, total = count_parameters(model)
    _warn_not_servable(model)
    log.info("trainable parameters: %s of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1))
    return model, trainable, total


def _warn_not_servable(model: torch.nn.Module) -> None:
    cfg = getattr(model, "peft_config", {}).get("default")
    if cfg is None:
        return
    targets = cfg.target_modules if isinstance(cfg.target_modules, (set, list, tuple)) else [cfg.target_modules]
    trained = sorted({*(cfg.modules_to_save or []), *(t for t in targets if t and ("lm_head" in t or "embed" in t
                                                                                      or t == "wte"))})
    if trained:
        log.warning("this adapter trains %s: vLLM's LoRA loader refuses it, so run `qwen-tune merge-adapter` before "
                    "serving with vLLM (transformers and peft load it as is)", ", ".join(trained))


def build_trainer(recipe: Recipe, args: TrainingArguments, model: torch.nn.Module, tokenizer: Any,
                  data: PreparedData, callbacks: list[Any] | None) -> QwenTrainer:
    collator = make_collator(recipe.data.packing, tokenizer.pad_token_id, recipe.data.pad_to_multiple_of,
                             recipe.model.attn_implementation, packing_exact=packing_is_exact(model.config))
    return QwenTrainer(model=model, args=args, train_dataset=data.train, eval_dataset=data.eval,
                       data_collator=collator, processing_class=tokenizer, callbacks=callbacks,
                       loss_mode=recipe.training.loss, loss_chunk_size=recipe.training.loss_chunk_size,
                       compile_loss=recipe.training.compile_loss)


def save_outputs(recipe: Recipe, args: TrainingArguments, trainer: QwenTrainer, tokenizer: Any, base: Path,
                 out: Path, summarize: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The final model (or adapter) with tokenizer and generation config, then the summary (collective under
    distributed training, so after the save as on every rank) and the loss curve."""
    if recipe.output.save_final:
        try:
            trainer.save_model(str(out))
            if args.should_save:
                tokenizer.save_pretrained(str(out))
                _copy_generation_config(base, out)
                save_in_dtype(out, base)
                keep_tokenizer_files(base, out)
                finish_chat_outputs(base, out, recipe.data.template)
        except Exception as e:
            if not is_disk_full(e):
                raise
            raise CheckpointSaveError(f"disk full while saving the final model to {out} ({first_line(e)}); the "
                                      f"checkpoints in {out} are intact: free space and rerun with "
                                      "output.resume_from_checkpoint=auto") from None
    summary = summarize()
    summary["engine"] = engine_info(trainer)
    if args.should_save:
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
        plot_loss_curve(trainer.state.log_history, out / "loss_curve.png")
    return summary


def _copy_generation_config(base: Path, out: Path) -> None:
    src = base / "generation_config.json"
    if src.exists() and not (out / "generation_config.json").exists():
        shutil.copy2(src, out / "generation_config.json")
