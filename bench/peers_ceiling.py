"""How fast could any toolkit train the peer benchmark's run on this CPU? The FLOP ceiling next to the measured rates.

    python bench/peers_ceiling.py                                  # reads bench/results/peers_1thread.json
    python bench/peers_ceiling.py --results bench/results/peers.json

A step needs at least its useful FLOPs (bench_train.useful_flops: matmuls on real tokens only, per-sample causal
attention, the frozen LM head forward + input gradient on supervised rows only). At the machine's measured fp32
GEMM peak (torch.mm 2048^3 on one thread, by CPU time: the peers table forces one thread), that bounds the real
tokens per CPU-second of *any* implementation. The printout puts each toolkit's measured tok/CPU-s (the window
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
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "peers_1thread.json")
    ap.add_argument("--multiple", type=float, default=3.0, help="the target multiple of the best peer")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    info = machine_info()
    print(machine_line(info), flush=True)
    measured = json.loads(args.results.read_text())
    with tempfile.TemporaryDirectory() as d:
        inputs = prepare(Path(d))
        supervised, lengths = supervised_and_lengths(Path(d))
    if sum(lengths) != inputs["real_tokens"]:
        raise AssertionError(f"qwen-tune's template path gives {sum(lengths)} tokens, the peers' count "
                             f"{inputs['real_tokens']}")
    flops = useful_flops(lengths, supervised, LORA_R)
    peak = gemm_peak(1)
    per_token = flops["total"] / sum(lengths)
    ceiling = peak["gflops_cpu"] * 1e9 / per_token  # real tokens per CPU-second at 100% of the GEMM peak

    rows, runs = [], {}
    for tool, r in measured["runs"].items():
        rate = r.get("window_tok_per_cpu_s")
        if rate is None:
            continue
        runs[tool] = {"tok_per_cpu_s": rate, "fraction_of_ceiling": rate / ceiling}
        rows.append([tool, f"{rate:.1f}", f"{100 * rate / ceiling:.1f}%"])
    peers = {t: v for t, v in runs.items() if t != "qwen-tune"}
    best = max(peers, key=lambda t: peers[t]["tok_per_cpu_s"])
    need = args.multiple * peers[best]["tok_per_cpu_s"]
    md_table = table(["toolkit", "real tok/CPU-s (measured, window)", "of the FLOP ceiling"], rows)[1]
    parts = ", ".join(f"{k} {v / sum(lengths) / 1e6:.1f}" for k, v in flops.items() if k != "total")
    lines = [
        "# Peer benchmark: the FLOP ceiling of this CPU (bench/peers_ceiling.py)\n",
        machine_line(info) + "\n",
        f"Data: the peer benchmark's {len(lengths)} conversations, {sum(lengths):,} real tokens, {supervised:,} "
        f"supervised ({100 * supervised / sum(lengths):.1f}%). Useful FLOPs per real token: "
        f"**{per_token / 1e6:.1f} MFLOP** ({parts}). fp32 GEMM peak, one thread: "
        f"**{peak['gflops_cpu']:.1f} GFLOP per CPU-second** (torch.mm {peak['n']}^3).\n",
        f"Ceiling: **{ceiling:.0f} real tokens per CPU-second** for any implementation at 100% of that peak on every "
        "useful FLOP and nothing else.\n",
        f"Measured ({args.results.name}):\n", md_table, "",
        f"{args.multiple:g}x the best peer ({best}, {peers[best]['tok_per_cpu_s']:.1f}) is {need:.0f} tok/CPU-s = "
        f"**{100 * need / ceiling:.0f}% of the ceiling**"
        + (": more than the machine can do." if need > ceiling else "."),
    ]
    md = "\n".join(lines) + "\n"
    print(md)
    write_results("peers_ceiling", {"machine": info, "source": str(args.results.relative_to(ROOT)),
                                    "real_tokens": sum(lengths), "supervised": supervised, "flops": flops,
                                    "flops_per_token": per_token, "gemm_peak": peak, "ceiling_tok_per_cpu_s": ceiling,
                                    "runs": runs, "best_peer": best, "multiple": args.multiple,
                                    "needed_fraction_of_ceiling": need / ceiling}, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
