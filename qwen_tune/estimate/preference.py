"""What `stage: dpo` changes in the memory estimate (hooked into :func:`.estimator.estimate_memory`).

* Two sequences per pair: TRL's preference collator stacks chosen and rejected into one batch of
  ``2 x batch_size`` rows, each padded to at most ``max_len`` (pairs are never packed), so activations and
  logits are those of an SFT step with twice the batch.
* The reference forward (sigmoid / ipo / hinge) runs under ``no_grad`` after the policy forward: it stores
  nothing for backward and holds one decoder layer and one log-prob chunk at a time, the same working set as
  the recomputed layer or the loss chunk already counted at the forward/backward peak. With LoRA / Q-LoRA the
  reference is the adapter-disabled base (no extra weights); with full training TRL loads a second, frozen copy
  of the model in its dtype (sharded under ZeRO-3). simpo / cpo have no reference at all.
"""

from __future__ import annotations

from typing import Any

from ..config import Recipe

REFERENCE_FREE = ("simpo", "cpo")  # as train/preference.py: no reference forward, no copy


def as_sequences(recipe: Recipe, notes: list[str]) -> Recipe:
    """The SFT-shaped recipe a dpo step costs like: twice the rows, unpacked. An sft recipe is returned as is."""
    if recipe.stage != "dpo":
        return recipe
    t = recipe.training.model_copy(update={"batch_size": 2 * recipe.training.batch_size})
    data = recipe.data.model_copy(update={"packing": False})
    ref = "no reference (reference-free)" if recipe.preference.loss in REFERENCE_FREE else (
        "reference forward without grad" + (", adapter-disabled base" if recipe.method != "full" else
                                            ", a frozen copy of the model"))
    notes.append(f"stage=dpo ({recipe.preference.loss}): 2 sequences per pair ({t.batch_size} rows of "
                 f"<= {recipe.data.max_len} tokens per micro-step); {ref}")
    return recipe.model_copy(update={"training": t, "data": data})


def reference_weights(recipe: Recipe, total_params: int, bytes_per_weight: int, zero_stage_like: int,
                      devices: int, details: dict[str, Any]) -> float:
    """Bytes of TRL's frozen reference copy per device (full-parameter DPO with a reference loss only)."""
    if recipe.stage != "dpo" or recipe.method != "full" or recipe.preference.loss in REFERENCE_FREE:
        return 0.0
    shard = devices if zero_stage_like >= 3 else 1
    ref = total_params * bytes_per_weight / shard
    details["weights"] = details.get("weights", "") + (f" + frozen DPO reference copy {ref / 1e9:.2f} GB"
                                                       + (f" (1/{shard} under ZeRO-3)" if shard > 1 else ""))
    return ref
