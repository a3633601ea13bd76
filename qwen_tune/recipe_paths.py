"""Where a recipe's relative paths point: one rule, applied to the raw mapping before validation.

A path written in a recipe file is relative to that file's folder; a path given as a CLI override, or in a mapping
built in code, is relative to the cwd. Bundled recipes are the one exception, for output.dir only: relative to the
cwd, so outputs never land inside the installed package. Files named like the package's bundled ones
(`data_examples/...`, `assets/...`, `ds_configs/...`) fall back to the package's copy when not found there.
"""

from __future__ import annotations

import importlib.resources
import os
import re
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(str(importlib.resources.files("qwen_tune")))
_HUB_NAME = re.compile(r"^[\w.-]+/[\w.-]+$")  # Qwen/Qwen2.5-7B-Instruct, tatsu-lab/alpaca


def _input_path(p: Any, base: Path) -> Any:
    """An existing file or dir relative to `base`, else the package's bundled copy, else a hub name as written."""
    if not isinstance(p, str) or not p:
        return p
    if os.path.isabs(os.path.expanduser(p)):
        return os.path.expanduser(p)
    for root in (base, PACKAGE_DIR):
        if (root / p).exists():
            return os.path.abspath(root / p)
    return p if _HUB_NAME.match(p) else os.path.abspath(base / p)


def _output_path(p: Any, base: Path) -> Any:
    if not isinstance(p, str) or not p:
        return p
    return os.path.abspath(base / os.path.expanduser(p))


def resolve_recipe_paths(data: dict[str, Any], base: Path, out_base: Path) -> dict[str, Any]:
    """Makes the local paths of a raw recipe mapping absolute (in place): inputs against `base`, output.dir against
    `out_base`. Runs before validation, so a malformed section is left for the schema to report."""
    model, dat, out = (data.get(k) if isinstance(data.get(k), dict) else {} for k in ("model", "data", "output"))
    for key in ("path", "from_config", "tokenizer"):
        if key in model:
            model[key] = _input_path(model[key], base)
    if "deepspeed" in data:
        data["deepspeed"] = _input_path(data["deepspeed"], base)
    for key in ("path", "eval_path"):
        if key in dat:
            dat[key] = _input_path(dat[key], base)
    for key in ("datasets", "eval_datasets"):
        specs = dat.get(key)
        for spec in specs if isinstance(specs, list) else []:  # anything else is the schema's to report
            if isinstance(spec, dict) and "path" in spec:
                spec["path"] = _input_path(spec["path"], base)
    if isinstance(dat.get("template"), str) and dat["template"].endswith((".jinja", ".j2")):
        dat["template"] = _input_path(dat["template"], base)
    if "cache_dir" in dat:
        dat["cache_dir"] = _output_path(dat["cache_dir"], base)
    if "dir" in out:
        out["dir"] = _output_path(out["dir"], out_base)
    if out.get("resume_from_checkpoint") not in (None, "auto"):
        out["resume_from_checkpoint"] = _output_path(out["resume_from_checkpoint"], base)
    return data
