"""Qwen's finetune.py flags (`--model_max_length 512 --lora_r 8 ...`) as recipe overrides, so the reference
scripts' command lines keep working; an unknown flag names the closest known one."""

from __future__ import annotations

import difflib
from ..config import ConfigError, Recipe, _all_keys
from ..recipe_io import _ALIASES, _closest_key

# Flags whose recipe key the closest-key table cannot infer (or would infer wrongly), and value conversions.
_EXPLICIT = {"data_path": "data.path", "eval_data_path": "data.eval_path", "seed": "training.seed",
             "model_name_or_path": "model.path", "model_max_length": "data.max_len", "eval_steps": "training.eval_steps"}
_SWITCHES = {"use_lora": ("method", "lora", "full"), "q_lora": ("method", "qlora", None),
             "bf16": ("training.precision", "bf16", None), "fp16": ("training.precision", "fp16", None)}
# Accepted and ignored, with the reason: they configure what qwen-tune always does or decides itself.
_IGNORED = {"lazy_preprocess": "data is tokenized once and cached", "save_strategy": "checkpoints are step-based",
            "evaluation_strategy": "eval follows training.eval_steps", "eval_strategy": "eval follows training.eval_steps",
            "per_device_eval_batch_size": "eval uses training.batch_size", "fix_vit": "no vision tower here",
            "adam_beta1": "fixed at 0.9", "tf32": "set by precision", "optim": "AdamW"}
_FALSE = ("false", "0", "no")


def _key_for(flag: str) -> str | None:
    if flag in _EXPLICIT:
        return _EXPLICIT[flag]
    key = _closest_key(flag, _all_keys(Recipe))
    return key if key and key.rpartition(".")[2] in (flag, _ALIASES.get(flag)) else None


def _known_flags() -> list[str]:
    leaves = {k.rpartition(".")[2] for k in _all_keys(Recipe)}
    return sorted({*_EXPLICIT, *_SWITCHES, *_IGNORED, *_ALIASES, *leaves})


def finetune_overrides(tokens: list[str], notes: list[str] | None = None) -> list[str]:
    """`--flag value` / `--flag=value` / bare `--switch` tokens mixed with key=value overrides -> overrides only."""
    out: list[str] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        i += 1
        if not tok.startswith("--"):
            out.append(tok)
            continue
        flag, eq, value = tok[2:].partition("=")
        if not eq:
            if i < len(tokens) and not tokens[i].startswith("--") and "=" not in tokens[i]:
                value = tokens[i]
                i += 1
            else:
                value = "true"  # a bare switch
        out += _one(flag.replace("-", "_"), value, notes)
    return out


def _one(flag: str, value: str, notes: list[str] | None) -> list[str]:
    if "." in flag:  # a recipe key written as a flag (`--training.lr 1e-4`): load_recipe validates it
        return [f"{flag}={value}"]
    if flag in _SWITCHES:
        key, on, off = _SWITCHES[flag]
        chosen = off if value.lower() in _FALSE else on
        return [f"{key}={chosen}"] if chosen else []
    if flag in _IGNORED:
        if notes is not None:
            notes.append(f"--{flag} ignored: {_IGNORED[flag]}")
        return []
    key = _key_for(flag)
    if key is None:
        near = difflib.get_close_matches(flag, _known_flags(), n=1, cutoff=0.6)
        hint = f"; did you mean --{near[0]}?" if near else ""
        raise ConfigError(f"unknown finetune.py flag --{flag}{hint} (recipe overrides look like key.sub=value)")
    if key == "output.report_to":
        value = "[]" if value == "none" else f"[{value}]"
    if key == "lora.target_modules" and "," in value and not value.startswith("["):
        value = f"[{value}]"
    if key in ("training.gradient_checkpointing",) and value.lower() in _FALSE:
        value = "false"
    return [f"{key}={value}"]


def _undotted(item: str, notes: list[str]) -> list[str]:
    """`lora_r=8` / `lr=1e-4` read as `--lora_r 8` / `--lr 1e-4`; top-level keys (`method=lora`) and keys that map
    to no key or to several stay as written, for load_recipe to apply or to name the closest key."""
    key, eq, value = item.partition("=")
    if not eq or "." in key or key in Recipe.model_fields or key.startswith("-"):
        return [item]
    valid = _all_keys(Recipe) + ["data.path", "data.eval_path"]  # the short forms load_recipe accepts too
    leaves = [k for k in valid if k.rpartition(".")[2] in (key, _ALIASES.get(key))]
    if key in _SWITCHES or key in _IGNORED or key in _EXPLICIT or (len(leaves) == 1 and _key_for(key) == leaves[0]):
        return _one(key, value, notes)  # with the flag's value conversions (`report_to=none`)
    return [f"{leaves[0]}={value}"] if len(leaves) == 1 else [item]  # `loss=` names two keys: load_recipe says so


def convert(overrides: list[str]) -> tuple[list[str], list[str]]:
    """The overrides with finetune.py flags and undotted keys mapped, and notes on the flags ignored."""
    notes: list[str] = []
    if not any(t.startswith("--") or "." not in t.partition("=")[0] for t in overrides):
        return overrides, notes
    mapped = [m for item in finetune_overrides(overrides, notes) for m in _undotted(item, notes)]
    if "method=qlora" in mapped:  # finetune.py: --use_lora True --q_lora True is Q-LoRA, in either order
        mapped = [m for m in mapped if not m.startswith("method=") or m == "method=qlora"]
    return mapped, notes

