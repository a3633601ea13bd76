"""Up-front checks of method x engine combinations, the recipe's `fsdp` key, and DeepSpeed on CPU (gloo)."""

from __future__ import annotations

import logging
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ..config import ConfigError, Recipe, read_json_object

log = logging.getLogger(__name__)
# The `fsdp:` recipe key: words of transformers' FSDPOption that FSDP2 (transformers' default) supports.
FSDP_SHARDING = {"full_shard": True, "shard_grad_op": False}  # -> fsdp_config reshard_after_forward
FSDP_WORDS = set(FSDP_SHARDING) | {"offload", "auto_wrap"}
FSDP1_ONLY = {"hybrid_shard", "hybrid_shard_zero2", "no_shard"}
_warned: set[str] = set()


def read_ds_config(ds_config: str) -> dict[str, Any]:
    path = Path(ds_config)
    if not path.is_file():
        raise ConfigError(f"deepspeed: config file {ds_config} not found (bundled: ds_configs/zero2.json, "
                          "ds_configs/zero3.json, ds_configs/zero3_offload.json)")
    return read_json_object(path, f"deepspeed: {ds_config}")


def zero_stage(ds_config: str | None) -> int | None:
    if not ds_config:
        return None
    return int(read_ds_config(ds_config).get("zero_optimization", {}).get("stage", 0))


def fsdp_arguments(fsdp: str | None) -> dict[str, Any]:
    """TrainingArguments kwargs for the recipe's `fsdp` words (e.g. "full_shard auto_wrap"), FSDP2 style.

    transformers deprecates the string form of `fsdp`; the same meaning goes through `fsdp_config` instead.
    """
    if not fsdp:
        return {"fsdp": False}
    words = fsdp.replace(",", " ").split()
    config: dict[str, Any] = {}
    for w in words:
        if w in FSDP_SHARDING:
            config["reshard_after_forward"] = FSDP_SHARDING[w]
        elif w == "offload":
            config["cpu_offload"] = True
    return {"fsdp": True, "fsdp_config": config}


def _check_fsdp(fsdp: str) -> None:
    words = fsdp.replace(",", " ").split()
    old = [w for w in words if w in FSDP1_ONLY]
    if old:
        raise ConfigError(f"fsdp: {', '.join(old)} only exists in FSDP1, which transformers has deprecated: use "
                          "`full_shard` (ZeRO-3 like) or `shard_grad_op` (ZeRO-2 like), e.g. 'full_shard auto_wrap'")
    bad = [w for w in words if w not in FSDP_WORDS]
    if bad:
        raise ConfigError(f"fsdp: unknown option(s) {', '.join(bad)}; use words from: {', '.join(sorted(FSDP_WORDS))} "
                          "(e.g. fsdp='full_shard auto_wrap')")
    if len([w for w in words if w in FSDP_SHARDING]) > 1:
        raise ConfigError("fsdp: choose one of full_shard / shard_grad_op")


def check_combination(recipe: Recipe, trainable_embeddings: bool = False) -> None:
    """Refuse combinations that cannot work, and say what does."""
    stage = zero_stage(recipe.deepspeed)
    if recipe.deepspeed and recipe.fsdp:
        raise ConfigError("choose one engine: `deepspeed` or `fsdp`, not both")
    if recipe.fsdp:
        _check_fsdp(recipe.fsdp)
    if recipe.deepspeed:
        _check_ds_config(recipe, read_ds_config(recipe.deepspeed))
    if recipe.method == "qlora" and stage == 3:
        raise ConfigError("Q-LoRA cannot run under ZeRO-3 (4-bit weights cannot be partitioned): "
                          "use ds_configs/zero2.json, or plain LoRA with ZeRO-3")
    if recipe.method == "qlora" and recipe.fsdp:
        raise ConfigError("Q-LoRA is not supported with FSDP here: use DeepSpeed ZeRO-2 (ds_configs/zero2.json)")
    if trainable_embeddings and stage == 3:
        raise ConfigError("LoRA with trainable embeddings/lm_head (modules_to_save) is not supported under ZeRO-3: "
                          "use ds_configs/zero2.json, or set lora.trainable_embeddings=false on a chat model")


def _check_ds_config(recipe: Recipe, cfg: dict[str, Any]) -> None:
    """DeepSpeed values that must agree with the recipe: "auto" lets the recipe fill them in."""
    fixed = {"train_micro_batch_size_per_gpu": recipe.training.batch_size,
             "gradient_accumulation_steps": recipe.training.grad_accum,
             "gradient_clipping": recipe.training.max_grad_norm}
    for key, want in fixed.items():
        got = cfg.get(key, "auto")
        if got != "auto" and got != want:
            raise ConfigError(f"deepspeed: {recipe.deepspeed} sets {key}={got} but the recipe says {want}: "
                              f'set "{key}": "auto" in the DeepSpeed config so the recipe decides')
    if "scheduler" in cfg and recipe.deepspeed not in _warned:
        _warned.add(recipe.deepspeed)
        log.warning("deepspeed: %s has a `scheduler` block, so DeepSpeed's schedule replaces the recipe's "
                    "training.scheduler=%s / warmup_ratio", recipe.deepspeed, recipe.training.scheduler)


@contextmanager
def zero3_init_disabled() -> Iterator[None]:
    """Build a model as a plain, whole module even while ZeRO-3 is configured.

    Once TrainingArguments hold a ZeRO-3 config, transformers creates every model inside deepspeed.zero.Init
    (partitioned across ranks, with collectives on creation): right for the model being trained, wrong for a
    random base model that rank 0 alone builds and saves (that deadlocks, or saves empty tensors).
    """
    try:
        from transformers.integrations import deepspeed as hf_ds
    except ImportError:  # pragma: no cover - transformers always ships it
        yield
        return
    saved = getattr(hf_ds, "_hf_deepspeed_config_weak_ref", None)
    hf_ds.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


def quiet_non_main_ranks() -> None:
    """qwen-tune's own INFO lines once per run, from global rank 0; warnings still come from every rank."""
    if int(os.environ.get("RANK", "0")) != 0:
        logging.getLogger("qwen_tune").setLevel(logging.WARNING)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_group_env() -> None:
    """DeepSpeed run as one plain process (no launcher): describe a 1-process group in the environment.

    Without RANK/WORLD_SIZE, deepspeed.init_distributed falls back to MPI discovery (an mpi4py traceback where
    mpi4py is missing); with them it joins env:// as rank 0 of 1. A free port keeps two such jobs apart.
    """
    if any(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        return  # a launcher set the group up
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"),
                      MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())))


def init_distributed_for_cpu() -> None:
    """DeepSpeed on CPU needs a gloo process group before the model exists (ZeRO-3's zero.Init reads it)."""
    if "RANK" not in os.environ:
        return
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo")


def close_process_group() -> None:
    """Tear the process group down before the interpreter does, after a run every rank finished.

    Left to interpreter exit, gloo's worker threads can still own tensors when Python is half torn down, and a
    rank dies with SIGABRT ("terminate called without an active exception") after a successful run, which the
    launcher reports as a failure. Not called after an error: a rank still inside a collective would hang it.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
