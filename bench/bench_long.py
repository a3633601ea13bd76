"""Long packed rows: attention over one packed row of 2k / 8k / 32k tokens, dense block mask vs per-sample SDPA.

    python bench/bench_long.py                      # 2k, 8k, 32k; one fresh process per (length, path)
    python bench/bench_long.py --lengths 2048 8192 --steps 3

Model: a tiny random Qwen2 (hidden 256, 4 layers, 4 heads / 2 KV heads, head_dim 64, SwiGLU 1024, an 8,192 vocabulary by
default: --vocab 151936 adds the same LM-head seconds to every path), trained as qwen-tune trains it: decoder forward, qwen-tune's chunked LM-head loss, backward. The row is
filled with samples whose lengths follow bench/make_data.py's log-normal mix (median 300, sigma 0.85, clipped to
[40, 2048]), the last one cut to fit, with position_ids restarting at 0 per sample as PackingCollator writes them.

Paths: (a) "dense": model attention "sdpa" plus the additive float block-diagonal mask [1, 1, T, T] that QwenTrainer
used to build each step (trainer.packed_attention_mask); (b) "per_sample": qwen-tune's "sdpa_packed" (SDPA with
is_causal on each sample's segment, no mask); (c) "flex": transformers' "flex_attention" with its block mask, tried
and reported as it fails or runs. Each (length, path) runs in a fresh process: one warm-up step on a short row,
then the best of --steps timed steps; peak memory is the worker's VmHWM (its own ru_maxrss) and its increase over the RSS after the
model and the batch were built.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine_info, machine_line, table, write_results  # noqa: E402
from make_data import MAX_TOKENS, MEDIAN_TOKENS, MIN_TOKENS, SIGMA  # noqa: E402

PATHS = {"dense": "(a) dense float mask + SDPA", "per_sample": "(b) per-sample SDPA", "flex": "(c) flex_attention"}
MODEL = dict(vocab_size=8192, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=32768, tie_word_embeddings=False)


def sample_lengths(T: int, seed: int = 0) -> list[int]:
    """Lengths of the samples filling a row of T tokens, drawn as make_data.py draws conversation lengths."""
    r, lens = random.Random(seed), []
    while sum(lens) < T:
        n = int(round(math.exp(r.gauss(math.log(MEDIAN_TOKENS), SIGMA))))
        lens.append(min(MAX_TOKENS, max(MIN_TOKENS, n)))
    lens[-1] -= sum(lens) - T
    return lens


def _status_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def worker(path: str, T: int, steps: int, vocab: int) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from qwen_tune.constants import DEFAULT_LOSS_CHUNK_SIZE
    from qwen_tune.models.packed_attention import PACKED_SDPA, register_packed_sdpa
    from qwen_tune.train.loss import causal_lm_loss
    from qwen_tune.train.trainer import packed_attention_mask

    register_packed_sdpa()
    torch.manual_seed(0)
    config = AutoConfig.for_model("qwen2", **{**MODEL, "vocab_size": vocab})
    config._attn_implementation = {"dense": "sdpa", "per_sample": PACKED_SDPA, "flex": "flex_attention"}[path]
    model = AutoModelForCausalLM.from_config(config).train()

    def batch(lens: list[int]) -> tuple:
        position_ids = torch.cat([torch.arange(n) for n in lens])[None]
        input_ids = torch.randint(0, vocab, (1, sum(lens)))
        labels = input_ids.clone()
        labels[0, torch.cumsum(torch.tensor([0] + lens[:-1]), 0)] = -100  # each sample's first label, as collated
        return position_ids, input_ids, labels, int((labels[:, 1:] != -100).sum())

    def step(position_ids, input_ids, labels, n_labels) -> float:
        t = time.perf_counter()
        kwargs = {}
        if path == "dense":  # built every step, as QwenTrainer did
            kwargs["attention_mask"] = packed_attention_mask(position_ids, torch.float32)
        h = model.model(input_ids=input_ids, position_ids=position_ids, **kwargs).last_hidden_state
        loss = causal_lm_loss(h, model.lm_head, labels, num_items_in_batch=n_labels,
                              chunk_size=DEFAULT_LOSS_CHUNK_SIZE)
        loss.backward()
        model.zero_grad(set_to_none=True)
        step.loss = loss.item()
        return time.perf_counter() - t

    # The warm-up step runs on a short packed row: it loads the kernels without paying a long row's quadratic cost.
    step(*batch([100, 156]))
    lens = sample_lengths(T)
    row = batch(lens)
    base = _status_kib("VmRSS")
    times = [step(*row) for _ in range(steps)]
    peak = _status_kib("VmHWM")
    return {"step_s": min(times), "steps_s": times, "loss": step.loss, "peak_gib": peak / 2**20,
            "increase_gib": (peak - base) / 2**20, "samples": len(lens), "max_len": max(lens)}


def attention_only(T: int, repeats: int, sample_len: int = 0) -> dict:
    """Attention alone (4 heads / 2 KV heads, head_dim 64, one layer): forward + backward of both paths, interleaved
    in one process, best of `repeats`; the dense path includes building its mask, as every step did."""
    import torch

    from qwen_tune.models.packed_attention import packed_sdpa_attention
    from qwen_tune.train.trainer import packed_attention_mask
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    class Layer(torch.nn.Module):
        num_key_value_groups, is_causal, training = 2, True, True

    lens = [sample_len] * (T // sample_len) if sample_len else sample_lengths(T)
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, T, 64, generator=g, requires_grad=True) for h in (4, 2, 2))
    layer = Layer()

    def dense() -> torch.Tensor:
        return sdpa_attention_forward(layer, q, k, v, packed_attention_mask(pos, torch.float32), scaling=0.125)[0]

    def per_sample() -> torch.Tensor:
        return packed_sdpa_attention(layer, q, k, v, None, position_ids=pos, scaling=0.125)[0]

    best = {"dense": float("inf"), "per_sample": float("inf")}
    outs = {}
    for _ in range(repeats):
        for name, fn in (("dense", dense), ("per_sample", per_sample)):
            t = time.perf_counter()
            out = fn()
            out.backward(torch.ones_like(out))
            best[name] = min(best[name], time.perf_counter() - t)
            outs[name] = out.detach()
            q.grad = k.grad = v.grad = None
    diff = (outs["dense"] - outs["per_sample"]).abs().max().item()
    return {**{f"{n}_s": t for n, t in best.items()}, "max_abs_diff": diff, "samples": len(lens)}


def run_one(path: str, T: int, steps: int, vocab: int, timeout: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", path, str(T), str(steps), str(vocab)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"over {timeout} s"}
    lines = [x for x in p.stdout.splitlines() if x.startswith("{")]
    if p.returncode or not lines:
        err = [x for x in p.stderr.strip().splitlines() if "Error" in x or "error" in x] or p.stderr.splitlines()[-1:]
        return {"error": (err[-1] if err else f"exit {p.returncode}")[:200]}
    return json.loads(lines[-1])


def _table(results: dict[str, dict[str, dict]]) -> tuple[str, str]:
    rows = []
    for T, cells in sorted(results.items(), key=lambda kv: int(kv[0])):
        a = cells.get("dense", {})
        for path, r in cells.items():
            if "error" in r:
                rows.append([int(T), len(sample_lengths(int(T))), PATHS[path], "-", "-", "-", "-", "-", "-",
                             r["error"].split(". ")[0]])
                continue
            speed = f"{a['step_s'] / r['step_s']:.2f}x" if "step_s" in a else "-"
            mem = f"{r['increase_gib'] / a['increase_gib']:.2f}x" if "increase_gib" in a else "-"
            rows.append([int(T), r["samples"], PATHS[path], f"{r['step_s']:.2f}", len(r["steps_s"]), speed,
                         f"{r['peak_gib']:.2f}", f"{r['increase_gib']:.2f}", mem, f"{r['loss']:.6f}"])
    return table(["tokens", "samples", "attention", "step s", "steps", "speed-up vs (a)", "peak RSS GiB",
                  "RSS increase GiB", "increase vs (a)", "loss"], rows)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768])
    ap.add_argument("--steps", type=int, default=1, help="timed steps after a short warm-up (best is reported)")
    ap.add_argument("--vocab", type=int, default=MODEL["vocab_size"],
                    help="151936 for Qwen's; the LM head costs the same on every path and dominates short rows")
    ap.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per (length, path) process")
    ap.add_argument("--update", action="store_true", help="keep the other lengths of the last results file")
    ap.add_argument("--attention", type=int, nargs="+", help="attention alone at these lengths (no model)")
    ap.add_argument("--sample-len", type=int, nargs="+", default=[0],
                    help="--attention: rows of equal samples of these lengths (0: make_data's mix)")
    ap.add_argument("--repeats", type=int, default=5, help="--attention: interleaved repeats, best is reported")
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], *map(int, args.worker[1:]))))
        return 0
    info = machine_info()
    if args.attention:
        rows, out = [], {}
        for T, n in ((T, n) for T in args.attention for n in args.sample_len):
            r = out[f"{T}/{n or 'mix'}"] = attention_only(T, args.repeats, n)
            print(f"attention T={T} sample length {n or 'mix'}: {r}", flush=True)
            rows.append([T, n or "make_data mix", r["samples"], f"{r['dense_s']:.3f}", f"{r['per_sample_s']:.3f}",
                         f"{r['dense_s'] / r['per_sample_s']:.2f}x", f"{r['max_abs_diff']:.1e}"])
        text, md = table(["tokens", "sample length", "samples", "(a) dense s", "(b) per-sample s", "speed-up", "max |diff|"], rows)
        print(text)
        write_results("long_packed_attention", {"machine": info, "repeats": args.repeats, "results": out},
                      f"# Packed-row attention alone\n\nMachine: {machine_line(info)}\n\nOne attention layer (4 / 2 "
                      f"KV heads, head_dim 64), forward + backward, the dense path including its mask; best of "
                      f"{args.repeats}, interleaved.\n\n{md}")
        return 0
    old = RESULTS / "long_packed.json"
    results: dict[str, dict[str, dict]] = json.loads(old.read_text())["results"] if args.update and old.exists() else {}
    for T in args.lengths:
        results.setdefault(str(T), {})
        for path in args.paths:
            r = results[str(T)][path] = run_one(path, T, args.steps, args.vocab, args.timeout)
            print(f"T={T} {path}: {r}", flush=True)
    text, md = _table(results)
    print(text)
    head = (f"# Long packed rows\n\nMachine: {machine_line(info)}\n\nTiny Qwen2 (hidden 256, 4 layers, 4 / 2 KV "
            f"heads, {args.vocab:,} vocab), one packed row of make_data.py-mix samples, forward + chunked loss + "
            f"backward; best of the timed steps after a short warm-up row, one fresh process per cell. Peak RSS is "
            f"the worker's VmHWM (its ru_maxrss); the increase is over its RSS once the model and batch were built.\n")
    write_results("long_packed", {"machine": info, "model": {**MODEL, "vocab_size": args.vocab}, "results": results,
                                  "sample_lengths": {T: sample_lengths(int(T)) for T in results}},
                  head + "\n" + md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
