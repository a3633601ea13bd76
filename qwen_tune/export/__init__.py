"""Exporting fine-tuned models: merging LoRA adapters into standalone checkpoints."""

from .merge import MergeResult, MergeVerificationError, dequantized_base, merge_adapter

__all__ = ["MergeResult", "MergeVerificationError", "dequantized_base", "merge_adapter"]
