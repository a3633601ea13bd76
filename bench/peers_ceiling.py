"""How fast could any toolkit train the peer benchmark's run on this CPU? The FLOP ceiling next to the measured rates.

    python bench/peers_ceiling.py        # reads bench/results/peers_1thread.json and peers_1thread_bf16.json
    python bench/peers_ceiling.py --results bench/results/peers.json

A step needs at least its useful FLOPs (bench_train.useful_flops: matmuls on real tokens only, per-sample causal
attention, the frozen LM head forward + input gradient on supervised rows only). At the machine's measured fp32
and bf16 GEMM peaks (torch.mm 2048^3 on one thread, by CPU time: the peers table forces one thread), that bounds
the real tokens per CPU-second of *any* implementation in that precision. The printout puts each toolkit's measured tok/CPU-s (the window
column of bench_peers) against that ceiling, and says what fraction of the ceiling a given multiple of the best peer
would need. Results go to bench/results/peers_ceiling.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, machine_info, machine_line, table, write_results  # noqa: E402
from bench_train import gemm_peak, useful_flops  # noqa: E402
from peers_data import messages_of, prepare  # noqa: E402

LORA_R = 8  # bench_peers' LoRA rank


def supervised_and_lengths(work: Path) -> tuple[int, list[int]]:
    """Supervised rows (label positions the shifted loss uses) and lengths, from qwen-tune's own template path."""
    from transformers import AutoTokenizer

    from qwen_tune.data.chat_template import make_encoder
    from qwen_tune.data.formats import RawRecord, to_conversation
    from qwen_tune.data.template import IGNORE_INDEX

    tok = AutoTokenizer.from_pretrained(work / "model")
    content = json.loads((work / "data.json").read_text(encoding="utf-8"))
    convs = [to_conversation(RawRecord("peers", i, {"messages": ms}), "openai")
             for i, ms in enumerate(messages_of("openai", content))]
    samples = make_encoder(tok, 1 << 20).encode(convs)
    supervised = sum(sum(t != IGNORE_INDEX for t in s.labels[1:]) for s in samples)
    return supervised, [len(s.input_ids) for s in samples]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    results = ROOT / "bench" / "results"
    ap.add_argument("--results", type=Path, nargs="+",
                    default=[p for p in (results / "peers_1thread.json", results / "peers_1thread_bf16.json")
                             if p.exists()])
    ap.add_argument("--multiple", type=float, default=3.0, help="the target multiple of the best peer")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    info = machine_info()
    print(machine_line(info), flush=True)
    payloads = [(p, json.loads(p.read_text())) for p in args.results]
    measured = {payload.get("precision", "fp32"): (p, payload) for p, payload in payloads}
    with tempfile.TemporaryDirectory() as d:
        inputs = prepare(Path(d))
        supervised, lengths = supervised_and_lengths(Path(d))
    if sum(lengths) != inputs["real_tokens"]:
        raise AssertionError(f"qwen-tune's template path gives {sum(lengths)} tokens, the peers' count "
                             f"{inputs['real_tokens']}")
    flops = useful_flops(lengths, supervised, LORA_R)
    per_token = flops["total"] / sum(lengths)
    peaks = {prec: gemm_peak(1, dtype=prec) for prec in ("fp32", "bf16")}
    # real tokens per CPU-second at 100% of each GEMM peak
    ceilings = {prec: pk["gflops_cpu"] * 1e9 / per_token for prec, pk in peaks.items()}

    rows, runs = [], {}
    for prec, (_, payload) in sorted(measured.items()):
        for tool, r in payload["runs"].items():
            rate = r.get("window_tok_per_cpu_s")
            if rate is None:
                rows.append([tool, prec, "failed", ""])
                continue
            runs[f"{tool}/{prec}"] = {"tool": tool, "precision": prec, "tok_per_cpu_s": rate,
                                      "fraction_of_ceiling": rate / ceilings[prec]}
            rows.append([tool, prec, f"{rate:.1f}", f"{100 * rate / ceilings[prec]:.1f}%"])
    peers = {k: v for k, v in runs.items() if v["tool"] != "qwen-tune"}
    best = max(peers, key=lambda k: peers[k]["tok_per_cpu_s"])
    need = args.multiple * peers[best]["tok_per_cpu_s"]
    top = max(ceilings.values())
    md_table = table(["toolkit", "precision", "real tok/CPU-s (measured, window)", "of that precision's FLOP ceiling"],
                     rows)[1]
    parts = ", ".join(f"{k} {v / sum(lengths) / 1e6:.1f}" for k, v in flops.items() if k != "total")
    lines = [
        "# Peer benchmark: the FLOP ceiling of this CPU (bench/peers_ceiling.py)\n",
        machine_line(info) + "\n",
        f"Data: the peer benchmark's {len(lengths)} conversations, {sum(lengths):,} real tokens, {supervised:,} "
        f"supervised ({100 * supervised / sum(lengths):.1f}%). Useful FLOPs per real token: "
        f"**{per_token / 1e6:.1f} MFLOP** ({parts}). GEMM peak, one thread (torch.mm {peaks['fp32']['n']}^3): "
        + ", ".join(f"{prec} **{pk['gflops_cpu']:.1f} GFLOP per CPU-second**" for prec, pk in peaks.items()) + ".\n",
        "Ceilings (any implementation at 100% of the peak on every useful FLOP and nothing else): "
        + ", ".join(f"{prec} **{c:.0f} real tokens per CPU-second**" for prec, c in ceilings.items()) + ".\n",
        "Measured (" + ", ".join(p.name for p, _ in measured.values()) + "):\n", md_table, "",
        f"{args.multiple:g}x the best peer ({best}, {peers[best]['tok_per_cpu_s']:.1f}) is {need:.0f} tok/CPU-s = "
        f"**{100 * need / top:.0f}% of the highest ceiling**"
        + (": more than the machine can do." if need > top else "."),
    ]
    md = "\n".join(lines) + "\n"
    print(md)
    write_results("peers_ceiling", {"machine": info, "sources": [str(p.relative_to(ROOT)) for p, _ in measured.values()],
                                    "real_tokens": sum(lengths), "supervised": supervised, "flops": flops,
                                    "flops_per_token": per_token, "gemm_peaks": peaks, "ceilings_tok_per_cpu_s": ceilings,
                                    "runs": runs, "best_peer": best, "multiple": args.multiple,
                                    "needed_fraction_of_highest_ceiling": need / top}, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
