"""Training memory estimate from a recipe and a config.json, calibrated against Qwen's published numbers.

* :mod:`.shape` -- parameter counts and per-layer linears of every Qwen family, from config.json;
* :mod:`.activations` -- bytes saved for backward, by part;
* :mod:`.estimator` -- :func:`estimate_memory`: weights, gradients, optimizer states, logits, overhead, peak;
* :mod:`.render` -- :class:`MemoryEstimate` and its table;
* :mod:`.presets` -- config facts of the published Qwen2.5 / Qwen3 models, by name;
* :mod:`.tables` -- Qwen-1 presets and the README's published table; :mod:`.calibration` compares the two.
"""

from .calibration import reference_comparison
from .estimator import GB, LOSS_PEAK_FACTOR, estimate_memory
from .inputs import load_model_config
from .presets import MODEL_PRESETS, preset_config, preset_key
from .render import MemoryEstimate
from .shape import ModelShape
from .tables import QWEN1_PRESETS, QWEN1_PUBLISHED, reference_recipe

__all__ = ["GB", "LOSS_PEAK_FACTOR", "MODEL_PRESETS", "MemoryEstimate", "ModelShape", "QWEN1_PRESETS", "QWEN1_PUBLISHED",
           "estimate_memory", "load_model_config", "preset_config", "preset_key", "reference_comparison", "reference_recipe"]
