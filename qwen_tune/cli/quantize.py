"""`qwen-tune quantize`: a full-precision checkpoint -> a GPTQ Int4 checkpoint in the published (auto-gptq) layout."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize", help="quantize a checkpoint to GPTQ Int4 (the layout of Qwen's published *-Int4 models)",
        description="Quantize every linear layer of the decoder blocks with GPTQ (calibrated on --calib, block by "
                    "block) or round-to-nearest, pack them as qweight/qzeros/scales/g_idx, and write config.json "
                    "(quantization_config), quantize_config.json, the tokenizer and every other file of the model. "
                    "Pure PyTorch (CPU or one GPU); the result loads with qwen-tune, transformers+gptqmodel and "
                    "auto-gptq. Embeddings and lm_head stay in --dtype, as in the published models.")
    p.add_argument("--model", required=True, help="full-precision checkpoint directory (Qwen-1 or Qwen1.5+)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--bits", type=int, default=4, choices=[2, 4, 8], help="bits per weight (default 4)")
    p.add_argument("--group-size", type=int, default=128,
                   help="input columns sharing one scale/zero point; -1 = one group per row (default 128)")
    p.add_argument("--calib", default=None,
                   help="calibration data: .txt (one sample per paragraph), or .json/.jsonl with `text` records or "
                        "conversations in any training format; required for --algorithm gptq")
    p.add_argument("--format", choices=["v1", "v2"], default="v1",
                   help="zero-point format: v1 = `gptq` (auto-gptq, every published Qwen Int4 model: stores zero-1; "
                        "default, loads everywhere), v2 = `gptq_v2` (gptqmodel's format: stores the zero point)")
    p.add_argument("--algorithm", choices=["gptq", "rtn"], default="gptq",
                   help="gptq: GPTQ with the calibration data (default); rtn: round-to-nearest, no calibration "
                        "(same packing, lower accuracy)")
    p.add_argument("--asym", action="store_true", help="asymmetric zero points (default: symmetric, as published)")
    p.add_argument("--samples", type=int, default=128, help="calibration samples to use (default 128)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sample at most (default 512)")
    p.add_argument("--damp", type=float, default=0.01, help="GPTQ dampening, share of the mean Hessian diagonal")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16",
                   help="dtype of the weights that stay unquantized (default fp16, as published; scales are fp16)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip reloading the result and comparing its logits with the full-precision model")
    p.set_defaults(func=cmd_quantize)


def cmd_quantize(args: argparse.Namespace) -> int:
    from ..export.quantize import quantize_checkpoint

    r = quantize_checkpoint(args.model, args.out, bits=args.bits, group_size=args.group_size, sym=not args.asym,
                            fmt=args.format, calib=args.calib, algorithm=args.algorithm, n_samples=args.samples,
                            seq_len=args.seq_len, damp_percent=args.damp, dtype=args.dtype, device=args.device,
                            overwrite=args.overwrite, verify=args.verify, progress=print)
    algo = "GPTQ" if r.algorithm == "gptq" else "round-to-nearest (RTN)"
    calib = f", {r.samples} calibration samples / {r.tokens} tokens" if r.samples else ""
    print(f"quantized model: {r.out_dir}  ({args.bits}-bit, group {args.group_size}, format {r.format} "
          f"({args.format}), {algo}, {r.layers} layers{calib})")
    if r.cosine is not None:
        print(f"verification: logits vs the full-precision model: cosine {r.cosine:.5f}, max abs diff "
              f"{r.max_abs_diff:.4g}; reloaded vs in-memory quantized: max abs diff {r.reload_diff:.3g}")
    return 0
