"""qwen-tune: fine-tune Qwen chat models (full, LoRA, Q-LoRA) with a ChatML data pipeline."""

__version__ = "0.1.0"
