"""Training throughput and memory: Qwen's reference recipe vs qwen-tune, side by side.

    python bench/bench_train.py                       # throughput, 3 steps x 4 samples (~3-4 min on 2 cores)
    python bench/bench_train.py --part memory         # peak RSS at 8192 tokens (~5-7 min on 2 cores)
    python bench/bench_train.py --part all --steps 6 --samples-per-step 8   # everything, longer and steadier
    python bench/bench_train.py --ablation            # adds a side: qwen-tune with its loss recomputed + per-layer mask

Results go to bench/results/train_<part>.{json,md}.

Both sides train the *same* model from the *same* initial weights (a tiny random Qwen2: hidden 256,
4 layers, 4 heads / 2 KV heads, MLP 1024, untied 151,936-token embeddings and head; LoRA with the
lora recipe's defaults, r=64, alpha 16, dropout 0.05, on q/k/v/o/gate/up/down -- qwen-tune's Qwen2
default targets; fp32, SDPA) on the *same* conversations, with the recipe's optimizer, schedule and
clipping (the Trainer's fused AdamW, lr 3e-4 cosine, weight decay 0.1, beta2 0.95, max_grad_norm 1),
the same number of optimizer steps and samples per step. The MFU columns divide the step's useful
FLOPs (useful_flops()) by an fp32 GEMM peak measured in this process on the same threads. The sides run in one process, step by step, interleaved
(who goes first rotates every step), so a noisy shared machine hits both alike. Time is measured
as wall time (the headline tokens/s) and as process CPU time (a check that is less sensitive to
other processes on the machine).

Baseline -- the reference finetune.py recipe:
  * per-sample Python preprocessing (``LazySupervisedDataset.__getitem__`` -> ``preprocess()``, every
    piece through ``tokenizer(text).input_ids``), every sample padded to model_max_length (2048);
  * micro-batch 1 with gradient accumulation over the step's samples, stock ``transformers.Trainer``
    ``training_step`` -> ``model(input_ids, attention_mask, labels).loss`` (full logits, HF loss).
    (Only change: labels are cast to int64, which current torch's cross_entropy requires.)
qwen-tune:
  * batched ``ChatMLEncoder.encode`` of the step's conversations (parsed with ``to_conversation``);
  * ``make_collator(packing=True)`` -> ``PackingCollator``: one padding-free row per step;
  * ``QwenTrainer.training_step`` -> ``compute_loss``: one shared float block mask for the packed row,
    decoder forward hook + ``logits_to_keep=[]`` + chunked ``causal_lm_loss`` over supervised rows only,
    gradients taken chunk by chunk in the forward (the recipe's loss_chunk_size, 1024); the model built by
    the production ``apply_method`` with gradient_checkpointing auto resolved as the CLI resolves it.
Both pass the step's supervised-token count as ``num_items_in_batch`` (as the Trainer does), so they
optimise exactly the same objective: the per-step losses are printed side by side as a check.

A step's time counts everything it costs: preprocessing, collation, forward, backward, optimizer.
The step samples are picked one per length quantile of the 2,000-conversation set (then shuffled),
so a short run sees the set's length mix.

Memory (``--part memory``): each side runs one optimizer step on a ``--mem-seq``-token row in its
own process and reports ``ru_maxrss`` (baseline: one sample padded to that length, as the reference
does at that model_max_length; qwen-tune: one packed row of exactly that many real tokens).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (CACHE, IGNORE_TOKEN_ID, machine_info, machine_line, reference_preprocess,  # noqa: E402
                     table, write_results)
from make_data import DEFAULT_OUT, load_bench_data  # noqa: E402

from qwen_tune.constants import DEFAULT_LOSS_CHUNK_SIZE  # noqa: E402

MODEL = dict(vocab_size=151936, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
             rms_norm_eps=1e-6, tie_word_embeddings=False, use_cache=False)
# Issue 16: >= 10x real tokens/s at one sample per step, >= 12x with several samples per packed row, useful MFU
# >= 50% of the measured fp32 GEMM peak (both at the recipe defaults: LoRA r 64 on all linears).
TARGETS = {"ratio": 10.0, "ratio_packed": 12.0, "mfu": 0.50, "padding_efficiency": 0.97, "rss_fraction": 0.40}


# --------------------------------------------------------------------------- setup


def quiet() -> None:
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*")


def bench_recipe(args):
    """The bundled lora recipe with its defaults (r 64, alpha 16, dropout 0.05, AdamW lr 3e-4 cosine, weight
    decay 0.1, beta2 0.95, max_grad_norm 1.0, gradient_checkpointing auto), overridden only where asked."""
    from qwen_tune.config import load_recipe

    over = ["model.path=bench-tiny", f"data.max_len={args.max_len}", f"training.batch_size={args.samples_per_step}",
            f"training.loss_chunk_size={args.chunk_size}"]
    if args.lora_r is not None:
        over.append(f"lora.r={args.lora_r}")
    if args.lora_dropout is not None:
        over.append(f"lora.dropout={args.lora_dropout}")
    return load_recipe("lora", over)


def resolve_recipe(args):
    """(recipe, log line): gradient_checkpointing auto decided as `qwen-tune train` decides it."""
    from qwen_tune.cli.auto_settings import resolve_gradient_checkpointing

    cfg = dict(model_type="qwen2", torch_dtype="float32", **MODEL)
    return resolve_gradient_checkpointing(bench_recipe(args), model_config=cfg)


def build_models(recipe, seed: int, kinds: list[str]) -> dict:
    """The same random tiny Qwen2 per side, LoRA'd with the same initial adapter weights: qwen-tune's side through
    its production ``apply_method`` (which also applies the resolved gradient checkpointing), the reference's with
    the ``LoraConfig`` finetune.py builds (same r / alpha / dropout / targets)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from qwen_tune.models.families import FAMILIES
    from qwen_tune.train.methods import apply_method

    torch.manual_seed(seed)
    cfg = Qwen2Config(**MODEL, attn_implementation="sdpa")
    base = Qwen2ForCausalLM(cfg)
    lo = recipe.lora
    out = {}
    for kind in kinds:
        m = copy.deepcopy(base)
        torch.manual_seed(seed + 1)  # the same LoRA init on every side
        if kind == "baseline":
            m.config.use_cache = False  # the reference's use_cache=False
            lora = LoraConfig(r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout, bias="none",
                              target_modules=list(FAMILIES["qwen2"].lora_targets), task_type="CAUSAL_LM")
            out[kind] = get_peft_model(m, lora)
        else:
            out[kind] = apply_method(m, recipe, FAMILIES["qwen2"], is_chat=True)
    return out


def _previous_trainer_class():
    """QwenTrainer as first shipped: each loss chunk checkpointed and recomputed in backward, and the
    packed mask left to transformers (a boolean mask that SDPA converts to float in every layer)."""
    import functools

    import qwen_tune.train.trainer as qt

    class PreviousTrainer(qt.QwenTrainer):
        def compute_loss(self, *a, **k):
            saved = qt.causal_lm_loss, qt.packed_attention_mask
            qt.causal_lm_loss = functools.partial(saved[0], recompute=True)
            qt.packed_attention_mask = lambda position_ids, dtype: None
            try:
                return super().compute_loss(*a, **k)
            finally:
                qt.causal_lm_loss, qt.packed_attention_mask = saved

    return PreviousTrainer


def build_trainer(kind: str, model, recipe, steps: int, compile_loss: bool | None):
    """Both sides get the recipe's optimizer and schedule (the reference's finetune_lora_single_gpu.sh uses the
    same values); qwen-tune's side its production QwenTrainer with the recipe's loss settings."""
    from transformers import Trainer, TrainingArguments

    from qwen_tune.train.trainer import QwenTrainer

    t = recipe.training
    args = TrainingArguments(output_dir=str(CACHE / f"trainer-{kind}"), use_cpu=True, per_device_train_batch_size=1,
                             learning_rate=t.lr, lr_scheduler_type=t.scheduler, warmup_steps=t.warmup_ratio,
                             weight_decay=t.weight_decay, adam_beta2=t.adam_beta2, max_grad_norm=t.max_grad_norm,
                             report_to="none", save_strategy="no", logging_strategy="no",
                             remove_unused_columns=False, seed=0)
    kw = dict(loss_mode=t.loss, loss_chunk_size=t.loss_chunk_size, compile_loss=compile_loss)
    if kind == "baseline":
        trainer = Trainer(model=model, args=args)
    elif kind == "ours":
        trainer = QwenTrainer(model=model, args=args, **kw)
    else:  # "previous": the ablation side
        trainer = _previous_trainer_class()(model=model, args=args, **kw)
    trainer.create_optimizer_and_scheduler(num_training_steps=steps)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train()'s loop; only read without num_items
    return trainer


def pick_records(records: list[dict], n: int, tokenizer, seed: int) -> list[dict]:
    """n records whose length mix matches the whole set: one per length quantile, then shuffled.

    A handful of random picks from a long-tailed distribution would swing the padding ratio (and so
    the speed-up) from run to run; midpoint quantiles keep the small default run representative.
    """
    from qwen_tune.data.formats import RawRecord, to_conversation
    from qwen_tune.data.template import ChatMLEncoder

    convs = [to_conversation(RawRecord("bench", i, r), "qwen") for i, r in enumerate(records)]
    lengths = [len(s.input_ids) for s in ChatMLEncoder(tokenizer, 1 << 30).encode(convs)]
    order = sorted(range(len(records)), key=lambda i: (lengths[i], i))
    picked = [order[min(len(order) - 1, int((k + 0.5) * len(order) / n))] for k in range(n)]
    random.Random(seed).shuffle(picked)
    return [records[i] for i in picked]


# --------------------------------------------------------------------------- one optimizer step per side

SIDES = {"baseline": "baseline (reference)", "ours": "qwen-tune",
         "previous": "qwen-tune, recomputed loss + per-layer mask (ablation)"}


def baseline_features(records: list[dict], tokenizer, max_len: int) -> list[dict]:
    """``LazySupervisedDataset.__getitem__`` for each record: per-sample preprocess, padded to max_len."""
    out = []
    for rec in records:
        ret = reference_preprocess([rec["conversations"]], tokenizer, max_len)
        out.append(dict(input_ids=ret["input_ids"][0], labels=ret["labels"][0], attention_mask=ret["attention_mask"][0]))
    return out


def baseline_collate(features: list[dict]) -> dict:
    import torch

    batch = {k: torch.stack([f[k] for f in features]) for k in features[0]}
    # The reference builds torch.int tensors; cross_entropy in current torch wants int64 targets.
    batch["labels"] = batch["labels"].long()
    return batch


def ours_batch(records: list[dict], tokenizer, max_len: int) -> tuple[dict, int]:
    from qwen_tune.data.collators import make_collator
    from qwen_tune.data.formats import RawRecord, to_conversation
    from qwen_tune.data.template import ChatMLEncoder

    convs = [to_conversation(RawRecord("bench", i, r), "qwen") for i, r in enumerate(records)]
    samples = ChatMLEncoder(tokenizer, max_len, mask="reference").encode(convs)
    feats = [{"input_ids": s.input_ids, "labels": s.labels} for s in samples if not s.drop_reason]
    collate = make_collator(packing=True, pad_id=tokenizer.pad_token_id, attn_implementation="sdpa")
    return collate(feats), len(samples) - len(feats)


def packed_lengths(batch: dict) -> list[int]:
    """Sample lengths of a packed row (a sample starts where position_ids do not step by +1)."""
    pos = batch["position_ids"][0].tolist()
    starts = [i for i, p in enumerate(pos) if i == 0 or p != pos[i - 1] + 1] + [len(pos)]
    return [b - a for a, b in zip(starts, starts[1:])]


def flop_model(r: int) -> dict[str, int]:
    """Matmul parameters per token of the tiny model (per layer x layers) and of the head."""
    h, i, layers = MODEL["hidden_size"], MODEL["intermediate_size"], MODEL["num_hidden_layers"]
    kv = h // MODEL["num_attention_heads"] * MODEL["num_key_value_heads"]
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]  # q k v o gate up down: (in, out)
    return {"base": layers * sum(a * b for a, b in shapes), "lora": layers * sum(r * (a + b) for a, b in shapes),
            "attn_width": layers * h, "head": h * MODEL["vocab_size"]}


def useful_flops(lengths: list[int], supervised: int, r: int) -> dict[str, float]:
    """The FLOPs a step needs, whoever runs it (the same for both sides): only matmuls, on real tokens only.

    * frozen base linears: forward + input gradient = 2 x 2 x params per token (no weight gradient);
    * LoRA A and B: forward + input gradient + weight gradient = 3 x 2 x params per token;
    * attention, per sample and causal (L(L+1)/2 query-key pairs, not the cross-sample blocks a dense packed mask
      computes): QK^T and PV forward (2 x 2 x width per pair), backward twice that;
    * LM head, frozen, on supervised rows only: forward + input gradient = 2 x 2 x hidden x vocab per row.
    Not counted: padding, gradient-checkpointing recompute, norms / rotary / activations / softmax, the optimizer.
    """
    m = flop_model(r)
    tokens = sum(lengths)
    pairs = sum(n * (n + 1) // 2 for n in lengths)
    parts = {"decoder_base": 4.0 * m["base"] * tokens, "lora": 6.0 * m["lora"] * tokens,
             "attention": 12.0 * m["attn_width"] * pairs, "lm_head": 4.0 * m["head"] * supervised}
    parts["total"] = sum(parts.values())
    return parts


def gemm_peak(threads: int, n: int = 2048, repeats: int = 5, dtype: str = "fp32") -> dict[str, float]:
    """GEMM rate (fp32, or bf16) of torch.matmul on this process's threads: best of `repeats`, by wall and CPU time."""
    import torch

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    a, b = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
    torch.mm(a, b)
    wall = cpu = float("inf")
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        torch.mm(a, b)
        wall, cpu = min(wall, time.perf_counter() - w0), min(cpu, time.process_time() - c0)
    flops = 2.0 * n ** 3
    return {"n": n, "threads": threads, "dtype": dtype, "gflops_wall": flops / wall / 1e9,
            "gflops_cpu": flops / cpu / 1e9}


def train_step(kind: str, trainer, records: list[dict], tokenizer, max_len: int, micro_batch: int) -> dict[str, Any]:
    """One optimizer step over `records`; everything it costs is timed (wall and process CPU time)."""
    w0, c0 = time.perf_counter(), time.process_time()
    dropped = 0
    if kind == "baseline":
        feats = baseline_features(records, tokenizer, max_len)
        batches = [baseline_collate(feats[i:i + micro_batch]) for i in range(0, len(feats), micro_batch)]
    else:
        batch, dropped = ours_batch(records, tokenizer, max_len)
        batches = [batch]
    data_time = time.perf_counter() - w0
    # What Trainer.get_batch_samples passes: supervised tokens of the whole accumulation window.
    num_items = sum(int((b["labels"][:, 1:] != IGNORE_TOKEN_ID).sum()) for b in batches)
    loss = 0.0
    for b in batches:
        loss += float(trainer.training_step(trainer.model, b, num_items))
    # What Trainer's inner loop does at a sync step: clip (max_grad_norm), optimizer, scheduler, zero_grad.
    if trainer.args.max_grad_norm > 0:
        trainer._get_grad_norm(trainer.model, grad_norm=trainer._clip_grad_norm(trainer.model))
    trainer.optimizer.step()
    trainer.lr_scheduler.step()
    trainer.model.zero_grad()
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    processed = sum(b["input_ids"].numel() for b in batches)
    real = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in batches)
    return dict(wall=wall, cpu=cpu, data_time=data_time, loss=loss, real_tokens=real, processed_tokens=processed,
                head_rows=processed if kind == "baseline" else num_items, label_tokens=num_items, dropped=dropped,
                sample_lengths=None if kind == "baseline" else packed_lengths(batches[0]))


def warmup(kind: str, trainer, record: dict, tokenizer) -> None:
    """One forward/backward on a short sample, gradients discarded (weights and optimizer untouched)."""
    if kind == "baseline":
        batch = baseline_collate(baseline_features([record], tokenizer, 256))
    else:
        batch = ours_batch([record], tokenizer, 256)[0]
    trainer.training_step(trainer.model, batch, None)
    trainer.model.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------- throughput


def check_parity(records: list[dict], tokenizer, max_len: int) -> int:
    """The reference preprocess and ChatMLEncoder agree token for token on the benchmark samples."""
    from qwen_tune.data.formats import RawRecord, to_conversation
    from qwen_tune.data.template import ChatMLEncoder

    ref = reference_preprocess([r["conversations"] for r in records], tokenizer, max_len, pad=False)
    convs = [to_conversation(RawRecord("bench", i, r), "qwen") for i, r in enumerate(records)]
    ours = ChatMLEncoder(tokenizer, max_len).encode(convs)
    for i, s in enumerate(ours):
        if s.input_ids != ref["input_ids"][i] or s.labels != ref["labels"][i]:
            raise AssertionError(f"{records[i]['id']}: ChatMLEncoder differs from the reference preprocess")
    return len(ours)


def run_throughput(args, tokenizer, records: list[dict]) -> dict[str, Any]:
    import torch

    sides = ["baseline", "ours"] + (["previous"] if args.ablation else [])
    n = args.steps * args.samples_per_step
    picked = pick_records(records, n, tokenizer, args.seed)
    check_parity(picked, tokenizer, args.max_len)
    recipe, gc_line = resolve_recipe(args)
    print(f"  qwen-tune: {gc_line}", flush=True)
    compile_loss = {"on": True, "off": False, "auto": None}[args.compile_loss]
    models = build_models(recipe, args.seed, sides)
    trainers = {k: build_trainer(k, models[k], recipe, args.steps, compile_loss) for k in sides}
    del models
    short = min(picked, key=lambda r: sum(len(t["value"]) for t in r["conversations"]))
    warm_s = {}
    for k in sides:  # thread pools, allocator; qwen-tune's compiled loss chunk (compiled once per process)
        w0 = time.perf_counter()
        warmup(k, trainers[k], short, tokenizer)
        warm_s[k] = time.perf_counter() - w0
    peak = gemm_peak(torch.get_num_threads())
    print(f"  fp32 GEMM peak ({peak['n']}^3, {peak['threads']} threads): {peak['gflops_cpu']:.1f} GFLOP per CPU-s, "
          f"{peak['gflops_wall']:.1f} GFLOP/s wall; warm-up s: {warm_s}", flush=True)

    per_step: list[dict[str, Any]] = []
    for step in range(args.steps):
        recs = picked[step * args.samples_per_step:(step + 1) * args.samples_per_step]
        order = sides[step % len(sides):] + sides[:step % len(sides)]  # rotate who goes first
        row: dict[str, Any] = {"step": step + 1}
        for kind in order:
            row[kind] = train_step(kind, trainers[kind], recs, tokenizer, args.max_len, args.baseline_micro_batch)
        per_step.append(row)
        b = row["baseline"]
        msg = f"  step {step + 1}/{args.steps} ({row['ours']['real_tokens']:,} real tokens): baseline " \
              f"{b['wall']:.1f}s loss {b['loss']:.5f}"
        for k in sides[1:]:
            msg += f" | {SIDES[k]} {row[k]['wall']:.1f}s loss {row[k]['loss']:.5f} ({b['wall'] / row[k]['wall']:.2f}x)"
        print(msg, flush=True)

    r = recipe.lora.r
    flops = [useful_flops(s["ours"]["sample_lengths"], s["ours"]["label_tokens"], r) for s in per_step]
    flop_sum = {k: sum(f[k] for f in flops) for k in flops[0]}
    peak_end = gemm_peak(torch.get_num_threads())
    out: dict[str, Any] = {"steps": args.steps, "samples_per_step": args.samples_per_step, "max_len": args.max_len,
                           "baseline_micro_batch": args.baseline_micro_batch, "loss_chunk_size": args.chunk_size,
                           "torch_threads": torch.get_num_threads(), "sides": sides, "per_step": per_step,
                           "lora": {"r": r, "alpha": recipe.lora.alpha, "dropout": recipe.lora.dropout},
                           "gradient_checkpointing": gc_line, "compile_loss": args.compile_loss,
                           "warmup_wall_s": warm_s, "flop_model": flop_model(r), "useful_flops": flop_sum,
                           "gemm_peak": {"start": peak, "end": peak_end,
                                         "gflops_cpu": max(peak["gflops_cpu"], peak_end["gflops_cpu"]),
                                         "gflops_wall": max(peak["gflops_wall"], peak_end["gflops_wall"])}}
    for kind in sides:
        tot = {key: sum(s[kind][key] for s in per_step) for key in
               ("wall", "cpu", "data_time", "real_tokens", "processed_tokens", "head_rows", "label_tokens", "dropped")}
        out[kind] = {
            "wall_s": tot["wall"], "cpu_s": tot["cpu"], "data_time_s": tot["data_time"],
            "real_tokens": int(tot["real_tokens"]), "processed_tokens": int(tot["processed_tokens"]),
            "lm_head_rows": int(tot["head_rows"]), "label_tokens": int(tot["label_tokens"]),
            "dropped_samples": int(tot["dropped"]),
            "real_tokens_per_s": tot["real_tokens"] / tot["wall"],
            "real_tokens_per_cpu_s": tot["real_tokens"] / tot["cpu"],
            "padding_efficiency": tot["real_tokens"] / tot["processed_tokens"],
            "losses": [s[kind]["loss"] for s in per_step],
            "useful_gflops_per_cpu_s": flop_sum["total"] / tot["cpu"] / 1e9,
            "useful_gflops_per_s": flop_sum["total"] / tot["wall"] / 1e9,
        }
        o = out[kind]
        o["mfu_cpu"] = o["useful_gflops_per_cpu_s"] / out["gemm_peak"]["gflops_cpu"]
        o["mfu_wall"] = o["useful_gflops_per_s"] / out["gemm_peak"]["gflops_wall"]
    b = out["baseline"]
    for kind in sides[1:]:
        o = out[kind]
        o["speedup"] = o["real_tokens_per_s"] / b["real_tokens_per_s"]
        o["speedup_cpu_time"] = o["real_tokens_per_cpu_s"] / b["real_tokens_per_cpu_s"]
        ratios = sorted(s["baseline"]["wall"] / s[kind]["wall"] for s in per_step)
        o["speedup_per_step_min_max"] = [ratios[0], ratios[-1]]
        o["max_rel_loss_diff"] = max(abs(s["baseline"]["loss"] - s[kind]["loss"]) / abs(s["baseline"]["loss"])
                                     for s in per_step)
    if b["real_tokens"] != out["ours"]["real_tokens"]:
        raise AssertionError("baseline and qwen-tune did not train on the same tokens")
    lens = [len(x) for x in reference_preprocess([r["conversations"] for r in picked], tokenizer, args.max_len,
                                                 pad=False)["input_ids"]]
    out["sample_lengths"] = {"n": len(lens), "mean": sum(lens) / len(lens), "min": min(lens), "max": max(lens)}
    return out


# --------------------------------------------------------------------------- memory (subprocess per side)


def _status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS: current RSS, VmHWM: this address space's peak RSS)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def mem_worker(kind: str, args) -> dict[str, Any]:
    import resource

    from qwen_tune.data.tokenizer import load_tokenizer

    quiet()
    seq, data_path = args.mem_seq, args.data
    tokenizer = load_tokenizer(None)
    records = json.loads(data_path.read_text(encoding="utf-8"))
    args.max_len = seq
    recipe, _ = resolve_recipe(args)
    compile_loss = {"on": True, "off": False, "auto": None}[args.compile_loss]
    trainer = build_trainer(kind, build_models(recipe, args.seed, [kind])[kind], recipe, 1, compile_loss)
    rss_before = _status_kib("VmRSS")
    w0, c0 = time.perf_counter(), time.process_time()
    if kind == "baseline":
        # At model_max_length=seq the reference pads every sample to seq: one such sample.
        batch = baseline_collate(baseline_features(records[:1], tokenizer, seq))
    else:
        # One packed row of exactly seq real tokens (the last conversation cut to fit).
        from qwen_tune.data.collators import make_collator
        from qwen_tune.data.formats import RawRecord, to_conversation
        from qwen_tune.data.template import ChatMLEncoder

        enc = ChatMLEncoder(tokenizer, seq)
        feats, total = [], 0
        for i, rec in enumerate(records):
            s = enc.encode([to_conversation(RawRecord("bench", i, rec), "qwen")])[0]
            room = seq - total
            feats.append({"input_ids": s.input_ids[:room], "labels": s.labels[:room]})
            total += len(feats[-1]["input_ids"])
            if total >= seq:
                break
        batch = make_collator(True, tokenizer.pad_token_id)(feats)
    num_items = int((batch["labels"][:, 1:] != IGNORE_TOKEN_ID).sum())
    loss = float(trainer.training_step(trainer.model, batch, num_items))
    trainer.optimizer.step()
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    # ru_maxrss also counts the *parent's* peak when the child was vfork()ed (Python's subprocess does), so
    # the workers are spawned while the parent is still small; VmHWM (this process's own peak) cross-checks it.
    hwm = _status_kib("VmHWM")
    real = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
    return {"kind": kind, "seq": seq, "row_tokens": int(batch["input_ids"].shape[1]), "real_tokens": real,
            "label_tokens": num_items, "loss": loss, "step_wall_s": wall, "step_cpu_s": cpu,
            "rss_before_step_gib": rss_before / 2**20, "peak_rss_gib": peak / 2**20, "vm_hwm_gib": hwm / 2**20,
            "step_peak_increase_gib": (peak - rss_before) / 2**20}


def run_memory(args) -> dict[str, Any]:
    sides = ["ours", "baseline"] + (["previous"] if args.ablation else [])
    out: dict[str, Any] = {"seq": args.mem_seq, "loss_chunk_size": args.chunk_size, "sides": sides}
    for kind in sides:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--mem-worker", kind, "--mem-seq", str(args.mem_seq),
               "--chunk-size", str(args.chunk_size), "--data", str(args.data), "--seed", str(args.seed),
               "--compile-loss", args.compile_loss]
        cmd += ["--lora-r", str(args.lora_r)] if args.lora_r is not None else []
        cmd += ["--lora-dropout", str(args.lora_dropout)] if args.lora_dropout is not None else []
        print(f"  memory @ {args.mem_seq} tokens: {SIDES[kind]} (own process) ...", flush=True)
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            out[kind] = {"error": f"exit {p.returncode}" + (" (SIGKILL: out of memory?)" if p.returncode == -9 else ""),
                         "stderr_tail": p.stderr[-2000:]}
            print(f"    failed: {out[kind]['error']}\n{p.stderr[-1500:]}", flush=True)
            continue
        out[kind] = json.loads(p.stdout.strip().splitlines()[-1])
        print(f"    peak RSS {out[kind]['peak_rss_gib']:.2f} GiB (VmHWM {out[kind]['vm_hwm_gib']:.2f}; "
              f"step {out[kind]['step_wall_s']:.1f}s)", flush=True)
    base = out.get("baseline", {})
    for kind in sides:
        if kind != "baseline" and "peak_rss_gib" in base and "peak_rss_gib" in out.get(kind, {}):
            out[kind]["rss_fraction"] = out[kind]["peak_rss_gib"] / base["peak_rss_gib"]
            out[kind]["step_increase_fraction"] = out[kind]["step_peak_increase_gib"] / base["step_peak_increase_gib"]
    return out


# --------------------------------------------------------------------------- report


def _x(v: float) -> str:
    return f"{v:.2f}x"


def report(info: dict[str, Any], thr: dict[str, Any] | None, mem: dict[str, Any] | None) -> tuple[str, str]:
    text, md = [], []
    md.append("# Training benchmark: reference recipe vs qwen-tune\n")
    md.append(f"Machine: {machine_line(info)}\n")
    lo = (thr or {}).get("lora")
    lora = f"LoRA r={lo['r']} alpha {lo['alpha']} dropout {lo['dropout']}" if lo else "LoRA as the recipe"
    md.append(f"Model: tiny random Qwen2 (hidden 256, 4 layers, MLP 1024, vocab 151,936, untied head), "
              f"{lora} on q/k/v/o/gate/up/down, fp32, SDPA; optimizer and schedule: the lora recipe's defaults.\n")
    verdict = []
    if thr:
        sides = thr["sides"]
        b = thr["baseline"]
        sl = thr["sample_lengths"]
        hdr = ["metric", SIDES["baseline"]]
        for k in sides[1:]:
            hdr += [SIDES[k], "vs baseline"]

        def row(name, key, conv=lambda v: v, ratio=lambda o, b: ""):
            r = [name, conv(b[key])]
            for k in sides[1:]:
                r += [conv(thr[k][key]), ratio(thr[k], b)]
            return r

        pct = lambda v: f"{100 * v:.1f}%"  # noqa: E731
        rows = [
            row("real (non-pad) tokens/s", "real_tokens_per_s", ratio=lambda o, b: _x(o["speedup"])),
            row("real tokens per CPU-second", "real_tokens_per_cpu_s", ratio=lambda o, b: _x(o["speedup_cpu_time"])),
            row("padding efficiency (real / processed)", "padding_efficiency", pct,
                lambda o, b: _x(o["padding_efficiency"] / b["padding_efficiency"])),
            row("tokens through the decoder", "processed_tokens",
                ratio=lambda o, b: f"{o['processed_tokens'] / b['processed_tokens']:.3f}"),
            row("rows through the LM head", "lm_head_rows",
                ratio=lambda o, b: f"{o['lm_head_rows'] / b['lm_head_rows']:.3f}"),
            row("wall time (s)", "wall_s", ratio=lambda o, b: f"{o['wall_s'] / b['wall_s']:.3f}"),
            row("  of which preprocessing + collation (s)", "data_time_s", lambda v: f"{v:.3f}",
                lambda o, b: f"{o['data_time_s'] / max(b['data_time_s'], 1e-9):.3f}"),
            row("useful GFLOP per CPU-second", "useful_gflops_per_cpu_s", lambda v: f"{v:.1f}",
                lambda o, b: _x(o["useful_gflops_per_cpu_s"] / b["useful_gflops_per_cpu_s"])),
            row("useful MFU, CPU time (of the GEMM peak)", "mfu_cpu", pct),
            row("useful MFU, wall time", "mfu_wall", pct),
            row("final step loss", "losses", lambda v: f"{v[-1]:.6f}",
                lambda o, b: f"max rel. diff {o['max_rel_loss_diff']:.0e}"),
        ]
        t, m = table(hdr, rows)
        spread = ", ".join(f"{SIDES[k]} {thr[k]['speedup_per_step_min_max'][0]:.2f}x-"
                           f"{thr[k]['speedup_per_step_min_max'][1]:.2f}x" for k in sides[1:])
        head = (f"Throughput: {thr['steps']} optimizer steps x {thr['samples_per_step']} samples per step, "
                f"the same {sl['n']} conversations on each side ({sl['mean']:.0f} tokens mean, {sl['min']}-{sl['max']}), "
                f"model_max_length {thr['max_len']}; baseline micro-batch {thr['baseline_micro_batch']} + gradient "
                f"accumulation, qwen-tune one packed row per step (loss_chunk_size {thr['loss_chunk_size']}); "
                f"per-step wall-time speed-up: {spread}")
        text += [head, t, ""]
        md += [f"## Throughput\n\n{head}.\n", m, ""]
        fl, pk = thr["useful_flops"], thr["gemm_peak"]
        arith = (f"Useful FLOPs (the same for both sides; matmuls on real tokens only, see useful_flops()): decoder "
                 f"base linears {fl['decoder_base'] / 1e9:.1f} G + LoRA {fl['lora'] / 1e9:.1f} G + per-sample causal "
                 f"attention {fl['attention'] / 1e9:.1f} G + LM head on the {thr['ours']['label_tokens']:,} supervised "
                 f"rows {fl['lm_head'] / 1e9:.1f} G = {fl['total'] / 1e9:.1f} GFLOP; fp32 GEMM peak "
                 f"(torch.mm {pk['start']['n']}^3 on {pk['start']['threads']} threads, best of start/end) "
                 f"{pk['gflops_cpu']:.1f} GFLOP per CPU-second, {pk['gflops_wall']:.1f} GFLOP/s wall. "
                 f"{thr['gradient_checkpointing']}; qwen-tune's compile_loss: {thr['compile_loss']}")
        text += [arith, ""]
        md += [arith + ".\n"]
        o = thr["ours"]
        packed = thr["samples_per_step"] > 1
        goal = TARGETS["ratio_packed" if packed else "ratio"]
        verdict.append(f"throughput ({'several samples per packed row' if packed else 'one sample per step'}) "
                       f"{o['speedup_cpu_time']:.2f}x by CPU time ({o['speedup']:.2f}x wall) vs target >= {goal:.0f}x: "
                       f"{'MET' if o['speedup_cpu_time'] >= goal else 'NOT MET'}")
        verdict.append(f"useful MFU {100 * o['mfu_cpu']:.1f}% by CPU time ({100 * o['mfu_wall']:.1f}% wall) vs "
                       f"target >= {100 * TARGETS['mfu']:.0f}%: {'MET' if o['mfu_cpu'] >= TARGETS['mfu'] else 'NOT MET'}")
        pe = o["padding_efficiency"]
        verdict.append(f"padding efficiency {100 * pe:.1f}% vs target >= {100 * TARGETS['padding_efficiency']:.0f}%: "
                       f"{'MET' if pe >= TARGETS['padding_efficiency'] else 'NOT MET'}")
    if mem:
        sides = mem["sides"]
        base = mem.get("baseline", {})
        ok = [k for k in sides if "peak_rss_gib" in mem.get(k, {})]
        if "baseline" in ok:
            others = [k for k in ["ours", "previous"] if k in ok]
            hdr = ["metric", SIDES["baseline"]]
            for k in others:
                hdr += [SIDES[k], "vs baseline"]

            def mrow(name, key, frac=None, nd=2):
                r = [name, f"{base[key]:.{nd}f}" if isinstance(base[key], float) else base[key]]
                for k in others:
                    v = mem[k][key]
                    r += [f"{v:.{nd}f}" if isinstance(v, float) else v,
                          f"{100 * mem[k][frac]:.1f}%" if frac else (f"{v / base[key]:.3f}" if nd == 1 else "")]
                return r

            rows = [mrow("peak RSS, ru_maxrss (GiB)", "peak_rss_gib", "rss_fraction"),
                    mrow("  cross-check: own peak, VmHWM (GiB)", "vm_hwm_gib"),
                    mrow("RSS before the step (GiB)", "rss_before_step_gib"),
                    mrow("peak increase during the step (GiB)", "step_peak_increase_gib", "step_increase_fraction"),
                    mrow("real tokens in the row", "real_tokens"),
                    mrow("step wall time (s)", "step_wall_s", nd=1)]
            t, m = table(hdr, rows)
        else:
            t = m = "memory test failed: " + json.dumps({k: mem.get(k, {}).get("error") for k in sides})
        head = (f"Memory: one optimizer step on a {mem['seq']}-token row, each side in its own process "
                f"(ru_maxrss); baseline = one sample padded to {mem['seq']} (the reference at model_max_length "
                f"{mem['seq']}), qwen-tune = one packed row of {mem['seq']} real tokens (loss_chunk_size "
                f"{mem['loss_chunk_size']})")
        text += [head, t, ""]
        md += [f"## Peak memory at {mem['seq']} tokens\n\n{head}.\n", m, ""]
        if "rss_fraction" in mem.get("ours", {}):
            f = mem["ours"]["rss_fraction"]
            verdict.append(f"peak RSS {100 * f:.1f}% of baseline vs target <= {100 * TARGETS['rss_fraction']:.0f}%: "
                           f"{'MET' if f <= TARGETS['rss_fraction'] else 'NOT MET'}")
    text += ["Targets (qwen-tune as shipped): " + "; ".join(verdict)]
    md += ["## Targets (qwen-tune as shipped)\n"] + [f"- {v}" for v in verdict]
    return "\n".join(text), "\n".join(md)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="reference recipe vs qwen-tune: training throughput and memory")
    ap.add_argument("--part", choices=["throughput", "memory", "all"], default="throughput",
                    help="throughput (default, ~3-5 min here), memory (~5-6 min here) or all")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per side")
    ap.add_argument("--samples-per-step", type=int, default=4)
    ap.add_argument("--max-len", type=int, default=2048, help="model_max_length for the throughput test")
    ap.add_argument("--baseline-micro-batch", type=int, default=1)
    ap.add_argument("--chunk-size", type=int, default=DEFAULT_LOSS_CHUNK_SIZE,
                    help="qwen-tune loss_chunk_size (default: the recipe default)")
    ap.add_argument("--lora-r", type=int, default=None, help="LoRA rank on both sides (default: the recipe's, 64)")
    ap.add_argument("--lora-dropout", type=float, default=None,
                    help="LoRA dropout on both sides (default: the recipe's, 0.05; 0 makes the losses comparable)")
    ap.add_argument("--compile-loss", choices=["on", "auto", "off"], default="on",
                    help="qwen-tune's compile_loss: on (default) = the steady state of the recipe's auto, which "
                         "compiles after ~110 one-sample steps here; auto = a fresh trainer's auto")
    ap.add_argument("--mem-seq", type=int, default=8192)
    ap.add_argument("--ablation", action="store_true",
                    help="add a side: qwen-tune as first shipped (loss chunks recomputed in backward, packed mask "
                         "converted per layer), to show what the gradient-in-forward loss and the shared mask buy")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads for the throughput test (default: torch's choice); 1 makes CPU "
                         "time a clean measure of work on a shared machine")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--name", default=None, help="results file stem (default train_<part>)")
    ap.add_argument("--mem-worker", choices=list(SIDES), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.mem_worker:
        print(json.dumps(mem_worker(args.mem_worker, args)))
        return 0

    quiet()
    import torch

    from qwen_tune.data.tokenizer import load_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info()
    print(machine_line(info), flush=True)
    records = load_bench_data(args.data)
    tokenizer = load_tokenizer(None)
    t0 = time.perf_counter()
    thr = mem = None
    if args.part in ("memory", "all"):  # first, while this process is small (see mem_worker)
        mem = run_memory(args)
    if args.part in ("throughput", "all"):
        print(f"throughput: {args.steps} steps x {args.samples_per_step} samples, model_max_length {args.max_len}",
              flush=True)
        thr = run_throughput(args, tokenizer, records)
    info["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    text, md = report(info, thr, mem)
    print()
    print(text)
    payload = {"benchmark": "train", "part": args.part, "machine": info, "model": MODEL,
               "targets": TARGETS, "throughput": thr, "memory": mem, "total_wall_s": time.perf_counter() - t0}
    j, m = write_results(args.name or f"train_{args.part}", payload, md)
    print(f"\nwrote {j} and {m.name} ({time.perf_counter() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
