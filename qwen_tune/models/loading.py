"""Loading Qwen checkpoints (any family) and building random-weight models from configs.

Qwen-1 goes through the bundled implementation (no remote code); Qwen1.5+ through
transformers' native classes.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from . import qwen1  # noqa: F401 - registers model_type "qwen" with the Auto classes
from .families import Family, get_family, read_model_type

log = logging.getLogger(__name__)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: Any
    family: Family
    path: Path  # a directory holding the base checkpoint (created for from_config models)
    is_chat: bool


def resolve_precision(precision: str, use_cpu: bool) -> str:
    """bf16 where the hardware has it, fp16 on older GPUs, fp32 on CPU."""
    if precision != "auto":
        return precision
    if use_cpu or not torch.cuda.is_available():
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def build_from_config(config_file: str | Path, out_dir: str | Path, seed: int = 0) -> Path:
    """Create a random-weight checkpoint (plus the real tokenizer) from a config.json.

    Writing it to disk makes it a base like any other: adapters point at it, merge and chat
    load it. Reused when already there, so a resumed run sees the same base weights.
    """
    from ..data.tokenizer import export_qwen2_tokenizer, load_tokenizer

    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists() and any(out_dir.glob("*.safetensors")):
        return out_dir
    raw = json.loads(Path(config_file).read_text())
    model_type = raw.pop("model_type")
    chat = raw.pop("qwen_tune_is_chat", True)  # whether to write a chat- or base-style generation config
    config = AutoConfig.for_model(model_type, **raw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    model.save_pretrained(tmp)
    if model_type == "qwen":
        load_tokenizer(None).save_pretrained(tmp)
    else:
        export_qwen2_tokenizer(tmp)
    _write_generation_config(tmp, model_type, chat)
    tmp.rename(out_dir)
    log.info("built a random-weight %s model (%s params) at %s", model_type, f"{model.num_parameters():,}", out_dir)
    return out_dir


def _write_generation_config(path: Path, model_type: str, chat: bool) -> None:
    from ..data.tokenizer import ENDOFTEXT_ID, IM_END_ID

    # A chat checkpoint stops on <|im_end|>; a base one only on <|endoftext|>.
    gen = {"eos_token_id": [IM_END_ID, ENDOFTEXT_ID] if chat else ENDOFTEXT_ID, "pad_token_id": ENDOFTEXT_ID,
           "do_sample": False, "max_new_tokens": 64}
    if model_type == "qwen":
        gen["chat_format"] = "chatml" if chat else "raw"
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2))


def detect_is_chat(path: str | Path) -> bool:
    """Whether a checkpoint was chat-tuned (its ChatML tokens trained), read from the checkpoint.

    Qwen-1 states it (`chat_format` chatml vs raw); Qwen1.5+ chat models stop on <|im_end|>
    while base models stop only on <|endoftext|>.
    """
    from ..data.tokenizer import IM_END_ID

    gen_file = Path(path) / "generation_config.json"
    if not gen_file.exists():
        log.info("%s has no generation_config.json; assuming a chat model", path)
        return True
    gen = json.loads(gen_file.read_text())
    if "chat_format" in gen:
        return gen["chat_format"] == "chatml"
    eos = gen.get("eos_token_id")
    eos = eos if isinstance(eos, list) else [eos]
    return IM_END_ID in eos


def load_model(path: str | Path, *, dtype: str = "fp32", attn_implementation: str = "sdpa",
               tokenizer_path: str | None = None, is_chat: bool | None = None,
               **from_pretrained_kwargs: Any) -> LoadedModel:
    from ..data.tokenizer import load_tokenizer

    path = Path(path)
    family = get_family(read_model_type(path))
    # GPTQ checkpoints: transformers' integration (optimum + gptqmodel) when installed or asked for through a
    # quantization_config, else qwen-tune's PyTorch dequantizing layers (gptq_backend="torch").
    from .gptq import (GPTQError, config_json_quantization, gptqmodel_available, has_gptq_tensors, load_gptq_model,
                       read_quantization_config)

    backend = from_pretrained_kwargs.pop("gptq_backend", None)
    q = read_quantization_config(path)
    if q is None and has_gptq_tensors(path):  # transformers would load it with randomly initialized linears
        raise GPTQError(f"{path} holds GPTQ tensors (qweight/qzeros/scales) but no quantization config: restore "
                        "config.json's `quantization_config` or `quantize_config.json` from its release")
    if (backend is None and "quantization_config" not in from_pretrained_kwargs and q
            and str(q.get("quant_method", "")).lower() == "gptq"
            and (not gptqmodel_available() or config_json_quantization(path) is None)):
        backend = "torch"  # transformers reads only config.json's quantization_config, and needs gptqmodel
    if backend == "torch":
        model = load_gptq_model(path, dtype=DTYPES[dtype], attn_implementation=attn_implementation)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], attn_implementation=attn_implementation,
                                                     **from_pretrained_kwargs)
    tokenizer = load_tokenizer(tokenizer_path or path)
    chat = detect_is_chat(path) if is_chat is None else is_chat
    return LoadedModel(model, tokenizer, family, path, chat)
