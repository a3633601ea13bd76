"""Building random-weight Qwen checkpoints from configs, and the training precision a machine supports.

Qwen-1 goes through the bundled implementation (no remote code); Qwen1.5+ through transformers' native classes.
Loading a checkpoint with its tokenizer (and quantized bases) is :func:`qwen_tune.train.loading.load_model`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from ..config import read_json_object
from ..constants import ENDOFTEXT_ID, IM_END_ID
from . import qwen1  # noqa: F401 - registers model_type "qwen" with the Auto classes
from .qwen1.convert_tokenizer import export_qwen2_tokenizer
from .qwen1.tokenization_qwen import QWenTokenizer

log = logging.getLogger(__name__)


def resolve_precision(precision: str, use_cpu: bool) -> str:
    """bf16 where the hardware has it, fp16 on older GPUs, fp32 on CPU."""
    if precision != "auto":
        return precision
    if use_cpu or not torch.cuda.is_available():
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def cpu_bf16_matmul() -> str | None:
    """The instruction set that gives this CPU native bf16 matmuls (AVX512-BF16, AMX), else None.

    There bf16 GEMMs run ~4x the fp32 ones (one Zen 4 core: ~340 against ~85 GFLOP/s), where an AVX2/AVX512 CPU
    without them emulates bf16 at about fp32 speed. torch asks only through private helpers, hence getattr.
    """
    for name, probe in (("AMX", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported")):
        check = getattr(torch.cpu, probe, None)
        if check is not None and check():
            return name
    return None


def build_from_config(config_file: str | Path, out_dir: str | Path, seed: int = 0) -> Path:
    """Create a random-weight checkpoint (plus the real tokenizer) from a config.json.

    Writing it to disk makes it a base like any other: adapters point at it, merge and chat
    load it. Reused when already there, so a resumed run sees the same base weights.
    """
    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists() and any(out_dir.glob("*.safetensors")):
        return out_dir
    raw = read_json_object(Path(config_file), str(config_file))
    model_type = raw.pop("model_type")
    chat = raw.pop("qwen_tune_is_chat", True)  # whether to write a chat- or base-style generation config
    config = AutoConfig.for_model(model_type, **raw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    model.save_pretrained(tmp)
    if model_type == "qwen":
        QWenTokenizer().save_pretrained(tmp)  # the bundled qwen.tiktoken
    else:
        export_qwen2_tokenizer(tmp)
    _write_generation_config(tmp, model_type, chat)
    tmp.rename(out_dir)
    log.info("built a random-weight %s model (%s params) at %s", model_type, f"{model.num_parameters():,}", out_dir)
    return out_dir


def _write_generation_config(path: Path, model_type: str, chat: bool) -> None:
    # A chat checkpoint stops on <|im_end|>; a base one only on <|endoftext|>.
    gen = {"eos_token_id": [IM_END_ID, ENDOFTEXT_ID] if chat else ENDOFTEXT_ID, "pad_token_id": ENDOFTEXT_ID,
           "do_sample": False, "max_new_tokens": 64}
    if model_type == "qwen":
        gen["chat_format"] = "chatml" if chat else "raw"
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2))
