"""Bundled Qwen-1 architecture and tokenizer (laid out as transformers lays out a model folder). Importing this package registers it with the transformers Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from .configuration_qwen import QWenConfig
from .modeling_qwen import QWenLMHeadModel, QWenModel, QWenPreTrainedModel
from .tokenization_qwen import QWenTokenizer


def register() -> None:
    """Register model_type "qwen" with AutoConfig / AutoModel / AutoModelForCausalLM / AutoTokenizer. Idempotent.

    Registered (local) classes take precedence over a checkpoint's ``auto_map``: without ``trust_remote_code``,
    ``AutoModelForCausalLM.from_pretrained`` on an original Qwen-1 checkpoint builds the bundled classes.
    """
    AutoConfig.register("qwen", QWenConfig, exist_ok=True)
    AutoModel.register(QWenConfig, QWenModel, exist_ok=True)
    AutoModelForCausalLM.register(QWenConfig, QWenLMHeadModel, exist_ok=True)
    AutoTokenizer.register(QWenConfig, slow_tokenizer_class=QWenTokenizer, exist_ok=True)


register()

__all__ = ["QWenConfig", "QWenModel", "QWenLMHeadModel", "QWenPreTrainedModel", "QWenTokenizer", "register"]
