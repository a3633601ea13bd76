"""Preference tuning (recipe `stage: dpo`): TRL's DPOTrainer with qwen-tune's model loading, methods and safeguards.

TRL does the DPO machinery: its losses, the reference forward (the adapter-disabled base with LoRA), reward
metrics, and the per-token log-probs through a chunked fused LM head (``trl.trainer.utils.add_fused_lm_head``:
vocabulary tiles, logsumexp folded online and recomputed in backward, so the ``[tokens x 151,936]`` logits of
chosen and rejected are never held; with ZeRO-3 it gathers the head). qwen-tune adds what TRL leaves to the
caller: recipes, the pair data pipeline with located errors, full / LoRA / Q-LoRA from one loader, the NaN guard,
checkpoint-complete markers, resume, throughput logs and the loss curve (QwenTrainer's behaviour, by inheritance).

Reference-free losses (simpo, cpo) run on the same trainer: TRL reads precomputed reference log-probs from the
batch when asked to, so those columns are filled with constants instead of a reference forward, and no reference
copy is ever built. With reference log-probs of 0 the sigmoid loss is CPO's; SimPO is TRL's length-normalized
sigmoid (``sigmoid_norm``) with a chosen-side reference of ``gamma / beta`` per chosen token, which makes
``beta * delta`` exactly SimPO's ``beta * (avg_logp_chosen - avg_logp_rejected) - gamma``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
import types
from pathlib import Path
from typing import Any

import torch
from transformers import TrainingArguments, set_seed
from trl import DPOConfig, DPOTrainer
from trl.trainer.utils import FusedCausalLMOutput

from ..config import ConfigError, Recipe
from ..data.pairs import prepare_pairs
from .recipe_checks import check_recipe_on_this_machine
from ..models.loading import build_from_config, resolve_precision
from ..quant.backend import quantization_kwargs, resolve_quantized_precision
from ..quant.training import prepare_loaded_model
from .distributed import check_combination, init_distributed_for_cpu, quiet_non_main_ranks, zero3_init_disabled
from .loading import load_model
from .logprobs import token_logprobs
from .methods import apply_method, count_parameters
from .run import (RECIPE_FILE, RunResult, _check_output_dir, _copy_generation_config, _use_cpu, report_data,
                  training_arguments)
from .summary import engine_info, summarize
from .trainer import QwenTrainer

log = logging.getLogger("qwen_tune")
REFERENCE_FREE = ("simpo", "cpo")
# qwen-tune loss name -> TRL loss_type (the reference-free ones through constant reference log-probs, see above).
_TRL_LOSS = {"sigmoid": "sigmoid", "ipo": "ipo", "hinge": "hinge", "simpo": "sigmoid_norm", "cpo": "sigmoid"}


def dpo_config(recipe: Recipe, out: Path, has_eval: bool) -> DPOConfig:
    """qwen-tune's TrainingArguments for the recipe, carried over into TRL's DPOConfig plus the preference knobs."""
    base = training_arguments(recipe, out, has_eval)
    kwargs = {f.name: getattr(base, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
    p = recipe.preference
    loss_type, weights = [_TRL_LOSS[p.loss]], [1.0]
    if p.sft_weight > 0:
        loss_type.append("sft")
        weights.append(p.sft_weight)
    kwargs.update(
        beta=p.beta, loss_type=loss_type, loss_weights=weights,
        max_length=None,  # pairs are already cut to data.max_len (and counted) by data/pairs.py
        precompute_ref_log_probs=p.loss in REFERENCE_FREE,
        gradient_checkpointing=recipe.training.gradient_checkpointing is not False,  # unresolved "auto": on
        gradient_checkpointing_kwargs={"use_reentrant": False},
        dataset_num_proc=recipe.data.num_proc if recipe.data.num_proc > 1 else None,
    )
    return DPOConfig(**kwargs)


class QwenDPOTrainer(QwenTrainer, DPOTrainer):
    """DPOTrainer's loss and metrics, QwenTrainer's NaN guard, throughput logs, adapter saving and checkpoint markers.

    MRO: QwenTrainer's training_step / log / _save / _save_checkpoint wrap DPOTrainer's, which wrap Trainer's.
    """

    def __init__(self, *, reference_free: bool = False, simpo_gamma: float = 0.0, **kwargs: Any) -> None:
        # Read by _precompute_ref_logps, which DPOTrainer.__init__ calls.
        self.reference_free = reference_free
        self.simpo_gamma = simpo_gamma
        super().__init__(ref_model=None, **kwargs)
        # DPO's loss is a mean over pairs, not a sum over num_items_in_batch tokens: gradient accumulation must
        # divide it (DPOTrainer.loss_is_scaled_for_ga = False), so undo QwenTrainer's token-sum setting.
        self.model_accepts_loss_kwargs = False
        model = self.model
        if hasattr(model, "peft_config") and "ref" in model.peft_config:
            # TRL copies a pre-wrapped adapter into a frozen "ref" adapter. Ours is freshly initialized (LoRA B = 0),
            # so the adapter-disabled base is the same reference without a second set of adapter weights.
            model.delete_adapter("ref")
            model.set_adapter("default")
        if self.loss_mode == "chunked":
            install_logprob_head(model, self.loss_chunk_size)

    def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
        return dataset  # data/pairs.py already rendered, tokenized, cut and counted the pairs

    def _precompute_ref_logps(self, dataset: Any, name: str, batch_size: int) -> Any:
        if not self.reference_free:
            return super()._precompute_ref_logps(dataset, name, batch_size)
        ratio = self.simpo_gamma / self.beta if self.loss_types[0] == "sigmoid_norm" else 0.0

        def constants(batch: dict[str, list]) -> dict[str, list]:
            return {"ref_chosen_logps": [ratio * len(c) for c in batch["chosen_ids"]],
                    "ref_rejected_logps": [0.0] * len(batch["chosen_ids"])}

        return dataset.map(constants, batched=True, desc=f"reference-free constants ({name})")

    def count_label_tokens(self, inputs: dict[str, Any]) -> torch.Tensor:
        return inputs["completion_mask"][:, 1:].sum()  # chosen + rejected reply tokens

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        return DPOTrainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)


def install_logprob_head(model: torch.nn.Module, chunk_size: int) -> bool:
    """Route TRL's ``fused_lm_head=True`` calls (policy and reference) through qwen-tune's token_logprobs.

    DPOTrainer.__init__ patched the model's forward with TRL's fused head; this wraps that forward again, so calls
    without ``fused_lm_head`` (generation, evaluation with logits) still reach the original one. MoE models keep
    TRL's head, which also returns the router's auxiliary loss.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(inner.config.get_text_config(), "output_router_logits", False):
        log.info("MoE model: per-token log-probs through TRL's fused head (it carries the router aux loss)")
        return False
    trl_forward = inner.forward

    @functools.wraps(type(inner).forward)
    def forward(self: Any, *args: Any, fused_lm_head: bool = False, labels: Any = None, shift_labels: Any = None,
                num_items_in_batch: Any = None, **kwargs: Any) -> Any:
        if not fused_lm_head or shift_labels is not None:
            return trl_forward(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                               num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        labels = labels[:, 1:]
        head = self.get_output_embeddings()
        logps, entropy, mean_logits, top1 = token_logprobs(hidden, head.weight, labels, chunk_size, with_stats=True)
        mask = labels != -100
        return FusedCausalLMOutput(loss=-logps.sum() / mask.sum().clamp(min=1), log_probs=logps, entropy=entropy,
                                   mean_logits=mean_logits, is_top1=top1, label_mask=mask)

    inner.forward = types.MethodType(forward, inner)
    return True


def _check_recipe(recipe: Recipe) -> None:
    lora = recipe.lora
    if recipe.method != "full":
        targets = lora.target_modules if isinstance(lora.target_modules, list) else []
        if "lm_head" in targets or "lm_head" in (lora.modules_to_save or []):
            raise ConfigError("stage=dpo: lm_head cannot carry LoRA or modules_to_save (TRL's fused log-prob head "
                              "reads lm_head.weight directly); remove it from lora.target_modules / "
                              "lora.modules_to_save")
    if recipe.data.packing:
        log.info("stage=dpo: pairs are padded per batch (TRL's preference collator); data.packing is not used")


def run_preference(recipe: Recipe, callbacks: list[Any] | None = None) -> RunResult:
    """Preference-tune as the recipe says; the same outputs as run_training (adapter or model, summary, curve)."""
    quiet_non_main_ranks()
    _check_recipe(recipe)
    out = Path(recipe.output.dir)
    resume = _check_output_dir(out, recipe)
    check_recipe_on_this_machine(recipe)
    check_combination(recipe)
    resolve_quantized_precision(recipe, _use_cpu(recipe))
    set_seed(recipe.training.seed)
    if recipe.deepspeed and _use_cpu(recipe):
        init_distributed_for_cpu()
    if recipe.lora.trainable_embeddings is None and recipe.lora.modules_to_save is None:
        # DPO follows SFT: ChatML tokens are trained by then, and TRL's fused head cannot score a wrapped lm_head.
        recipe.lora.trainable_embeddings = False

    args = dpo_config(recipe, out, bool(recipe.data.eval_datasets or recipe.data.eval_split_ratio))
    if args.should_save:
        out.mkdir(parents=True, exist_ok=True)
        (out / RECIPE_FILE).write_text(recipe.to_yaml(), encoding="utf-8")

    base = recipe.model.path
    if recipe.model.from_config:
        with args.main_process_first(desc="building the base model"), zero3_init_disabled():
            base = str(build_from_config(recipe.model.from_config, out / "base_model", recipe.model.seed))
    precision = resolve_precision(recipe.training.precision, _use_cpu(recipe))
    dtype = recipe.model.dtype if recipe.model.dtype != "auto" else precision
    loaded = load_model(base, dtype=dtype, attn_implementation=recipe.model.attn_implementation,
                        tokenizer_path=recipe.model.tokenizer, is_chat=recipe.model.is_chat,
                        **quantization_kwargs(recipe, base))
    prepare_loaded_model(loaded.model)
    log.info("model: %s (%s family) from %s; preference loss %s, beta %s", type(loaded.model).__name__,
             loaded.family.name, base, recipe.preference.loss, recipe.preference.beta)

    with args.main_process_first(desc="tokenizing pairs"):
        data = prepare_pairs(recipe.data, loaded.tokenizer, seed=recipe.training.seed)
    report_data(data.reports, args, out)

    model = apply_method(loaded.model, recipe, loaded.family, loaded.is_chat)
    trainable, total = count_parameters(model)
    log.info("trainable parameters: %s of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1))

    trainer = QwenDPOTrainer(model=model, args=args, train_dataset=data.train, eval_dataset=data.eval,
                             processing_class=loaded.tokenizer, callbacks=callbacks,
                             loss_mode=recipe.training.loss, loss_chunk_size=recipe.training.loss_chunk_size,
                             reference_free=recipe.preference.loss in REFERENCE_FREE,
                             simpo_gamma=recipe.preference.simpo_gamma)
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    elapsed = time.perf_counter() - start

    if recipe.output.save_final:
        trainer.save_model(str(out))
        if args.should_save:
            loaded.tokenizer.save_pretrained(str(out))
            _copy_generation_config(Path(base), out)
    summary = summarize(trainer, result, elapsed, trainable, total)
    summary["engine"] = engine_info(trainer)
    summary["preference"] = preference_summary(trainer.state.log_history)
    if args.should_save:
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
        plot_preference_curve(trainer.state.log_history, out / "loss_curve.png")
    return RunResult(out, Path(base), trainer.state.global_step, trainer.state.log_history, summary)


def preference_summary(history: list[dict[str, Any]]) -> dict[str, Any]:
    logged = [h for h in history if "rewards/margins" in h]
    keys = ("rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected")
    return {"first": {k: logged[0].get(k) for k in keys} if logged else None,
            "last": {k: logged[-1].get(k) for k in keys} if logged else None}


def plot_preference_curve(history: list[dict[str, Any]], path: Path) -> None:
    """Loss on the left; reward margin and accuracy (chosen vs rejected) on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [h for h in history if "loss" in h and "rewards/margins" in h]
    if not train:
        return
    steps = [h["step"] for h in train]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(steps, [h["loss"] for h in train], label="train loss")
    evals = [h for h in history if "eval_loss" in h]
    if evals:
        left.plot([h["step"] for h in evals], [h["eval_loss"] for h in evals], "o-", label="eval loss")
    left.set_xlabel("step")
    left.set_ylabel("preference loss")
    left.legend()
    left.grid(alpha=0.3)
    right.plot(steps, [h["rewards/margins"] for h in train], label="reward margin (chosen - rejected)")
    right.plot(steps, [h["logps/chosen"] - h["logps/rejected"] for h in train], "--",
               label="log-prob margin (chosen - rejected)")
    right.set_xlabel("step")
    right.legend(loc="upper left")
    right.grid(alpha=0.3)
    acc = right.twinx()
    acc.plot(steps, [h["rewards/accuracies"] for h in train], color="tab:green", alpha=0.6, label="reward accuracy")
    acc.set_ylim(-0.05, 1.05)
    acc.set_ylabel("reward accuracy")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
