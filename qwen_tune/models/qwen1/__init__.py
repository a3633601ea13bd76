"""Bundled Qwen-1 architecture and tokenizer (laid out as transformers lays out a model folder).

The classes load on first use (``from qwen_tune.models.qwen1 import QWenLMHeadModel`` works as before): the
tokenizer alone must not pull in torch, which the modeling code and transformers' config classes do. Registration
with the transformers Auto classes happens as soon as those are imported, for any ``import qwen_tune`` (the hook
in ``qwen_tune/__init__.py`` calls :mod:`.auto_register`); :func:`register` does it now.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "QWenConfig": "configuration_qwen",
    "QWenModel": "modeling_qwen",
    "QWenLMHeadModel": "modeling_qwen",
    "QWenPreTrainedModel": "modeling_qwen",
    "QWenTokenizer": "tokenization_qwen",
}


def register() -> None:
    """Register model_type "qwen" with AutoConfig / AutoModel / AutoModelForCausalLM / AutoTokenizer. Idempotent.

    Registered (local) classes take precedence over a checkpoint's ``auto_map``: without ``trust_remote_code``,
    ``AutoModelForCausalLM.from_pretrained`` on an original Qwen-1 checkpoint builds the bundled classes.
    """
    from .auto_register import register_all

    register_all()


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["QWenConfig", "QWenModel", "QWenLMHeadModel", "QWenPreTrainedModel", "QWenTokenizer", "register"]
