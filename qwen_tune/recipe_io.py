"""Reading recipe files and overrides, and turning schema errors into short lines: the recipe schema's I/O.

Every failure is one ConfigError line of bounded length that names the file or the override it came from: a
directory, non-UTF-8 bytes, bad YAML, a YAML alias bomb and a value nested past the recursion limit included.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError


class ConfigError(ValueError):
    """A recipe problem a user can fix; printed as-is, without a traceback."""


# Names users bring from transformers' TrainingArguments and Qwen's finetune.py.
_ALIASES = {
    "learning_rate": "lr", "num_train_epochs": "epochs", "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum", "lr_scheduler_type": "scheduler", "model_max_length": "max_len",
    "output_dir": "dir", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "lora_target_modules": "target_modules",
    "model_name_or_path": "path", "data_path": "path", "eval_data_path": "eval_path", "use_lora": "method",
    "q_lora": "method", "bf16": "precision", "fp16": "precision", "save_total_limit": "save_total_limit",
    # LLaMA-Factory's and TRL's preference names.
    "pref_beta": "beta", "pref_loss": "loss", "loss_type": "loss", "pref_ftx": "sft_weight", "rpo_alpha": "sft_weight",
    "gamma": "simpo_gamma",
}


def _closest_key(loc: str, valid: list[str]) -> str | None:
    parent, _, leaf = loc.rpartition(".")
    siblings = [k.rpartition(".")[2] for k in valid if k.rpartition(".")[0] == parent]
    if _ALIASES.get(leaf) in siblings:
        return f"{parent}.{_ALIASES[leaf]}" if parent else _ALIASES[leaf]
    # A key in the wrong section (`training.max_len` -> `data.max_len`) before a fuzzy match.
    anywhere = [k for k in valid if k.rpartition(".")[2] in (leaf, _ALIASES.get(leaf))]
    if anywhere:
        return anywhere[0]
    near = difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.6)
    if near:
        return f"{parent}.{near[0]}" if parent else near[0]
    close = difflib.get_close_matches(loc, valid, n=1, cutoff=0.5)
    return close[0] if close else None


MAX_LINE = 300  # an error line names the key and shows the start of a bad value, never a whole alias bomb


def _short(text: str, n: int = MAX_LINE) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def _field_loc(loc: tuple) -> str:
    """The recipe key of a pydantic error location, without the union-member tags (`literal[...]`, `list[str]`)."""
    parts = []
    for p in loc:
        if not (isinstance(p, int) or str(p).isidentifier()):
            break
        parts.append(str(p))
    return ".".join(parts)


def _override_for(loc: str, overrides: dict[str, str]) -> str | None:
    """The override that set (or sits under, or above) a failing key; data.path stands for data.datasets.0.path."""
    for short, long_ in (("data.path", "data.datasets.0"), ("data.eval_path", "data.eval_datasets.0")):
        if short in overrides and (loc + ".").startswith(long_ + "."):
            return overrides[short]
    for key, item in overrides.items():
        if loc == key or loc.startswith(key + ".") or key.startswith(loc + "."):
            return item
    return None


def format_errors(e: ValidationError, source: str, valid: list[str], overrides: dict[str, str] | None = None) -> str:
    """One line per failing key, naming the override that set it (else `source`) and the closest valid key."""
    lines: dict[str, list[str]] = {}
    for err in e.errors():
        loc = _field_loc(err["loc"])
        item = _override_for(loc, overrides or {}) if loc else None
        where = f"override {_short(item, 120)!s}" if item is not None else source
        if err["type"] == "extra_forbidden":
            full = ".".join(str(p) for p in err["loc"])
            close = _closest_key(full, valid)
            hint = f"; did you mean `{close}`?" if close else ""
            lines.setdefault(f"{where}: unknown key `{_short(full, 120)}`{hint}", [])
            continue
        got = err.get("input")
        shown = "" if isinstance(got, dict) else f" (got {_short(repr(got), 80)})"
        head = f"{where}: `{loc or '<root>'}`: "
        msgs = lines.setdefault(head, [])
        if err["msg"] + shown not in msgs:
            msgs.append(err["msg"] + shown)
    # One line per key: a union field's alternatives are joined, not listed as separate problems.
    return "\n".join(_short(head + " or ".join(msgs)) for head, msgs in lines.items())


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """A JSON file that must hold an object; problems become one ConfigError line prefixed with `what`."""
    import json

    try:
        cfg = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{what}: not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{what}: must hold a JSON object")
    return cfg


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except (yaml.YAMLError, RecursionError):
        value = raw
    if _count_nodes(value, MAX_YAML_NODES) > MAX_YAML_NODES:
        raise ConfigError(_short(f"override {item}: expands to more than {MAX_YAML_NODES:,} values; refused", 200))
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        if not all(path):
            raise ConfigError(_short(f"override {item}: empty key part in {'.'.join(path)!r}", 200))
        node = data
        for p in path[:-1]:
            child = node.get(p)
            if not isinstance(child, dict):
                child = node[p] = {}
            node = child
        node[path[-1]] = value
    return data


MAX_YAML_NODES = 100_000  # a recipe has hundreds of values; more means an alias bomb ("billion laughs")


def _count_nodes(data: Any, limit: int) -> int:
    """Values in the recipe as expanded (aliases counted at every use), counted without recursion, up to `limit`."""
    stack, n = [data], 0
    while stack and n <= limit:
        v = stack.pop()
        n += 1
        if isinstance(v, dict):
            stack += list(v.keys()) + list(v.values())
        elif isinstance(v, (list, tuple)):
            stack += list(v)
    return n


def read_recipe_file(path: Path) -> dict[str, Any]:
    """The recipe's mapping; a directory, non-UTF-8 bytes, bad YAML or an alias bomb is one ConfigError line."""
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory, not a recipe file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (invalid byte at offset {e.start})") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(_short(f"{path}: not valid YAML: {' '.join(str(e).split())}")) from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid YAML: nested too deeply") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections")
    if _count_nodes(data, MAX_YAML_NODES) > MAX_YAML_NODES:
        raise ConfigError(f"{path}: expands to more than {MAX_YAML_NODES:,} values (YAML aliases repeated "
                          "exponentially?); refused")
    return data


