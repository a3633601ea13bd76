"""What a finished run reports: the summary (tokens/s over a warm window, peak memory), the engine that really
trained, and the loss curve."""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from .trainer import QwenTrainer


class ThroughputWindow(TrainerCallback):
    """Times training from the end of the first optimizer step of this session to the end of training.

    The first step carries one-time costs (DeepSpeed's op JIT compilation, allocator and kernel warm-up): issue 12
    measured 26 tokens/s reported vs 283 trained on a fresh machine when it was included.
    """

    def __init__(self) -> None:
        self.start: tuple[float, int] | None = None
        self.end: tuple[float, int] | None = None
        self.session_tokens0 = 0  # tokens seen before this session (restored by a resume)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.session_tokens0 = int(state.num_input_tokens_seen or 0)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        mark = (time.perf_counter(), int(state.num_input_tokens_seen or 0))
        if self.start is None:
            self.start = mark
        self.end = mark


def peak_memory_bytes() -> int:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def summarize(trainer: QwenTrainer, result: Any, elapsed: float, trainable: int, total: int,
             window: ThroughputWindow | None = None) -> dict[str, Any]:
    label_tokens = trainer.label_tokens
    seen = int(trainer.state.num_input_tokens_seen or 0)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        t = torch.tensor([label_tokens], device=trainer.args.device)
        torch.distributed.all_reduce(t)
        label_tokens = int(t.item())
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if window and window.start and window.end and window.end[0] > window.start[0]:
        span, tokens = window.end[0] - window.start[0], window.end[1] - window.start[1]
        window_desc = {"from": "end of the first step", "seconds": round(span, 3), "input_tokens": tokens}
    else:
        span, tokens = elapsed, seen - (window.session_tokens0 if window else 0)
        window_desc = {"from": "start (one step only: includes warm-up)", "seconds": round(span, 3),
                       "input_tokens": tokens}
    tokens_per_s = round(tokens / span, 1) if span > 0 else None
    return {
        "steps": trainer.state.global_step,
        "train_loss": result.training_loss,
        "first_logged_loss": losses[0] if losses else None,
        "last_logged_loss": losses[-1] if losses else None,
        "eval_loss": next((h["eval_loss"] for h in reversed(trainer.state.log_history) if "eval_loss" in h), None),
        "input_tokens": seen,  # over the whole run, a resumed one included
        "input_tokens_this_session": seen - (window.session_tokens0 if window else 0),
        "trained_label_tokens_this_session": label_tokens,
        # After the first optimizer step (see ThroughputWindow); the whole session when it ran only one step.
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_window": window_desc,
        "runtime_s": round(elapsed, 2),
        "peak_memory_gb": round(peak_memory_bytes() / 2**30, 3),  # 2^30-based despite the name: kept for scripts
        "peak_memory_gib": round(peak_memory_bytes() / 2**30, 3),
        "trainable_params": trainable,
        "total_params": total,
    }


def engine_info(trainer: QwenTrainer) -> dict[str, Any]:
    """What actually trained: tests and users can check that DeepSpeed/FSDP really ran (not a silent DDP fallback)."""
    engine = trainer.model_wrapped
    stage = None
    if trainer.is_deepspeed_enabled and hasattr(engine, "zero_optimization_stage"):  # a DeepSpeedEngine
        stage = int(engine.zero_optimization_stage())
    import torch.distributed.fsdp as fsdp_mod

    fsdp_types = tuple(t for t in (getattr(fsdp_mod, "FullyShardedDataParallel", None),  # FSDP1
                                   getattr(fsdp_mod, "FSDPModule", None)) if t is not None)  # FSDP2 (fully_shard)
    fsdp = isinstance(engine, fsdp_types) or any(isinstance(m, fsdp_types) for m in engine.modules())
    return {"deepspeed_zero_stage": stage, "fsdp": bool(fsdp), "wrapper": type(engine).__name__,
            "distributed_type": str(trainer.accelerator.distributed_type).rpartition(".")[2],
            "world_size": trainer.accelerator.num_processes}


def plot_loss_curve(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    if not train:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
