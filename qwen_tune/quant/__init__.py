"""GPTQ in pure PyTorch and quantized bases for Q-LoRA, one concern per module (peft's tuner layout):

* :mod:`.format` -- the published GPTQ packing (v1/v2 zero points), pack/unpack, dequantize;
* :mod:`.layer` -- :class:`GPTQLinear`, a trainable dequantizing linear over the packed buffers;
* :mod:`.gptq` -- the algorithms (GPTQ, round-to-nearest) for one matrix and for a model's decoder blocks;
* :mod:`.checkpoint` -- GPTQ checkpoints on disk: detect, load, save, dequantize;
* :mod:`.audit` -- what a checkpoint's tensors really hold (zero-point convention, zeros gptqmodel mangles, AutoGPTQ's
  placeholder biases), checked before any backend loads it;
* :mod:`.calibration` -- calibration samples from text or conversations;
* :mod:`.backend` -- how a quantized base loads (gptqmodel or the PyTorch layer; NF4 through bitsandbytes);
* :mod:`.training` -- preparing a loaded quantized model for LoRA, and loading adapters onto it.

The whole ``qwen-tune quantize`` step is :mod:`qwen_tune.export.quantize`.
"""

from .backend import gptq_backend, gptqmodel_available, load_causal_lm, quantization_kwargs
from .checkpoint import dequantize_checkpoint, has_gptq_tensors, load_gptq_model, save_gptq_checkpoint
from .format import (FORMATS, SUPPORTED_BITS, GPTQError, GPTQSpec, dequantize, pack_cols, pack_layer, pack_rows,
                     spec_from_config, unpack_cols, unpack_rows)
from .gptq import gptq_quantize, quantizable_linears, quantize_model, rtn_quantize
from .layer import GPTQLinear
from .training import load_adapter, prepare_loaded_model, register_quantized_lora_layers

__all__ = ["FORMATS", "SUPPORTED_BITS", "GPTQError", "GPTQLinear", "GPTQSpec", "dequantize", "dequantize_checkpoint",
           "gptq_backend", "gptq_quantize", "gptqmodel_available", "has_gptq_tensors", "load_adapter",
           "load_causal_lm", "load_gptq_model", "pack_cols", "pack_layer", "pack_rows", "prepare_loaded_model",
           "quantizable_linears", "quantization_kwargs", "quantize_model", "register_quantized_lora_layers",
           "rtn_quantize", "save_gptq_checkpoint", "spec_from_config", "unpack_cols", "unpack_rows"]
