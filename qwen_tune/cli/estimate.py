"""`qwen-tune estimate`: per-device training memory of a recipe, from config.json alone (no weights)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# config and the estimator load inside the command: `qwen-tune --help` builds this parser.


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "estimate", help="estimate per-device GPU memory of a recipe (reads config.json only)",
        description="Estimate per-device training memory (weights, gradients, optimizer states, activations, "
                    "logits, overhead) for a recipe; trailing key.sub=value items override it. Only the model's "
                    "config.json is read, never its weights.")
    p.add_argument("--recipe", required=True, help="recipe file, or a bundled recipe name")
    p.add_argument("--gpus", type=int, default=1, help="devices the run is split over (default %(default)s)")
    p.add_argument("--model", default=None,
                   help="the model to size (as model.path=...): a checkpoint dir, or a published model by name, e.g. "
                        "qwen2.5-7b, Qwen/Qwen3-8B, qwen3-30b-a3b (presets: Qwen-1, Qwen2.5 0.5B-72B, Qwen3 "
                        "0.6B-32B, Qwen3 30B-A3B / 235B-A22B)")
    p.add_argument("--config", default=None,
                   help="config.json to size the model from instead of the recipe's model (a path, or a preset name "
                        "as for --model)")
    p.add_argument("--unit", choices=["GB", "GiB"], default="GB", help="GB = 10^9 bytes (default), GiB = 2^30")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON (bytes)")
    p.add_argument("overrides", nargs="*", help="e.g. data.max_len=4096 training.loss=plain")
    p.set_defaults(func=cmd_estimate)


def _model_config(spec: str | None) -> dict | None:
    if spec is None:
        return None
    from ..config import read_json_object
    from ..estimate import MODEL_PRESETS, preset_config

    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        preset = preset_config(spec)
        if preset is not None:
            return preset
        raise FileNotFoundError(f"--config {spec}: no such config.json (presets: {', '.join(MODEL_PRESETS)})")
    return read_json_object(path, f"--config {spec}")


def cmd_estimate(args: argparse.Namespace) -> int:
    from ..config import load_recipe
    from ..estimate import estimate_memory

    overrides = list(args.overrides) + ([f"model.path={args.model}"] if args.model else [])
    recipe = load_recipe(args.recipe, overrides)
    est = estimate_memory(recipe, gpus=args.gpus, model_config=_model_config(args.config))
    if args.json:
        fields = ("weights", "gradients", "optimizer", "activations", "logits", "overhead", "total",
                  "activations_stored", "activations_recompute", "step_transient", "peak_phase", "cpu_offload",
                  "params_total", "params_trainable", "lora_params", "tokens_per_step", "gpus", "zero_stage",
                  "precision", "weight_dtype", "method", "notes")
        print(json.dumps({k: getattr(est, k) for k in fields}, indent=2))
    else:
        print(est.table(unit=args.unit))
    return 0
