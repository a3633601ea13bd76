"""Loading a base checkpoint for training or chat: the model (quantized bases included), its tokenizer, its family
and whether it is a chat model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from ..checkpoint import detect_is_chat
from ..data.tokenizer import load_tokenizer
from ..models.families import Family, get_family, read_model_type
from ..quant.backend import load_causal_lm


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: Any
    family: Family
    path: Path  # a directory holding the base checkpoint (created for from_config models)
    is_chat: bool


def load_model(path: str | Path, *, dtype: str = "fp32", attn_implementation: str = "sdpa",
               tokenizer_path: str | None = None, is_chat: bool | None = None,
               **from_pretrained_kwargs: Any) -> LoadedModel:
    path = Path(path)
    family = get_family(read_model_type(path))
    model = load_causal_lm(path, dtype=dtype, attn_implementation=attn_implementation, **from_pretrained_kwargs)
    tokenizer = load_tokenizer(tokenizer_path or path)
    chat = detect_is_chat(path) if is_chat is None else is_chat
    return LoadedModel(model, tokenizer, family, path, chat)
