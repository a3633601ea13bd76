"""`qwen-tune merge-adapter`: fold a LoRA adapter into its base model."""

from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge-adapter", help="merge a LoRA adapter into its base model (a standalone checkpoint)",
        description="Merge LoRA weights and trained embeddings/lm_head (modules_to_save) into the base model, write "
                    "sharded safetensors with the tokenizer and the base's extra files, and verify the result's "
                    "logits against base+adapter before publishing it.")
    p.add_argument("--adapter", required=True, help="adapter directory (adapter_config.json + adapter weights)")
    p.add_argument("--out", required=True, help="output directory for the merged model")
    p.add_argument("--base", default=None,
                   help="base checkpoint directory (default: base_model_name_or_path of the adapter); for a Q-LoRA "
                        "adapter, the full-precision checkpoint")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                   help="dtype of the merged weights (default: the base checkpoint's dtype)")
    p.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard, e.g. 2GB, 500MB (default 2GB)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip the logits check of the written model against base+adapter")
    p.set_defaults(func=cmd_merge_adapter)


def cmd_merge_adapter(args: argparse.Namespace) -> int:
    from ..export.merge import MergeVerificationError, merge_adapter

    try:
        result = merge_adapter(args.adapter, args.out, base_dir=args.base, dtype=args.dtype,
                               max_shard_size=args.max_shard_size, overwrite=args.overwrite, verify=args.verify)
    except MergeVerificationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"merged model: {result.out_dir}  ({result.dtype}, base {result.base_dir})")
    if result.max_abs_diff is None:
        print("verification: skipped (--no-verify)")
    else:
        rounding = "" if result.dtype == "fp32" else f" (includes {result.dtype} rounding of the weights)"
        print(f"verification: max abs logit diff vs base+adapter {result.max_abs_diff:.3g}{rounding}; "
              f"merge {result.merge_diff:.3g}, reload {result.reload_diff:.3g}, tolerance {result.tolerance:.3g}")
    print(f"copied: {', '.join(result.copied_files) or 'nothing'}")
    for note in result.notes:
        print(f"note: {note}")
    return 0
