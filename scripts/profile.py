"""GPU profile: memory and speed of Qwen's reference recipe vs qwen-tune, per method and sequence length.

Reproduces the Qwen-1 README table "Profiling of Memory and Speed" -- batch 1, gradient accumulation 8,
gradient checkpointing, sequence length 256...8192; LoRA, LoRA (emb), Q-LoRA, full-parameter -- on random
weights of a real model config, and runs the reference recipe next to qwen-tune in the same session.

    python scripts/profile.py --model qwen2.5-7b                         # one GPU: every method, 256..8192
    python scripts/profile.py --model qwen2.5-1.5b --methods lora,full --seqs 256,2048,8192
    python scripts/profile.py --model tiny --device cpu --seqs 64,128 --steps 2   # smoke run on CPU

Every cell (method, length, side) trains in its own process through `qwen_tune.train.run.run_training`,
so its peak memory is its own. Sides:
  * reference -- the recipe of Qwen's finetune.py: every sample padded to model_max_length, transformers'
    loss over the full logits (training.loss=plain), no packing;
  * qwen-tune -- the defaults: padding-free rows, chunked loss over supervised rows only.
Data: synthetic conversations that fill exactly `seq` tokens (a short question and a long answer,
truncated at model_max_length), so both sides see the same tokens, as in the reference's profile.
Methods: lora = chat model, LoRA r=64 alpha 16 dropout 0.05 on the family's default targets;
lora_emb = base model, the same LoRA plus trainable embeddings and lm_head; qlora = the same LoRA on a
GPTQ Int4 copy of the random weights (round-to-nearest, packed like Qwen's *-Int4 checkpoints);
full = every weight (through DeepSpeed ZeRO-2 on GPU, as finetune_ds.sh; --full-deepspeed to change).

Reported per cell: peak memory (GPU: torch.cuda.max_memory_allocated and max_memory_reserved; CPU: peak RSS),
seconds per optimizer step (median over the steps after the first), tokens/s and MFU (model FLOPs per
token: 2 x matmul parameters + causal attention, x3 for full training, x2 for LoRA / Q-LoRA whose frozen
weights get no weight gradient; recomputation from checkpointing is not counted, as usual for MFU).
Results: <--results-dir>/<--name>.{json,md} (default bench/results/profile_<model>_<device>).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# This file's name shadows the stdlib `profile` module (which cProfile, and so torch, import): drop its directory.
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"

_QWEN25 = {"model_type": "qwen2", "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
           "hidden_act": "silu", "bos_token_id": 151643, "eos_token_id": 151645}
# Published config.json values (huggingface.co/Qwen/<name>/config.json); weights are random.
MODELS: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": {**_QWEN25, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                     "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
                     "tie_word_embeddings": True},
    "qwen2.5-1.5b": {**_QWEN25, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                     "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
                     "tie_word_embeddings": True},
    "qwen2.5-7b": {**_QWEN25, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                   "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                   "tie_word_embeddings": False},
}
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}
METHODS = ("lora", "lora_emb", "qlora", "full")
SIDES = ("reference", "qwen-tune")
WORDS = ("the model learns to answer questions about data code and language with care while training on "
         "examples that show each step clearly so users can follow every part of the result").split()


def model_config(name: str) -> dict[str, Any]:
    if name == "tiny":
        return json.loads((REPO / "qwen_tune" / "assets" / "tiny_qwen2.json").read_text())
    if name in MODELS:
        return dict(MODELS[name])
    from qwen_tune.estimate import QWEN1_PRESETS

    if name in QWEN1_PRESETS:
        return dict(QWEN1_PRESETS[name])
    raise SystemExit(f"unknown --model {name!r}: choose tiny, {', '.join(MODELS)}, {', '.join(QWEN1_PRESETS)}")


def write_data(path: Path, n: int, seq: int, seed: int) -> None:
    """n conversations, each longer than `seq` tokens (truncated to exactly `seq` at training time)."""
    rng = random.Random(seed)
    recs = [{"id": f"p{i}", "conversations": [
        {"from": "user", "value": "Explain, in detail: " + " ".join(rng.choices(WORDS, k=8))},
        {"from": "assistant", "value": " ".join(rng.choices(WORDS, k=seq + 64))}]} for i in range(n)]
    path.write_text(json.dumps(recs))


def flops_per_token(cfg: dict[str, Any], seq: int, method: str) -> float:
    """Model FLOPs per trained token (module docstring)."""
    h, L = cfg["hidden_size"], cfg["num_hidden_layers"]
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads", heads)
    d = cfg.get("kv_channels", h // heads)
    ff = cfg["intermediate_size"] // (2 if cfg["model_type"] == "qwen" else 1)  # Qwen-1 counts w1+w2 together
    attn = h * heads * d * 2 + h * kv * d * 2  # q, o + k, v
    mm_params = L * (attn + 3 * h * ff) + h * cfg["vocab_size"]
    forward = 2 * mm_params + 2 * L * heads * d * seq  # causal attention: QK^T and PV over half the context
    return forward * (3 if method == "full" else 2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- one cell (child process)


def run_cell(cell: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import TrainerCallback

    from qwen_tune.config import recipe_from_dict
    from qwen_tune.train.run import run_training

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.marks: list[float] = []

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.marks = [time.perf_counter()]

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.marks.append(time.perf_counter())

    ref = cell["side"] == "reference"
    method, seq = cell["method"], cell["seq"]
    recipe = {
        "model": {"path": cell["checkpoint"], "attn_implementation": cell["attn"], "is_chat": method != "lora_emb"},
        "data": {"path": cell["data"], "max_len": seq, "packing": not ref, "pad_to_multiple_of": seq if ref else None},
        "method": "lora" if method == "lora_emb" else method,
        "lora": {"r": 64, "alpha": 16, "dropout": 0.05},
        "training": {"max_steps": cell["steps"], "batch_size": 1, "grad_accum": cell["grad_accum"],
                     "gradient_checkpointing": True, "loss": "plain" if ref else "chunked",
                     "lr": 1e-5 if method == "full" else 3e-4, "use_cpu": cell["device"] == "cpu"},
        "output": {"dir": cell["out"], "save_final": False, "save_steps": 10**9, "report_to": [],
                   "logging_steps": 1, "overwrite": True},
    }
    if method == "qlora":
        recipe["quantization"] = {"method": "gptq"}
    if method == "full" and cell.get("deepspeed"):
        recipe["deepspeed"] = cell["deepspeed"]
    timer = StepTimer()
    result = run_training(recipe_from_dict(recipe, "scripts/profile.py"), callbacks=[timer])
    steps = [b - a for a, b in zip(timer.marks, timer.marks[1:])]
    tokens_per_step = seq * cell["grad_accum"]
    s_per_it = statistics.median(steps[1:] if len(steps) > 1 else steps)
    out = {**{k: cell[k] for k in ("method", "seq", "side")}, "steps": result.global_step, "s_per_it": s_per_it,
           "tokens_per_s": tokens_per_step / s_per_it, "step_times_s": steps,
           "loss": result.summary.get("last_logged_loss")}
    if torch.cuda.is_available():
        out["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    else:
        import resource

        out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return out


# --------------------------------------------------------------------------- driver


def prepare_checkpoints(cfg: dict[str, Any], methods: list[str], work: Path, device: str) -> dict[str, str]:
    """Random-weight checkpoints: a chat and a base one (is_chat decides trainable embeddings) and a GPTQ copy."""
    from qwen_tune.models.loading import build_from_config

    needed = {"chat": bool({"lora", "qlora", "full"} & set(methods)), "base": "lora_emb" in methods}
    ckpts = {}
    for kind in (k for k, need in needed.items() if need):
        conf = work / f"config_{kind}.json"
        conf.write_text(json.dumps({**cfg, "qwen_tune_is_chat": kind == "chat"}))
        ckpts[kind] = str(build_from_config(conf, work / f"model_{kind}"))
    if "qlora" in methods:
        from qwen_tune.export.quantize import quantize_checkpoint

        gptq = work / "model_int4"
        if not (gptq / "config.json").exists():
            quantize_checkpoint(ckpts["chat"], gptq, calib=None, algorithm="rtn", dtype="fp16",
                                device="cuda" if device == "cuda" else "cpu", verify=False)
        ckpts["gptq"] = str(gptq)
    return ckpts


def spawn(cell: dict[str, Any], timeout: int) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if cell.get("deepspeed"):  # a one-process "distributed" run, as the deepspeed launcher would set up
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    if cell["device"] == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    try:
        p = subprocess.run([sys.executable, __file__, "--cell", json.dumps(cell)], capture_output=True, text=True,
                           env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**{k: cell[k] for k in ("method", "seq", "side")}, "error": f"timeout after {timeout}s"}
    last = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else ""
    if p.returncode == 0 and last.startswith("{"):
        return json.loads(last)
    oom = "out of memory" in p.stderr.lower() or p.returncode == -9
    return {**{k: cell[k] for k in ("method", "seq", "side")}, "error": "OOM" if oom else f"exit {p.returncode}",
            "stderr_tail": p.stderr[-1500:]}


def device_info(device: str) -> dict[str, Any]:
    import platform

    import torch
    import transformers

    info = {"device": device, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    else:
        info["cpu_threads"] = torch.get_num_threads()
    return info


def fmt_mem(r: dict[str, Any]) -> str:
    if not r:  # not run (yet)
        return "-"
    if "error" in r:
        return r["error"]
    return f"{r['peak_allocated_gib']:.1f}" if "peak_allocated_gib" in r else f"{r['peak_rss_gib']:.2f}"


METHOD_LABELS = {"lora": "LoRA", "lora_emb": "LoRA (emb)", "qlora": "Q-LoRA", "full": "Full-parameter"}


def published_layout(results: list[dict[str, Any]], model: str, seqs: list[int], methods: list[str]) -> list[str]:
    """The layout of the Qwen README's "Profiling of Memory and Speed" table (A100, batch 1, gradient accumulation
    8): one row per method, one column per sequence length, cells "<peak memory>G / <s/it>s/it"; here one row per
    method and side."""
    by = {(r["method"], r["seq"], r["side"]): r for r in results}
    lines = ["| Model Size | Method | Side | #Nodes | #GPUs per node | " + " | ".join(map(str, seqs)) + " |",
             "|---|---|---|---:|---:|" + "---:|" * len(seqs)]
    for method in methods:
        for side in SIDES:
            cells = []
            for seq in seqs:
                r = by.get((method, seq, side))
                if r is None:
                    cells.append("")
                elif "error" in r:
                    cells.append(r["error"])
                else:
                    cells.append(f"{fmt_mem(r)}G / {r['s_per_it']:.2f}s/it")
            if any(cells):
                lines.append(f"| {model} | {METHOD_LABELS[method]} | {side} | 1 | 1 | " + " | ".join(cells) + " |")
    return lines


def report(results: list[dict[str, Any]], info: dict[str, Any], args: argparse.Namespace, cfg: dict[str, Any],
           peak_tflops: float | None) -> str:
    mem_label = "peak GPU memory allocated (GiB)" if info["device"] == "cuda" else "peak RSS (GiB)"
    lines = [f"# Profile: {args.model}, reference recipe vs qwen-tune\n",
             f"Machine: {json.dumps(info)}\n",
             f"batch 1, gradient accumulation {args.grad_accum}, gradient checkpointing, {args.steps} optimizer steps "
             f"per cell (s/it: median after the first), attention {args.attn}; MFU against "
             f"{peak_tflops or 'unknown'} TFLOPS.\n",
             f"| method | seq | {mem_label}: reference | qwen-tune | ratio | s/it: reference | qwen-tune | speed-up "
             "| MFU reference | MFU qwen-tune |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    by = {(r["method"], r["seq"], r["side"]): r for r in results}
    for method in args.methods:
        for seq in args.seqs:
            ref, ours = by.get((method, seq, "reference"), {}), by.get((method, seq, "qwen-tune"), {})
            if not ref and not ours:
                continue
            mem_key = "peak_allocated_gib" if info["device"] == "cuda" else "peak_rss_gib"
            ratio = f"{ours[mem_key] / ref[mem_key]:.2f}" if mem_key in ref and mem_key in ours else "-"
            speed = f"{ref['s_per_it'] / ours['s_per_it']:.2f}x" if "s_per_it" in ref and "s_per_it" in ours else "-"
            mfu = []
            for r in (ref, ours):
                if peak_tflops and "tokens_per_s" in r:
                    mfu.append(f"{100 * r['tokens_per_s'] * flops_per_token(cfg, seq, method) / (peak_tflops * 1e12):.1f}%")
                else:
                    mfu.append("-")
            lines.append(f"| {method} | {seq} | {fmt_mem(ref)} | {fmt_mem(ours)} | {ratio} | "
                         f"{ref.get('s_per_it', float('nan')):.3f} | {ours.get('s_per_it', float('nan')):.3f} | "
                         f"{speed} | {mfu[0]} | {mfu[1]} |")
    lines += ["", "In the layout of Qwen's published A100 table (memory: " + mem_label + "):", ""]
    lines += published_layout(results, args.model, args.seqs, args.methods)
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-1.5b", help=f"tiny, {', '.join(MODELS)} or a Qwen-1 preset")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    ap.add_argument("--seqs", default="256,512,1024,2048,4096,8192")
    ap.add_argument("--sides", default=",".join(SIDES))
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per cell (the first is warm-up)")
    ap.add_argument("--grad-accum", type=int, default=8)
    ap.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    ap.add_argument("--attn", default=None, help="attention implementation (default: flash_attention_2 when "
                                                 "installed on GPU, else sdpa)")
    ap.add_argument("--full-deepspeed", default=None,
                    help="DeepSpeed config for method full (default on GPU: ds_configs/zero2.json, as finetune_ds.sh; "
                         "'none': the plain Trainer)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="accelerator peak 16-bit dense TFLOPS for MFU")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    ap.add_argument("--cells", default=None,
                    help="explicit cells in run order, e.g. lora:2048,qlora:2048,full:256 (overrides the "
                         "methods x seqs grid; put the most important first when a --budget may cut the rest)")
    ap.add_argument("--budget", type=float, default=None,
                    help="overall seconds for the cells: a cell gets at most what is left (capped by --timeout), "
                         "and cells that no longer fit (less than --min-cell-s left) are reported as skipped")
    ap.add_argument("--min-cell-s", type=float, default=30.0, help="with --budget: do not start a cell with less left")
    ap.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    ap.add_argument("--name", default=None, help="results file name (default: profile_<model>_<device>)")
    ap.add_argument("--results-dir", default=str(RESULTS), help="where <name>.{json,md} go (default bench/results)")
    ap.add_argument("--cell", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.cell:
        print(json.dumps(run_cell(json.loads(args.cell))), flush=True)
        return 0

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = sorted(set(args.methods) - set(METHODS))
    if bad:
        ap.error(f"unknown methods {bad}; choose from {', '.join(METHODS)}")
    args.seqs = [int(s) for s in args.seqs.split(",")]
    if args.cells:
        try:
            plan = [(m.strip(), int(q)) for m, q in (c.split(":") for c in args.cells.split(",") if c.strip())]
        except ValueError:
            ap.error(f"--cells {args.cells!r}: expected method:seq pairs, e.g. lora:2048,qlora:256")
        bad = sorted({m for m, _ in plan} - set(METHODS))
        if bad:
            ap.error(f"--cells: unknown methods {bad}; choose from {', '.join(METHODS)}")
        args.methods = list(dict.fromkeys(m for m, _ in plan))
        args.seqs = sorted({q for _, q in plan})
    else:
        plan = [(m, q) for m in args.methods for q in args.seqs]
    sides = [s.strip() for s in args.sides.split(",")]
    if args.attn is None:
        try:
            import flash_attn  # noqa: F401

            args.attn = "flash_attention_2" if device == "cuda" else "sdpa"
        except ImportError:
            args.attn = "sdpa"
    if (args.full_deepspeed or "").lower() == "none":  # e.g. a machine without DeepSpeed: plain Trainer
        deepspeed = None
    else:
        deepspeed = args.full_deepspeed or (str(REPO / "ds_configs" / "zero2.json") if device == "cuda" else None)
    cfg = model_config(args.model)
    info = device_info(device)
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in info.get("gpu", "")), None)

    work = Path(args.work or tempfile.mkdtemp(prefix="qwen_tune_profile_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"profile {args.model} on {info.get('gpu', device)}: methods {args.methods}, seqs {args.seqs}; "
          f"scratch {work}", flush=True)
    start = time.monotonic()
    ckpts = prepare_checkpoints(cfg, args.methods, work, device)
    print(f"  checkpoints ready in {time.monotonic() - start:.0f}s", flush=True)
    name = args.name or f"profile_{args.model}_{device}"
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)

    def write(results: list[dict[str, Any]]) -> str:
        """Results so far: written after every cell, so a run cut short keeps what it measured."""
        md = report(results, info, args, cfg, peak)
        (out / f"{name}.json").write_text(json.dumps({"machine": info, "model": args.model, "config": cfg,
                                                     "peak_tflops": peak, "results": results}, indent=2))
        (out / f"{name}.md").write_text(md)
        return md

    results: list[dict[str, Any]] = []
    for i, (method, seq) in enumerate(plan):
        data = work / f"data_{seq}.json"
        if not data.exists():
            write_data(data, args.steps * args.grad_accum, seq, seed=seq)
        order = sides if i % 2 == 0 else sides[::-1]  # alternate who runs first
        for side in order:
            timeout = args.timeout
            if args.budget is not None:
                left = args.budget - (time.monotonic() - start)
                if left < args.min_cell_s:
                    results.append({"method": method, "seq": seq, "side": side, "error": "skipped (budget)"})
                    print(f"  {method:8s} seq {seq:5d} {side:9s}: skipped, {max(left, 0):.0f}s of the budget left",
                          flush=True)
                    continue
                timeout = int(min(timeout, left))
            cell = {"method": method, "seq": seq, "side": side, "device": device, "attn": args.attn,
                    "steps": args.steps, "grad_accum": args.grad_accum, "data": str(data),
                    "checkpoint": ckpts["gptq" if method == "qlora" else "base" if method == "lora_emb" else "chat"],
                    "out": str(work / f"run_{method}_{seq}_{side}"),
                    "deepspeed": deepspeed if method == "full" else None}
            t0 = time.monotonic()
            r = spawn(cell, timeout)
            r["wall_s"] = round(time.monotonic() - t0, 1)
            results.append(r)
            msg = r.get("error") or f"{fmt_mem(r)} GiB, {r['s_per_it']:.3f} s/it"
            print(f"  {method:8s} seq {seq:5d} {side:9s}: {msg} ({r['wall_s']:.0f}s)", flush=True)
            write(results)
    md = write(results)
    print(md)
    print(f"results: {out / name}.{{json,md}}")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
