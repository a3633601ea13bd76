"""qwen-tune vs the toolkits users would pick instead, side by side: same model, data and LoRA settings.

    python bench/bench_peers.py                          # install missing venvs, run every toolkit, write results
    python bench/bench_peers.py --only torchtune         # (re)run one toolkit; the others' stored runs are kept
    python bench/bench_peers.py --skip-install           # never (re)install: a toolkit without a venv is reported
    python bench/bench_peers.py --report                 # rebuild bench/results/peers.{json,md} from stored runs

Each peer lives in its own venv under bench/.venvs/<peer> (bench/peers_install.py: torch pinned to 2.13.0+cpu
with a constraints file). qwen-tune runs from this checkout with the machine's own environment.

What every toolkit gets (bench/peers_data.py):
  * the same checkpoint: a random-weight Qwen2 (hidden 256, 4 layers, 4 heads / 2 KV heads, MLP 1024, untied
    151,936-token embeddings and head; seed 0) saved with save_pretrained, plus the real Qwen2 tokenizer files
    (tokenizer.json, vocab.json, merges.txt, ChatML chat template);
  * the same 24 conversations of bench/make_data.py's set (one per length quantile), with the system prompt written
    out, in each toolkit's format (OpenAI messages as JSON / JSONL);
  * LoRA r 8, alpha 16, dropout 0 on every linear layer of the decoder (q/k/v/o/gate/up/down), AdamW lr 1e-3,
    constant schedule, no warm-up, no weight decay, fp32 on CPU (--precision bf16: each toolkit's bf16 switch), SDPA
    attention, no gradient checkpointing, no compile, packing on at max_len 2048, micro-batch 1 packed row, --epochs
    passes over the data;
  * its own CLI in its own process: `qwen-tune train`, `llamafactory-cli train`, `tune run
    lora_finetune_single_device`, `axolotl train`.

Measured per run, by a watcher in this (small) process:
  * real tokens/s: the real (non-pad) tokens of the data (counted once from the checkpoint's chat template) over the
    training window. The window runs from the end of the first optimizer step to the end of the last, each step's
    end being the moment its per-step log line arrives (logging every step, unbuffered); the tokens in it are the
    run's real tokens times (steps - 1) / steps, since every step is one packed row of the same data. The first
    step is left out: it carries one-time warm-up. `loop tok/s` counts every step, from the train loop's first
    progress line;
  * CPU time of the whole process tree (user + system, os.wait4's rusage), and real tokens per CPU-second over the
    whole run (setup included): a shared machine slows wall time more than CPU time;
  * peak RSS: the largest sum of VmRSS over the process tree, polled every 100 ms from /proc, and ru_maxrss (the
    largest single process) from os.wait4 as a cross-check;
  * the machine's load average before and after each run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CACHE, ROOT, cpu_model, table, write_results  # noqa: E402
from peers_install import PEERS, VENVS, install, install_status, venv_python  # noqa: E402

WORK = CACHE / "peers"
RUNS = WORK / "runs"
THREADS = 0  # OMP_NUM_THREADS forced on every toolkit (0: each one's default)
PRECISION = "fp32"  # every toolkit's compute dtype: fp32, or bf16 (autocast / bf16 weights: CPUs with AVX512-BF16 or AMX)
TOOLS = ["qwen-tune", *PEERS]
LABELS = {"qwen-tune": "qwen-tune", "llamafactory": "LLaMA-Factory", "torchtune": "torchtune", "axolotl": "axolotl"}
TARGETS = {"speed_vs_best_peer": 3.0, "memory_vs_leanest_peer": 0.5}
LR = 1e-3
MAX_LEN = 2048

# A step's end: its per-step log line. HF Trainer prints a dict with 'loss' every logging step (qwen-tune,
# LLaMA-Factory, axolotl); torchtune's StdoutLogger prints "Step N | loss:...".
STEP_RE = {"hf": re.compile(r"""['"]loss['"]\s*:"""), "torchtune": re.compile(r"Step \d+ \| loss:")}
# The train loop's start, where the log shows it: HF Trainer's banner (LLaMA-Factory, axolotl; qwen-tune's log
# level hides it), torchtune's first tqdm bar.
LOOP_RE = re.compile(r"\*\*\*\*\* Running training \*\*\*\*\*|^\s*0%\|")


# --------------------------------------------------------------------------- configs


def _yaml(obj: dict) -> str:
    return json.dumps(obj, indent=1)  # JSON is YAML: every toolkit's loader reads it


def qwen_tune_cmd(run: Path, epochs: int, batch: int) -> tuple[list[str], dict, str]:
    recipe = {
        "model": {"path": str(WORK / "model"), "attn_implementation": "sdpa", "seed": 0},
        "data": {"path": str(WORK / "data.json"), "max_len": MAX_LEN, "template": "auto", "mask": "assistant_only",
                 "packing": True},
        "method": "lora",
        # trainable_embeddings false: a random checkpoint looks like a base model, whose embeddings + head qwen-tune
        # would train too (the peers train LoRA only).
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "auto", "trainable_embeddings": False},
        "training": {"epochs": epochs, "batch_size": batch, "grad_accum": 1, "lr": LR, "scheduler": "constant",
                     "warmup_ratio": 0.0, "weight_decay": 0.0, "gradient_checkpointing": False, "precision": PRECISION,
                     "seed": 0},
        "output": {"dir": str(run / "out"), "save_steps": 100000, "save_every_minutes": 0, "logging_steps": 1,
                   "report_to": [], "overwrite": True},
    }
    path = run / "recipe.yaml"
    path.write_text(_yaml(recipe))
    exe = shutil.which("qwen-tune")
    cmd = [exe, "train", "--recipe", str(path)] if exe else [sys.executable, "-m", "qwen_tune.cli.main", "train",
                                                             "--recipe", str(path)]
    return cmd, {"PYTHONPATH": str(ROOT)}, "hf"


def llamafactory_cmd(run: Path, epochs: int, batch: int) -> tuple[list[str], dict, str]:
    ds = run / "data"
    ds.mkdir(exist_ok=True)
    shutil.copy(WORK / "data.json", ds / "bench.json")
    (ds / "dataset_info.json").write_text(json.dumps({"bench": {
        "file_name": "bench.json", "formatting": "sharegpt", "columns": {"messages": "messages"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
                 "system_tag": "system"}}}))
    cfg = {
        "model_name_or_path": str(WORK / "model"), "stage": "sft", "do_train": True, "finetuning_type": "lora",
        "lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.0, "lora_target": "all",
        "dataset": "bench", "dataset_dir": str(ds), "template": "qwen", "cutoff_len": MAX_LEN,
        # packing: greedy knapsack into cutoff_len rows (its fastest; neat_packing adds a block-diagonal mask).
        "packing": True, "overwrite_cache": True, "preprocessing_num_workers": 1,
        "output_dir": str(run / "out"), "overwrite_output_dir": True, "logging_steps": 1, "save_strategy": "no",
        "plot_loss": False, "report_to": "none", "per_device_train_batch_size": 1, "gradient_accumulation_steps": 1,
        "learning_rate": LR, "num_train_epochs": float(epochs), "lr_scheduler_type": "constant", "warmup_ratio": 0.0,
        "weight_decay": 0.0, "bf16": PRECISION == "bf16", "fp16": False, "flash_attn": "sdpa", "seed": 0, "use_cpu": True,
        "gradient_checkpointing": False, "disable_gradient_checkpointing": True,
    }
    path = run / "train.yaml"
    path.write_text(_yaml(cfg))
    return [str(VENVS / "llamafactory" / "bin" / "llamafactory-cli"), "train", str(path)], \
        {"DISABLE_VERSION_CHECK": "1", "CUDA_VISIBLE_DEVICES": ""}, "hf"


def torchtune_cmd(run: Path, epochs: int, batch: int) -> tuple[list[str], dict, str]:
    m = WORK / "model"
    cfg = {
        "output_dir": str(run / "out"),
        "tokenizer": {"_component_": "torchtune.models.qwen2.qwen2_tokenizer", "path": str(m / "vocab.json"),
                      "merges_file": str(m / "merges.txt"), "max_seq_len": MAX_LEN},
        "model": {"_component_": "torchtune.models.qwen2.lora_qwen2",
                  "lora_attn_modules": ["q_proj", "k_proj", "v_proj", "output_proj"], "apply_lora_to_mlp": True,
                  "apply_lora_to_output": False, "vocab_size": 151936, "num_layers": 4, "num_heads": 4,
                  "num_kv_heads": 2, "embed_dim": 256, "intermediate_dim": 1024, "max_seq_len": 32768,
                  "attn_dropout": 0.0, "norm_eps": 1e-6, "rope_base": 1000000.0, "tie_word_embeddings": False,
                  "lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.0},
        "checkpointer": {"_component_": "torchtune.training.FullModelHFCheckpointer", "checkpoint_dir": str(m),
                         "checkpoint_files": ["model.safetensors"], "recipe_checkpoint": None,
                         "output_dir": str(run / "out"), "model_type": "QWEN2"},
        "resume_from_checkpoint": False, "save_adapter_weights_only": True,
        # packed: rows of exactly max_seq_len (the last sample that does not fit starts the next pack; rows padded).
        "dataset": {"_component_": "torchtune.datasets.chat_dataset", "source": "json",
                    "data_files": str(WORK / "data.json"), "conversation_column": "messages",
                    "conversation_style": "openai", "train_on_input": False, "packed": True, "split": "train"},
        "seed": 0, "shuffle": True, "batch_size": 1,
        "optimizer": {"_component_": "torch.optim.AdamW", "lr": LR, "weight_decay": 0.0, "fused": False},
        "lr_scheduler": {"_component_": "torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup",
                         "num_warmup_steps": 0},
        "loss": {"_component_": "torchtune.modules.loss.CEWithChunkedOutputLoss"},
        "epochs": epochs, "max_steps_per_epoch": None, "gradient_accumulation_steps": 1, "clip_grad_norm": None,
        "compile": False, "device": "cpu", "dtype": PRECISION, "enable_activation_checkpointing": False,
        "enable_activation_offloading": False,
        "metric_logger": {"_component_": "torchtune.training.metric_logging.StdoutLogger"},
        "log_every_n_steps": 1, "log_peak_memory_stats": False,
        "profiler": {"_component_": "torchtune.training.setup_torch_profiler", "enabled": False},
    }
    path = run / "lora.yaml"
    path.write_text(_yaml(cfg))
    return [str(VENVS / "torchtune" / "bin" / "tune"), "run", "lora_finetune_single_device", "--config", str(path)], \
        {}, "torchtune"


def axolotl_cmd(run: Path, epochs: int, batch: int) -> tuple[list[str], dict, str]:
    cfg = {
        "base_model": str(WORK / "model"), "tokenizer_type": "AutoTokenizer",
        "datasets": [{"path": str(WORK / "data.jsonl"), "ds_type": "json", "type": "chat_template",
                      "field_messages": "messages", "chat_template": "tokenizer_default",
                      "roles_to_train": ["assistant"]}],
        "dataset_prepared_path": str(run / "prepared"), "val_set_size": 0, "output_dir": str(run / "out"),
        "sequence_len": MAX_LEN, "sample_packing": True, "pad_to_sequence_len": False,
        "adapter": "lora", "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "lora_target_linear": True,
        "gradient_accumulation_steps": 1, "micro_batch_size": 1, "num_epochs": epochs, "optimizer": "adamw_torch",
        "lr_scheduler": "constant", "learning_rate": LR, "warmup_steps": 0, "weight_decay": 0.0,
        "bf16": PRECISION == "bf16", "fp16": False, "tf32": False, "gradient_checkpointing": False, "flash_attention": False,
        "sdp_attention": True, "logging_steps": 1, "save_strategy": "no", "seed": 0, "dataset_processes": 1,
        # workers forked from a process whose telemetry thread holds a lock deadlocked here; in-process loading.
        "dataloader_num_workers": 0, "dataloader_pin_memory": False,
        # its fused LoRA kernels are Triton/CUDA only (on by default for LoRA: they allocate on "cuda").
        "lora_mlp_kernel": False, "lora_qkv_kernel": False, "lora_o_kernel": False,
    }
    path = run / "axolotl.yaml"
    path.write_text(_yaml(cfg))
    return [str(VENVS / "axolotl" / "bin" / "axolotl"), "train", str(path)], {"CUDA_VISIBLE_DEVICES": "", "AXOLOTL_DO_NOT_TRACK": "1", "DO_NOT_TRACK": "1"}, "hf"  # no telemetry retries


COMMANDS = {"qwen-tune": qwen_tune_cmd, "llamafactory": llamafactory_cmd, "torchtune": torchtune_cmd,
            "axolotl": axolotl_cmd}


# --------------------------------------------------------------------------- the watcher


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    return kids


PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024
CLK_TCK = os.sysconf("SC_CLK_TCK")


def tree_usage(root: int) -> tuple[int, float]:
    """(RSS in KiB, CPU seconds incl. reaped children) summed over `root` and its live descendants."""
    kids, rss, ticks, todo = _children(), 0, 0, [root]
    while todo:
        pid = todo.pop()
        todo += kids.get(pid, [])
        try:
            f = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        ticks += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])  # utime stime cutime cstime
        rss += int(f[21]) * PAGE_KIB
    return rss, ticks / CLK_TCK


def cpu_at(samples: list[tuple[float, float]], t: float) -> float | None:
    """The tree's CPU seconds at wall time t, interpolated between the watcher's samples."""
    for (t0, c0), (t1, c1) in zip(samples, samples[1:]):
        if t0 <= t <= t1:
            return c0 + (c1 - c0) * ((t - t0) / (t1 - t0) if t1 > t0 else 0.0)
    return None


def parse_lines(lines: list[tuple[float, str]], step_kind: str) -> tuple[list[float], float | None]:
    """(step end times, train loop start or None) from timestamped output lines."""
    step_re = STEP_RE[step_kind]
    steps = [t for t, s in lines if step_re.search(s) and "train_loss" not in s]
    loop = next((t for t, s in lines if LOOP_RE.search(s)), None)
    return steps, loop


def read_log(path: Path) -> list[tuple[float, str]]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        m = re.match(r"\[\s*([\d.]+)\] (.*)", line)
        if m:
            out.append((float(m.group(1)), m.group(2)))
    return out


def first_step_tokens(log: Path) -> int | None:
    """Real tokens of step 1, where the log counts them (qwen-tune, axolotl); None elsewhere."""
    for _, line in read_log(log):
        # qwen-tune: num_input_tokens_seen (packed rows carry no padding); axolotl: tokens/total (non-pad count).
        m = re.search(r"""['"](?:num_input_tokens_seen|tokens/total)['"]\s*:\s*'?(\d+)""", line)
        if m and STEP_RE["hf"].search(line):
            return int(m.group(1))
    return None


def derive(r: dict[str, Any], real_tokens: int) -> dict[str, Any]:
    """The rates, from the step times of a run (re-derivable from its stored log)."""
    for k in ("window_s", "real_tok_per_s", "loop_tok_per_s", "real_tok_per_cpu_s", "timing", "error",
              "window_cpu_s", "window_tok_per_cpu_s", "window_cpu_share", "window_real_tokens"):
        r.pop(k, None)
    steps = r["step_end_times_s"]
    n = r["steps"] = len(steps)
    total = r["real_tokens_trained"] = real_tokens * r["epochs"]
    if r["rc"] == 0 and n >= 2:
        window = steps[-1] - steps[0]
        r["window_s"] = round(window, 3)
        first = r.get("first_step_real_tokens")
        in_window = total - first if first else total * (n - 1) / n
        r["window_real_tokens"] = round(in_window)
        r["real_tok_per_s"] = round(in_window / window, 1)
        if r["loop_start_s"] is not None and r["loop_start_s"] < steps[0] - 1:  # else the banner came with step 1
            r["loop_tok_per_s"] = round(total / (steps[-1] - r["loop_start_s"]), 1)
        r["real_tok_per_cpu_s"] = round(total / r["cpu_s"], 1)
        c0, c1 = (cpu_at(r.get("cpu_samples") or [], t) for t in (steps[0], steps[-1]))
        if c0 is not None and c1 is not None and c1 > c0:
            r["window_cpu_s"] = round(c1 - c0, 2)
            r["window_tok_per_cpu_s"] = round(in_window / (c1 - c0), 1)
            r["window_cpu_share"] = round((c1 - c0) / window, 2)  # CPUs it got: 2.0 = both cores
        r["timing"] = ("per-step log lines: end of step 1 -> end of the last step; tokens in the window: "
                       + ("exact (the log's own count of step 1's real tokens)" if first else
                          "all real tokens x (steps - 1) / steps"))
    elif r["rc"] == 0:
        r["error"] = f"ran, but {n} step log lines were found (need 2+): the step pattern does not match its log"
    else:
        r["error"] = f"exit code {r['rc']}: " + (root_cause(Path(r["log"])) if r.get("log") and Path(r["log"]).exists()
                                                else " | ".join(r["log_tail"][-6:]))
    return r


def root_cause(log: Path) -> str:
    """The last exception line of a failed run, past the launchers' wrappers (accelerate's CalledProcessError)."""
    found = [s.strip() for _, s in read_log(log) if re.match(r"\s*[\w.]+(Error|Exception): ", s)
             and "CalledProcessError" not in s]
    return found[-1] if found else "no exception line in its log"


def watch(cmd: list[str], env: dict, log_path: Path, step_kind: str, cwd: Path) -> dict[str, Any]:
    """Run cmd; timestamp every output line, poll the tree's RSS, collect its rusage."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                    WANDB_DISABLED="true", WANDB_MODE="disabled", HF_DATASETS_OFFLINE="1", **env)
    full_env.pop("PYTHONPATH", None) if "PYTHONPATH" not in env else None
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL, bufsize=0)
    lines: list[tuple[float, str]] = []
    peak = [0]
    done = threading.Event()

    def read() -> None:
        buf = b""
        with log_path.open("w") as log:
            while True:
                chunk = p.stdout.read(4096)
                if not chunk:
                    break
                now = time.perf_counter() - t0
                buf += chunk
                parts = re.split(rb"[\r\n]", buf)
                buf = parts.pop()
                for raw in parts:
                    s = raw.decode("utf-8", "replace")
                    if s.strip():
                        lines.append((now, s))
                        log.write(f"[{now:9.3f}] {s}\n")
                        log.flush()
            if buf.strip():
                s = buf.decode("utf-8", "replace")
                lines.append((time.perf_counter() - t0, s))
                log.write(f"[{time.perf_counter() - t0:9.3f}] {s}\n")

    samples: list[tuple[float, float]] = []

    def poll() -> None:
        while not done.is_set():
            rss, cpu = tree_usage(p.pid)
            if rss:
                peak[0] = max(peak[0], rss)
                samples.append((round(time.perf_counter() - t0, 3), round(cpu, 2)))
            done.wait(0.1)

    reader = threading.Thread(target=read, daemon=True)
    poller = threading.Thread(target=poll, daemon=True)
    reader.start()
    poller.start()
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    done.set()
    reader.join(10)
    poller.join(5)
    p.returncode = os.waitstatus_to_exitcode(status)
    steps, loop = parse_lines(lines, step_kind)
    return {"rc": p.returncode, "wall_s": round(wall, 2), "cpu_s": round(ru.ru_utime + ru.ru_stime, 2),
            "user_s": round(ru.ru_utime, 2), "sys_s": round(ru.ru_stime, 2),
            "ru_maxrss_gib": round(ru.ru_maxrss / 2**20, 3), "peak_tree_rss_gib": round(peak[0] / 2**20, 3),
            "step_end_times_s": [round(t, 3) for t in steps], "loop_start_s": loop,
            "load_before": [round(x, 2) for x in load0], "load_after": [round(x, 2) for x in os.getloadavg()],
            "log": str(log_path), "log_tail": [s for _, s in lines[-15:]], "cpu_samples": samples}


def run_tool(tool: str, epochs: int, batch: int, real_tokens: int, variant: str = "",
             overrides: list[str] = (), extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    name = f"{tool}+{variant}" if variant else tool
    run = RUNS / name
    if run.exists():
        shutil.rmtree(run)
    run.mkdir(parents=True)
    cmd, env, kind = COMMANDS[tool](run, epochs, batch)
    if tool in PEERS:  # its venv first on PATH: axolotl re-launches itself through `accelerate launch` -> python
        env = dict(env, PATH=f"{VENVS / tool / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
                   VIRTUAL_ENV=str(VENVS / tool))
    if THREADS:
        env = dict(env, OMP_NUM_THREADS=str(THREADS))
    cmd = cmd + list(overrides)  # qwen-tune: key=value recipe overrides
    env = dict(env, **(extra_env or {}))
    print(f"[{tool}] {' '.join(cmd)}", flush=True)
    r = watch(cmd, env, run / "train.log", kind, run)
    r.update(tool=tool, command=cmd, epochs=epochs, step_kind=kind, variant=variant, extra_env=extra_env or {})
    if tool == "qwen-tune":
        r["qwen_tune_batch_size"] = batch
        summ = run / "out" / "train_summary.json"
        if summ.exists():
            r["own_summary"] = json.loads(summ.read_text())
    r["first_step_real_tokens"] = first_step_tokens(run / "train.log")
    derive(r, real_tokens)
    status = install_status(tool) if tool in PEERS else None
    if status:
        r["versions"] = status.get("versions")
    else:
        r["versions"] = _own_versions()
    (RUNS / f"{name}.json").write_text(json.dumps(r, indent=1))
    return r


def _own_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0]}
    for p in ("qwen-tune", "torch", "transformers", "peft", "accelerate"):
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            pass
    return out


# --------------------------------------------------------------------------- report


def report(inputs: dict[str, Any]) -> None:
    runs: dict[str, dict] = {}
    for tool in TOOLS:
        p = RUNS / f"{tool}.json"
        if p.exists():
            runs[tool] = r = json.loads(p.read_text())
            if r.get("log") and Path(r["log"]).exists() and "epochs" in r:  # re-derive with the current parser
                kind = r.get("step_kind", "torchtune" if tool == "torchtune" else "hf")
                r["first_step_real_tokens"] = first_step_tokens(Path(r["log"]))
                r["step_end_times_s"], r["loop_start_s"] = parse_lines(read_log(Path(r["log"])), kind)
                derive(r, inputs["real_tokens"])
        elif tool in PEERS and (st := install_status(tool)) and not st.get("ok"):
            runs[tool] = {"tool": tool, "error": f"install failed at `{st.get('failed_step')}`",
                          "install_log_tail": st.get("log_tail")}
    ok = {t: r for t, r in runs.items() if "real_tok_per_s" in r}
    peers_ok = {t: r for t, r in ok.items() if t != "qwen-tune"}
    best = max(peers_ok, key=lambda t: peers_ok[t]["real_tok_per_s"]) if peers_ok else None
    best_cpu = max(peers_ok, key=lambda t: peers_ok[t].get("window_tok_per_cpu_s", 0)) if peers_ok else None
    leanest = min(peers_ok, key=lambda t: peers_ok[t]["peak_tree_rss_gib"]) if peers_ok else None
    rows = []
    for tool in TOOLS:
        r = runs.get(tool)
        if r is None:
            continue
        if "real_tok_per_s" not in r:
            rows.append([LABELS[tool], "failed"] + [""] * 9)
            continue
        row = [LABELS[tool], r["real_tok_per_s"], r.get("window_tok_per_cpu_s", ""), r.get("window_cpu_share", ""),
               r.get("loop_tok_per_s", ""), r["real_tok_per_cpu_s"], r["peak_tree_rss_gib"], r["ru_maxrss_gib"],
               r["steps"], r["wall_s"]]
        if best is None:  # no peer measured (yet): the row without ratios
            rows.append(row + [""])
            continue
        r["speed_vs_best_peer"] = round(r["real_tok_per_s"] / ok[best]["real_tok_per_s"], 2)
        if r.get("window_tok_per_cpu_s") and ok[best_cpu].get("window_tok_per_cpu_s"):
            r["cpu_speed_vs_best_peer"] = round(r["window_tok_per_cpu_s"] / ok[best_cpu]["window_tok_per_cpu_s"], 2)
        r["memory_vs_leanest_peer"] = round(r["peak_tree_rss_gib"] / ok[leanest]["peak_tree_rss_gib"], 2)
        rows.append(row + [f"{r['speed_vs_best_peer']:.2f}x / {r.get('cpu_speed_vs_best_peer', float('nan')):.2f}x / "
                           f"{r['memory_vs_leanest_peer']:.2f}x"])
    headers = ["toolkit", "real tok/s", "tok/CPU-s (window)", "CPUs used", "loop tok/s", "tok/CPU-s (whole run)",
               "peak RSS tree GiB", "ru_maxrss GiB", "steps", "process wall s",
               "vs best peer: speed / CPU efficiency / memory vs leanest"]
    text, md = table(headers, rows)
    print(text)
    variants = {p.stem: json.loads(p.read_text()) for p in sorted(RUNS.glob("qwen-tune+*.json"))}
    vrows = []
    for name, r in variants.items():
        if r.get("log") and Path(r["log"]).exists():
            r["step_end_times_s"], r["loop_start_s"] = parse_lines(read_log(Path(r["log"])), "hf")
            r["first_step_real_tokens"] = first_step_tokens(Path(r["log"]))
        derive(r, inputs["real_tokens"])
        if "real_tok_per_s" in r:
            knobs = " ".join([*(c for c in r["command"] if "=" in c and not c.startswith("/")),
                              *(f"{k}={v}" for k, v in r.get("extra_env", {}).items())])
            vrows.append([name, knobs, r["real_tok_per_s"], r["real_tok_per_cpu_s"], r["peak_tree_rss_gib"],
                          r["steps"]])
    vmd = table(["run", "settings", "real tok/s", "tok/CPU-s", "peak RSS tree GiB", "steps"], vrows)[1] if vrows else ""
    verdict = ""
    if "qwen-tune" in ok and best:
        q = ok["qwen-tune"]
        verdict = (f"qwen-tune: {q['speed_vs_best_peer']:.2f}x the best peer's real tokens/s ({LABELS[best]}), "
                   f"{q.get('cpu_speed_vs_best_peer', float('nan')):.2f}x the best peer's tokens per CPU-second in the "
                   f"window ({LABELS[best_cpu]}); target >= {TARGETS['speed_vs_best_peer']}x. Peak RSS "
                   f"{q['memory_vs_leanest_peer']:.2f}x the leanest peer's ({LABELS[leanest]}); target <= "
                   f"{TARGETS['memory_vs_leanest_peer']}x.")
        print(verdict)
    loads = {t: (r.get("load_before"), r.get("load_after")) for t, r in runs.items()}
    failures = [f"- **{LABELS[t]}**: {r['error']}" for t, r in runs.items() if "real_tok_per_s" not in r]
    versions = [f"- {LABELS[t]}: " + ", ".join(f"{k} {v}" for k, v in (r.get("versions") or {}).items())
                for t, r in runs.items()]
    mdtext = "\n".join([
        "# Peers: qwen-tune vs LLaMA-Factory, torchtune, axolotl (bench/bench_peers.py)", "",
        f"{cpu_model()}, {os.cpu_count()} cores; shared machine (load average 1/5/15 min before -> after each run: "
        + "; ".join(f"{LABELS[t]} {a} -> {b}" for t, (a, b) in loads.items()) + ").", "",
        f"Tiny random Qwen2 (hidden 256, 4 layers, real 151,936 vocab), LoRA r8 alpha 16 dropout 0 on all linears, "
        f"{inputs['conversations']} conversations ({inputs['real_tokens']:,} real tokens, longest {inputs['max_len']}) "
        f"x {next(iter(runs.values()), {}).get('epochs', '?')} epochs, max_len {MAX_LEN}, packing on, {PRECISION} on CPU, "
        "each toolkit's own CLI in its own process.", "",
        md, "",
        "- **real tok/s**: real (non-pad) tokens over the window from the end of step 1 to the end of the last step "
        "(per-step log lines, timestamped as they arrive); tokens in the window: exact where the log counts step 1's "
        "real tokens (qwen-tune's num_input_tokens_seen with no padding, axolotl's tokens/total), else (LLaMA-Factory, "
        "torchtune) all real tokens x (steps-1)/steps.",
        "- **tok/CPU-s (window)**: the same window's real tokens per CPU-second of the process tree (sampled from "
        "/proc every 100 ms); **CPUs used**: window CPU-seconds / window wall seconds (2.0 = both cores). On a shared "
        "machine this is the steadier speed figure: wall tok/s scales with the CPU share each run happened to get.",
        *([f"- **OMP_NUM_THREADS={THREADS} forced on every toolkit in this table.**"] if THREADS else []),
        "- **threads**: torch's default of one per core (2) everywhere except axolotl, whose `axolotl train` re-launches "
        "itself through `accelerate launch`, which sets OMP_NUM_THREADS=1 on a CPU-only machine; on this oversubscribed "
        "box one thread is the faster setting (no waiting at the two threads' barriers), see the qwen-tune variants.",
        "- **loop tok/s**: all real tokens over the train loop from its first progress line (warm-up step included).",
        "- **tok/CPU-s**: all real tokens per CPU-second of the whole process tree, setup included.",
        "- **peak RSS tree**: largest sum of VmRSS over the process tree (polled every 100 ms); ru_maxrss: largest "
        "single process.", "",
        verdict, "",
        *(["## Not measured", "", *failures, ""] if failures else []),
        *(["## qwen-tune variants (same data and settings, one knob changed)", "", vmd, ""] if vmd else []),
        "## Versions", "", *versions,
    ])
    def slim(r: dict) -> dict:  # the 100 ms CPU samples stay in the run's own file
        return {k: v for k, v in r.items() if k != "cpu_samples"}

    runs = {t: slim(r) for t, r in runs.items()}
    variants = {t: slim(r) for t, r in variants.items()}
    payload = {"inputs": {k: v for k, v in inputs.items() if k != "ids"}, "targets": TARGETS, "best_peer": best,
               "best_peer_cpu": best_cpu,
               "leanest_peer": leanest, "runs": runs, "qwen_tune_variants": variants, "cpu": cpu_model(), "cores": os.cpu_count()}
    payload["omp_num_threads_forced"] = THREADS or None
    payload["precision"] = PRECISION
    name = (f"peers_{THREADS}thread" if THREADS else "peers") + ("" if PRECISION == "fp32" else f"_{PRECISION}")
    j, m = write_results(name, payload, mdtext)
    print(f"wrote {j} and {m}")


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", choices=TOOLS, default=TOOLS)
    ap.add_argument("--skip-install", action="store_true", help="never install; a missing venv is reported")
    ap.add_argument("--reinstall", action="store_true", help="rebuild the venvs of --only")
    ap.add_argument("--report", action="store_true", help="only rebuild the results from stored runs")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--qwen-batch", type=int, default=4,
                    help="qwen-tune's samples per packed row (the peers pack up to max_len: ~5 of these per row)")
    ap.add_argument("--variant", default="", help="qwen-tune only: store the run as qwen-tune+NAME (a side table)")
    ap.add_argument("--qwen-override", nargs="*", default=[], help="qwen-tune recipe overrides, key=value")
    ap.add_argument("--qwen-env", nargs="*", default=[], help="qwen-tune environment, NAME=value")
    ap.add_argument("--threads", type=int, default=0,
                    help="OMP_NUM_THREADS for every toolkit (0 = each one's default); runs and results kept apart")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="every toolkit's compute dtype (bf16: each one's bf16 switch); runs and results kept apart")
    ap.add_argument("--prepare-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.prepare_only:  # in a child, so this process never imports torch (vfork inflates ru_maxrss)
        from peers_data import prepare

        prepare(WORK)
        return 0
    global RUNS, THREADS, PRECISION
    if args.threads:
        RUNS, THREADS = WORK / f"runs_{args.threads}thread", args.threads
    if args.precision != "fp32":
        RUNS, PRECISION = RUNS.with_name(f"{RUNS.name}_{args.precision}"), args.precision
    inputs_path = WORK / "inputs.json"
    if not inputs_path.exists():
        subprocess.run([sys.executable, __file__, "--prepare-only"], check=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    inputs = json.loads(inputs_path.read_text())
    if not args.report:
        for tool in args.only:
            if tool in PEERS:
                st = install_status(tool)
                have = venv_python(tool).exists() and st and st.get("ok")
                if (args.reinstall or not have) and not args.skip_install:
                    print(f"[{tool}] installing into {VENVS / tool} ...", flush=True)
                    st = install(tool)
                if not (st and st.get("ok")):
                    why = (f"install failed at `{st.get('failed_step')}`" if st else "not installed (--skip-install)")
                    (RUNS).mkdir(parents=True, exist_ok=True)
                    (RUNS / f"{tool}.json").write_text(json.dumps(
                        {"tool": tool, "error": why, "install_log_tail": (st or {}).get("log_tail")}, indent=1))
                    print(f"[{tool}] skipped: {why}", flush=True)
                    continue
            if args.variant and tool == "qwen-tune":
                r = run_tool(tool, args.epochs, args.qwen_batch, inputs["real_tokens"], args.variant, args.qwen_override,
                             dict(kv.split("=", 1) for kv in args.qwen_env))
            else:
                r = run_tool(tool, args.epochs, args.qwen_batch, inputs["real_tokens"])
            print(f"[{tool}] rc {r['rc']}, {r.get('real_tok_per_s')} real tok/s, peak tree RSS "
                  f"{r['peak_tree_rss_gib']} GiB, {r['steps']} steps, {r['cpu_s']} CPU-s", flush=True)
    report(inputs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
