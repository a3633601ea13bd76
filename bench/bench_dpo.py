"""DPO step: qwen-tune (stage: dpo) vs TRL's plain DPOTrainer, same model, same tokenized pairs, same hyperparameters.

    python bench/bench_dpo.py            # writes bench/results/dpo.{json,md}
    python bench/bench_dpo.py --steps 3 --hidden 256 --reply-len 192

Each variant runs in its own process (peak memory is per process). Both train LoRA (r=16, q/k/v/o/gate/up/down)
on a random-weight Qwen2 with the full 151,936-token vocabulary, reference = adapter-disabled base:

* ``trl``: ``trl.DPOTrainer`` as documented (plain transformers model + ``peft_config``), its fused LM head;
  ``_prepare_dataset`` is skipped only so it trains on the very token ids qwen-tune rendered;
* ``qwen-tune``: ``run_preference`` on the ``dpo_lora`` recipe (QwenDPOTrainer, chunked log-probs).

Peak memory: CUDA max allocated on GPU, else the process's RSS high-water mark minus its RSS when training starts.
Tokens/s: non-padding input tokens (chosen + rejected) over the training time, after one warm-up step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import CACHE, machine_info, machine_line, table, write_results  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def make_inputs(work: Path, hidden: int, n_pairs: int, reply_len: int) -> tuple[Path, Path]:
    from qwen_tune.models.loading import build_from_config

    cfg = {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": hidden, "intermediate_size": 2 * hidden,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "max_position_embeddings": 4096, "tie_word_embeddings": False}
    work.mkdir(parents=True, exist_ok=True)
    (work / f"cfg_{hidden}.json").write_text(json.dumps(cfg))
    base = build_from_config(work / f"cfg_{hidden}.json", work / f"base_{hidden}", seed=0)
    words = "the model answers every question with care and detail so that readers learn".split()
    data = work / f"pairs_{n_pairs}_{reply_len}.jsonl"
    with data.open("w") as f:
        for i in range(n_pairs):
            reply = lambda k: " ".join(words[(i * 7 + j * k) % len(words)] for j in range(reply_len))  # noqa: E731
            f.write(json.dumps({"prompt": f"Question {i}: " + " ".join(words[:40]), "chosen": reply(3),
                                "rejected": reply(5)}) + "\n")
    return base, data


def recipe(base: Path, data: Path, out: Path, steps: int, max_len: int):
    from qwen_tune.config import load_recipe

    return load_recipe("dpo_lora", [f"model.path={base}", f"data.path={data}", f"output.dir={out}",
                                    f"data.max_len={max_len}", "training.batch_size=2", "training.grad_accum=1",
                                    f"training.max_steps={steps + 1}", "training.warmup_ratio=0",
                                    "output.report_to=[]", "output.save_steps=100000", "output.save_final=false",
                                    "output.overwrite=true", "output.resume_from_checkpoint=null",
                                    f"lora.target_modules={TARGETS}", "lora.r=16"])


def child(kind: str, base: Path, data: Path, out: Path, steps: int, max_len: int) -> dict:
    import torch
    from transformers import TrainerCallback

    class Meter(TrainerCallback):
        """Starts the clock and the memory baseline after the warm-up step."""

        def __init__(self) -> None:
            self.t0 = self.rss0 = self.tok0 = None

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
            if state.global_step == 1:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                self.t0, self.tok0, self.rss0 = time.perf_counter(), state.num_input_tokens_seen, _rss_bytes()

        def on_train_end(self, args, state, control, **kw):  # noqa: ANN001
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.seconds = time.perf_counter() - self.t0
            self.tokens = state.num_input_tokens_seen - self.tok0
            self.losses = [h["loss"] for h in state.log_history if "loss" in h]

    meter = Meter()
    r = recipe(base, data, out, steps, max_len)
    if kind == "qwen-tune":
        from qwen_tune.train.preference import run_preference

        run_preference(r, callbacks=[meter])
    else:
        from peft import LoraConfig
        from transformers import AutoModelForCausalLM
        from trl import DPOTrainer

        from qwen_tune.data.pairs import prepare_pairs
        from qwen_tune.data.tokenizer import load_tokenizer
        from qwen_tune.train.preference import dpo_config

        class SameTokens(DPOTrainer):
            def _prepare_dataset(self, dataset, *a, **k):  # noqa: ANN001, ANN002, ANN003
                return dataset

        tok = load_tokenizer(str(base))
        ds = prepare_pairs(r.data, tok, seed=r.training.seed).train
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).to(device)
        peft = LoraConfig(r=r.lora.r, lora_alpha=r.lora.alpha, lora_dropout=0.0, target_modules=TARGETS,
                          task_type="CAUSAL_LM")
        trainer = SameTokens(model=model, args=dpo_config(r, out, False), train_dataset=ds, processing_class=tok,
                             peft_config=peft, callbacks=[meter])
        trainer.train()
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - meter.rss0
    return {"kind": kind, "seconds": meter.seconds, "tokens": meter.tokens, "tokens_per_s": meter.tokens / meter.seconds,
            "peak_bytes": peak, "losses": meter.losses,
            "peak_kind": "cuda max allocated" if torch.cuda.is_available() else "RSS increase during training"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--reply-len", type=int, default=160, help="words per reply")
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--child", nargs=4, metavar=("KIND", "BASE", "DATA", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        kind, base, data, out = a.child
        print("RESULT " + json.dumps(child(kind, Path(base), Path(data), Path(out), a.steps, a.max_len)))
        return
    work = CACHE / "dpo"
    base, data = make_inputs(work, a.hidden, 2 * (a.steps + 1), a.reply_len)
    results = {}
    for kind in ("trl", "qwen-tune"):
        cmd = [sys.executable, __file__, "--steps", str(a.steps), "--max-len", str(a.max_len),
               "--child", kind, str(base), str(data), str(work / f"out_{kind}")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{kind} failed:\n{proc.stderr[-4000:]}")
        results[kind] = json.loads(line[len("RESULT "):])
        print(kind, {k: v for k, v in results[kind].items() if k != "losses"})
    t, q = results["trl"], results["qwen-tune"]
    info = machine_info()
    rows = [[k, f"{r['peak_bytes'] / 2**20:.0f}", f"{r['tokens_per_s']:.1f}", f"{r['seconds']:.1f}",
             " ".join(f"{x:.4f}" for x in r["losses"])] for k, r in results.items()]
    rows.append(["ratio qwen-tune / trl", f"{q['peak_bytes'] / t['peak_bytes']:.2f}x",
                 f"{q['tokens_per_s'] / t['tokens_per_s']:.2f}x", "", ""])
    _, md_table = table(["trainer", f"peak MiB ({t['peak_kind']})", "tokens/s", "timed s", "losses per step"], rows)
    md = (f"# DPO step: qwen-tune vs TRL's DPOTrainer\n\nMachine: {machine_line(info)}\n\n"
          f"Random-weight Qwen2, hidden {a.hidden}, 2 layers, vocab 151,936; LoRA r=16 on all linears, reference = "
          f"adapter-disabled base; 2 pairs per step, replies of {a.reply_len} words, max_len {a.max_len}; "
          f"{a.steps} timed steps after 1 warm-up; one process per trainer.\n\n{md_table}\n\n"
          "Same losses = same model, data and loss. Without CUDA, TRL's fused head runs its torch fallback over every "
          "position (prompt and padding included) and recomputes the logits in backward; on a GPU it runs Triton "
          "kernels over completion positions only, so the ratio there will be smaller. The timings share a loaded "
          "2-core machine: expect large run-to-run noise.\n")
    write_results("dpo", {"machine": info, "args": vars(a), "results": results}, md)
    print(md)


if __name__ == "__main__":
    main()
