"""Which devices one run may use: several GPUs need one process each (a launcher), never DataParallel."""

from __future__ import annotations

import os

import torch

from ..config import ConfigError


def check_single_process_devices(visible_gpus: int, world_size: int, use_cpu: bool) -> None:
    """Refuse several visible GPUs in a run without a launcher.

    transformers' Trainer then wraps the model in torch DataParallel, which replicates it per GPU and
    splits each batch: the chunked loss's hook on the decoder sees only one replica's hidden states
    (and DataParallel is slower than DDP anyway).
    """
    if use_cpu or world_size > 1 or visible_gpus <= 1:
        return
    raise ConfigError(f"{visible_gpus} GPUs are visible but qwen-tune runs as one process: use --nproc "
                      f"{visible_gpus} (one process per GPU), or CUDA_VISIBLE_DEVICES=0 to train on one GPU")


def check_visible_devices(use_cpu: bool) -> None:
    """`check_single_process_devices` for this process."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    check_single_process_devices(gpus, int(os.environ.get("WORLD_SIZE", "1")), use_cpu)
