"""What the estimate reads from the recipe and the checkpoint: config.json, the engine (precision and ZeRO/FSDP
sharding), whether the base is a chat model, which quantization Q-LoRA uses."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..checkpoint import detect_is_chat
from ..config import Recipe, read_json_object
from ..constants import DTYPE_BYTES
from ..train.distributed import read_ds_config
from ..train.precision import autocast_master_weights, load_dtype
from .presets import MODEL_PRESETS, preset_config, preset_key


def num(v: Any, auto: float) -> float:
    """A DeepSpeed number that may be "auto" (then ``auto``)."""
    return auto if v in (None, "auto") else float(v)


def load_model_config(recipe: Recipe) -> dict[str, Any]:
    """config.json of model.from_config / model.path (a local directory, or a hub id whose config.json is
    already in the local HF cache; nothing is downloaded). Never touches weights."""
    if recipe.model.from_config:
        path: Optional[Path] = Path(recipe.model.from_config)
    else:
        local = Path(recipe.model.path or "")
        path = local / "config.json" if local.is_dir() else None
        if path is None and recipe.model.path and recipe.model.path.count("/") == 1 and not local.exists():
            try:
                from huggingface_hub import hf_hub_download

                path = Path(hf_hub_download(recipe.model.path, "config.json", local_files_only=True))
            except Exception:  # noqa: BLE001 - not cached, or no hub client: explained below
                path = None
    if path is None or not path.is_file():
        # A published model by name (Qwen/Qwen2.5-7B-Instruct, qwen3-8b): its config facts, nothing downloaded.
        preset = preset_config(recipe.model.path or "") if not recipe.model.from_config else None
        if preset is not None:
            return {**preset, "qwen_tune_preset": preset_key(recipe.model.path or "")}
        raise FileNotFoundError(f"no config.json for model {recipe.model.from_config or recipe.model.path!r}: set "
                                "model.path to a local checkpoint directory or a published model's name, or pass "
                                f"--config path/to/config.json (presets: {', '.join(MODEL_PRESETS)})")
    return read_json_object(path, str(path))


def is_chat(recipe: Recipe, cfg: dict[str, Any]) -> bool:
    if recipe.model.is_chat is not None:
        return recipe.model.is_chat
    if "qwen_tune_is_chat" in cfg:
        return bool(cfg["qwen_tune_is_chat"])
    if recipe.model.path and (Path(recipe.model.path) / "config.json").is_file():
        return detect_is_chat(recipe.model.path)
    name = (recipe.model.path or "").lower()
    # Qwen3's post-trained checkpoints carry no suffix (Qwen3-8B; the base model is Qwen3-8B-Base).
    qwen3_chat = "qwen3" in name and "base" not in name
    return "chat" in name or "instruct" in name or qwen3_chat or not name


def quant_method(recipe: Recipe, cfg: dict[str, Any]) -> str:
    if recipe.method != "qlora":
        return "none"
    if recipe.quantization.method != "none":
        return recipe.quantization.method
    q = cfg.get("quantization_config") or {}
    return "gptq" if q.get("quant_method") == "gptq" else "nf4"


@dataclass
class Engine:
    """Precision and sharding: what every byte count below depends on."""

    precision: str
    b: int  # compute dtype bytes
    half: bool
    weight_dtype: str
    p: int  # bytes per stored weight
    ds: dict[str, Any]
    zo: dict[str, Any]
    stage: Optional[int]
    fsdp: str
    stage_like: int
    off_opt: bool
    off_par: bool
    d: int
    shard_opt: int
    shard_grad: int
    shard_par: int
    mixed: bool  # DeepSpeed: 16-bit module + fp32 master weights and Adam states
    autocast: bool  # HF Trainer without DeepSpeed trains under torch.autocast


def engine(recipe: Recipe, gpus: int, notes: list[str]) -> Engine:
    t = recipe.training
    if t.precision == "auto":
        precision = "fp32" if t.use_cpu else "bf16"
        notes.append("training.precision=auto taken as " + ("fp32 (use_cpu)" if t.use_cpu else
                     "bf16 (an Ampere or newer GPU; older GPUs train in fp16: same estimate)"))
    else:
        precision = t.precision
    b = DTYPE_BYTES[precision]
    half = b == 2
    # As training loads it: full fine-tuning under 16-bit autocast keeps fp32 master weights (train/precision.py).
    # SFT keeps fp32 master weights under 16-bit autocast (train/precision.py); the DPO runner loads the policy
    # (and TRL's reference copy of it) in the training precision.
    master = recipe.stage != "dpo" and autocast_master_weights(precision, recipe.deepspeed, t.use_cpu)
    weight_dtype = load_dtype(recipe.method, recipe.model.dtype, precision, master)
    p = DTYPE_BYTES[weight_dtype]
    ds = read_ds_config(recipe.deepspeed) if recipe.deepspeed else {}
    zo = ds.get("zero_optimization", {}) if ds else {}
    stage: Optional[int] = int(zo.get("stage", 0)) if ds else None
    fsdp = (recipe.fsdp or "").lower()
    if fsdp and stage is None:
        stage_like = 3 if ("full_shard" in fsdp or "hybrid_shard" in fsdp) else 2 if "shard_grad_op" in fsdp else 0
        notes.append(f"FSDP ({recipe.fsdp}) approximated as ZeRO-{stage_like}-like sharding in the parameters' own "
                     "dtype (no fp32 master copy)")
    else:
        stage_like = stage if stage is not None else 0
    off_opt = str((zo.get("offload_optimizer") or {}).get("device", "none")) == "cpu"
    off_par = str((zo.get("offload_param") or {}).get("device", "none")) == "cpu"
    d = gpus
    mixed = bool(ds) and half
    if mixed:
        p = b  # the DeepSpeed engine casts the module to its bf16/fp16 setting
    return Engine(precision, b, half, weight_dtype, p, ds, zo, stage, fsdp, stage_like, off_opt, off_par, d,
                   shard_opt=d if stage_like >= 1 else 1, shard_grad=d if stage_like >= 2 else 1,
                   shard_par=d if stage_like >= 3 else 1, mixed=mixed, autocast=half and not ds)
