"""Registration of model_type "qwen" with the transformers Auto classes, one Auto module at a time.

Each function needs only its own Auto module, so the hook in ``qwen_tune/__init__.py`` can register the config
and tokenizer as soon as their Auto modules load, and the model classes (which import torch) only once the user
imports ``AutoModel*``.
"""

from __future__ import annotations


def register_config() -> None:
    from transformers.models.auto.configuration_auto import AutoConfig

    from .configuration_qwen import QWenConfig

    AutoConfig.register("qwen", QWenConfig, exist_ok=True)


def register_tokenizer() -> None:
    from transformers.models.auto.tokenization_auto import AutoTokenizer

    from .configuration_qwen import QWenConfig
    from .tokenization_qwen import QWenTokenizer

    AutoTokenizer.register(QWenConfig, slow_tokenizer_class=QWenTokenizer, exist_ok=True)


def register_models() -> None:
    import sys

    # modeling_qwen's own imports can load transformers' modeling_auto while it is half-initialized: the hook
    # skips then, and modeling_qwen registers its classes at its end.
    modeling = sys.modules.get(f"{__package__}.modeling_qwen")
    if modeling is not None and getattr(modeling.__spec__, "_initializing", False):
        return
    from .modeling_qwen import register_with_auto

    register_with_auto()


def register_all() -> None:
    register_config()
    register_tokenizer()
    register_models()


#: The transformers module whose import triggers each registration (see ``qwen_tune/__init__.py``).
TRIGGERS = {
    "transformers.models.auto.configuration_auto": register_config,
    "transformers.models.auto.tokenization_auto": register_tokenizer,
    "transformers.models.auto.modeling_auto": register_models,
}
