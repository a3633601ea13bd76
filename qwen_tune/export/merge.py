"""Merge a LoRA adapter into its base model: a standalone checkpoint that loads wherever the base loaded.

Steps (:func:`merge_adapter`):

1. Read the adapter (``adapter_config.json``, its weights, qwen-tune's recipe when present) and find the base:
   ``--base`` or the adapter's ``base_model_name_or_path``. Quantized bases: an adapter trained with Q-LoRA merges
   onto full-precision weights: nf4 quantizes on load, so the recorded base already is full precision; a GPTQ
   base is dequantized (:func:`dequantized_base`, exactly the weights the adapter was trained against, cached), or
   ``--base`` names the original full-precision checkpoint instead.
2. Refuse early what cannot work: a non-empty output (without ``overwrite``), too little free disk, an output that
   would replace the base or the adapter, an invalid shard size.
3. Load the base in fp32, check that the adapter fits it (every LoRA module exists with the right shapes, saved
   embeddings/lm_head have the base's vocabulary size, every module peft wraps has weights in the adapter),
   attach the adapter with peft, and ``merge_and_unload()`` (LoRA deltas and ``modules_to_save`` copies).
   Merging in fp32 and rounding once at the end is the most accurate way to produce bf16/fp16 weights.
4. Build ``<out>.tmp-<pid>``: first the tokenizer (the adapter's if the training run saved one next to it, else
   the base's) and every other file of the base that is not a weight file (model code, ``qwen.tiktoken``, README,
   LICENSE, ...); then the merged weights in the output dtype (sharded safetensors + index);
   ``generation_config.json`` and ``config.json`` are the base's own, the config with only the dtype (and, if the
   merge untied them, ``tie_word_embeddings``) changed, so older transformers versions and other runtimes read it
   exactly as they read the base's (transformers 5 would rewrite e.g. ``rope_theta`` as ``rope_parameters``).
   One deliberate change: a *base* (non-chat) model fine-tuned by qwen-tune (always ChatML) becomes a chat model,
   so its generation config also stops on ``<|im_end|>`` (Qwen-1: ``chat_format`` chatml).
5. Verify (fp32 logits on a ChatML probe batch tokenized by the output's tokenizer, real tokens only):

   * merge check: merged model in memory vs the unmerged adapter model (base + adapter);
   * reload check: the written directory, reloaded in fp32 from disk, vs the in-memory merged model with its weights
     rounded to the output dtype. Same weights and the same fp32 arithmetic, so this is exact up to float noise, for
     every output dtype: it catches missing/misnamed tensors, a wrong config, broken tying.

   Both must stay within ``FP32_TOLERANCE * max(1, max|reference logits|)`` (1e-4 for small logits; relative to the
   logit scale for real models, where fp32 summation-order noise grows with the logits). The difference between the
   reloaded output and the unmerged adapter model is reported as ``max_abs_diff``; for bf16/fp16 outputs it
   includes the unavoidable rounding of the weights to that dtype, which is a property of the chosen dtype, not an
   error of the merge, so it is printed but not gated (the two gated checks cover merge and save separately).
   A failed merge check stops before the weights are written (the build directory is removed); a failed reload
   check leaves the build directory with a ``MERGE_FAILED.txt`` marker. Neither ever becomes ``out``.
6. Rename the build directory to ``out`` (replacing an old ``out`` only with ``overwrite``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
FP32_TOLERANCE = 1e-4

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
RECIPE_FILE = "qwen_tune_recipe.yaml"  # written next to the adapter by `qwen-tune train`
MERGE_INFO = "qwen_tune_merge.json"
FAILED_MARKER = "MERGE_FAILED.txt"
TOKENIZER_FILES = frozenset({
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "qwen.tiktoken", "tokenizer.model", "chat_template.jinja", "chat_template.json", "vocab.txt",
})
# The BPE vocabulary itself (added tokens live in tokenizer.json / tokenizer_config.json).
_VOCAB_FILES = frozenset({"vocab.json", "merges.txt", "qwen.tiktoken", "tokenizer.model", "vocab.txt"})
# Any of these in the adapter directory means the training run saved its tokenizer there.
_TOKENIZER_MARKERS = ("tokenizer_config.json", "tokenizer.json", "vocab.json", "qwen.tiktoken", "tokenizer.model")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
# Written by the merge itself (config/generation config from the base's own files), or not part of a model.
_NEVER_COPY = frozenset({"config.json", "generation_config.json", ADAPTER_CONFIG, *ADAPTER_WEIGHTS,
                         "quantize_config.json", MERGE_INFO, FAILED_MARKER, "qwen_tune_dequantized.json"})
_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


class MergeVerificationError(ConfigError):
    """The merged checkpoint does not reproduce the adapter model; the output was not published."""


@dataclass
class MergeResult:
    out_dir: Path
    max_abs_diff: float | None  # reloaded output vs unmerged base+adapter, fp32 logits; None without verification
    copied_files: list[str]  # files copied from the base/adapter directories (relative to out_dir)
    dtype: str = "fp32"
    base_dir: Path | None = None
    merge_diff: float | None = None  # in-memory merged (fp32) vs unmerged adapter model
    reload_diff: float | None = None  # reloaded from disk vs in-memory merged rounded to `dtype`
    tolerance: float | None = None
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------------
# Reading the adapter and finding the base


@dataclass
class _Adapter:
    path: Path
    config: dict[str, Any]
    weights: Path
    shapes: dict[str, tuple[int, ...]]  # saved tensor name -> shape
    recipe: dict[str, Any] | None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def _tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return {k: tuple(v.shape) for k, v in state.items()}


def read_adapter(adapter_dir: str | os.PathLike) -> _Adapter:
    path = Path(adapter_dir)
    if not path.is_dir():
        raise ConfigError(f"adapter directory {str(path)!r} does not exist")
    if not (path / ADAPTER_CONFIG).is_file():
        hint = " (it holds a full model: nothing to merge)" if (path / "config.json").is_file() else ""
        raise ConfigError(f"{path}: no {ADAPTER_CONFIG}, not a peft adapter directory{hint}")
    config = _read_json(path / ADAPTER_CONFIG)
    weights = next((path / w for w in ADAPTER_WEIGHTS if (path / w).is_file()), None)
    if weights is None:
        raise ConfigError(f"{path}: no adapter weights ({' or '.join(ADAPTER_WEIGHTS)})")
    try:
        shapes = _tensor_shapes(weights)
    except Exception as e:  # noqa: BLE001 - a corrupt file becomes one clear line
        raise ConfigError(f"{weights}: cannot read adapter weights ({type(e).__name__}: {e})") from None
    recipe = None
    if (path / RECIPE_FILE).is_file():
        import yaml

        try:
            recipe = yaml.safe_load((path / RECIPE_FILE).read_text(encoding="utf-8")) or {}
        except yaml.YAMLError:
            recipe = None
    return _Adapter(path, config, weights, shapes, recipe if isinstance(recipe, dict) else None)


def _is_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def resolve_base(adapter: _Adapter, base_dir: str | os.PathLike | None) -> Path:
    """--base wins; else the adapter's base_model_name_or_path (as given, or relative to the adapter directory)."""
    recorded = adapter.config.get("base_model_name_or_path")
    if base_dir is not None:
        base = Path(base_dir)
        if not base.exists():
            raise ConfigError(f"base model directory {str(base)!r} (--base) does not exist")
        if not _is_checkpoint(base):
            raise ConfigError(f"--base {str(base)!r} is not a checkpoint directory (no config.json)")
        if recorded and Path(recorded).exists() and Path(recorded).resolve() != base.resolve():
            log.info("merging onto --base %s (the adapter was saved against %s)", base, recorded)
        return base
    if not recorded:
        raise ConfigError(f"{adapter.path / ADAPTER_CONFIG} names no base_model_name_or_path: pass --base DIR")
    rec = Path(recorded).expanduser()
    candidates = [rec] if rec.is_absolute() else [rec, adapter.path / rec, adapter.path / rec.name]
    for cand in candidates:
        if _is_checkpoint(cand):
            if cand != rec:
                log.info("base model %r found at %s", recorded, cand)
            return cand
    if rec.exists():
        raise ConfigError(f"base model {recorded!r} (from {ADAPTER_CONFIG}) is not a checkpoint directory "
                          "(no config.json): pass --base DIR")
    raise ConfigError(f"base model {recorded!r} (from {adapter.path / ADAPTER_CONFIG}) does not exist here: "
                      "pass --base DIR with the base checkpoint the adapter was trained on")


# ----------------------------------------------------------------------------------------------------------------
# Quantized bases


def _quantization(base: Path) -> dict[str, Any] | None:
    cfg = _read_json(base / "config.json")
    q = cfg.get("quantization_config")
    if q is None and (base / "quantize_config.json").is_file():
        q = {**_read_json(base / "quantize_config.json"), "quant_method": "gptq"}
    return q if isinstance(q, dict) else None


DEQUANT_MARKER = "qwen_tune_dequantized.json"


def _dequant_cache_root() -> Path:
    return Path(os.environ.get("QWEN_TUNE_CACHE", Path.home() / ".cache" / "qwen_tune")) / "dequantized"


def dequantized_base(path: str | os.PathLike) -> Path:
    """A full-precision checkpoint directory equivalent to the GPTQ checkpoint at ``path``.

    Every GPTQ layer becomes the nn.Linear weight it computes with (``scales * (q - zero)``, v1 and v2 zero points,
    any g_idx), in the checkpoint's own dtype (fp16 for Qwen's Int4 releases); the config loses
    ``quantization_config``; tokenizer, generation config and every other file are copied. Written once into
    ``$QWEN_TUNE_CACHE/dequantized/<name>-<hash of the checkpoint's files>`` and reused (delete it to reclaim disk).
    """
    import hashlib

    from ..models.gptq import GPTQError, dequantize_checkpoint

    src = Path(path)
    weights = _weight_files(src) if src.is_dir() else []
    if not weights:
        raise ConfigError(f"{src} is a GPTQ-quantized checkpoint without weight files to dequantize: pass --base DIR "
                          "with the full-precision checkpoint it was quantized from")
    h = hashlib.sha256(str(src.resolve()).encode())
    for f in sorted(src.iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    dst = _dequant_cache_root() / f"{src.resolve().name}-{h.hexdigest()[:16]}"
    if (dst / DEQUANT_MARKER).is_file() and (dst / "config.json").is_file():
        log.info("dequantized GPTQ base: reusing %s", dst)
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    _check_disk(dst, _dequantized_bytes(src, weights))
    log.info("dequantizing the GPTQ checkpoint %s into %s", src, dst)
    try:
        dequantize_checkpoint(src, dst)
    except GPTQError as e:
        raise ConfigError(f"{e}; or pass --base DIR with the full-precision checkpoint it was quantized from") from None
    (dst / DEQUANT_MARKER).write_text(json.dumps({"source": str(src.resolve())}, indent=2) + "\n", encoding="utf-8")
    return dst


def _dequantized_bytes(src: Path, weights: list[Path]) -> int:
    """Bytes of the dequantized weights: each qweight word holds 32/bits weights, stored at the checkpoint's dtype."""
    q = _quantization(src) or {}
    per_word = 32 // int(q.get("bits", 4))
    width = DTYPE_BYTES[_config_dtype(_read_json(src / "config.json"))]
    total = 0
    for f in weights:
        if f.suffix != ".safetensors":
            total += f.stat().st_size * 8  # a pessimistic guess for .bin files
            continue
        for name, shape in _tensor_shapes(f).items():
            n = int(torch.Size(shape).numel())
            if name.endswith(".qweight"):
                total += n * per_word * width
            elif not name.endswith((".qzeros", ".scales", ".g_idx")):
                total += n * width
    return int(total * 1.02) + 16 * 2**20


def _trained_quantized(adapter: _Adapter, recorded_base: Path | None) -> str | None:
    """The quantization ('nf4', 'gptq', ...) the adapter was trained on, None for a full-precision base."""
    recipe = adapter.recipe or {}
    method = None
    if recipe.get("method") == "qlora":
        q = (recipe.get("quantization") or {}).get("method", "none")
        method = q if q in ("nf4", "gptq") else "nf4"  # `none` resolves to nf4 unless the base is GPTQ
    if recorded_base is not None and _is_checkpoint(recorded_base):
        q = _quantization(recorded_base)
        if q:
            method = str(q.get("quant_method", "quantized"))
    return method


def _full_precision_base(adapter: _Adapter, base: Path, notes: list[str]) -> Path:
    recorded = adapter.config.get("base_model_name_or_path")
    recorded_path = Path(recorded).expanduser() if recorded else None
    if recorded_path is not None and not recorded_path.is_absolute() and not recorded_path.exists():
        recorded_path = adapter.path / recorded_path
    trained_q = _trained_quantized(adapter, recorded_path)
    q = _quantization(base)
    if q is not None:
        kind = str(q.get("quant_method", "quantized"))
        if kind == "gptq":
            gptq_src = base
            base = dequantized_base(base)
            msg = (f"merging onto the GPTQ base {gptq_src} dequantized ({base}): exactly the weights the adapter was "
                   "trained against, so the merged model reproduces the Q-LoRA model (verified below); run "
                   "`qwen-tune quantize` on the merged model for an Int4 checkpoint again")
            log.info(msg)
            notes.append(msg)
            return base
        raise ConfigError(f"{base} is a {kind}-quantized checkpoint: pass --base DIR with the full-precision "
                          "checkpoint to merge onto")
    if trained_q:
        msg = (f"the adapter was trained with Q-LoRA on a quantized ({trained_q}) base; merging it onto the "
               f"full-precision base {base}: the result is a full-precision model (base + LoRA delta), which matches "
               "the adapter on that base (verified below) and differs slightly from the quantized model used in "
               "training; quantize the merged model again if you need a small one")
        log.warning(msg)
        notes.append(msg)
    return base


# ----------------------------------------------------------------------------------------------------------------
# Output directory, disk, dtype


def parse_size(size: str | int) -> int:
    if isinstance(size, int):
        if size <= 0:
            raise ConfigError(f"max shard size must be positive, got {size}")
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(size).upper())
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(f"max shard size {size!r} is not a size like 2GB, 500MB or 1GiB")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2) or "B"])


def _config_dtype(config: dict[str, Any]) -> str:
    """The checkpoint's dtype as bf16/fp16/fp32 (fp32 when the config does not say)."""
    name = config.get("dtype") or config.get("torch_dtype")
    if isinstance(name, str):
        name = name.replace("torch.", "")
        for short, long in DTYPE_NAMES.items():
            if name in (short, long) or (short == "fp16" and name == "half") or (short == "fp32" and name == "float"):
                return short
    if config.get("model_type") == "qwen":  # original Qwen-1 configs state precision as flags
        for short in ("bf16", "fp16", "fp32"):
            if config.get(short):
                return short
    return "fp32"


def _is_within(child: Path, parent: Path) -> bool:
    try:
        child.relative_to(parent)
        return True
    except ValueError:
        return False


def _check_output(out: Path, overwrite: bool, protected: list[Path]) -> None:
    resolved = out.resolve()
    for p in protected:
        if _is_within(p.resolve(), resolved):
            raise ConfigError(f"output {str(out)!r} would replace {p}: choose another --out")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"output directory {str(out)!r} is not empty: pass --overwrite to replace it")


def _weight_files(base: Path) -> list[Path]:
    return sorted(f for f in base.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))


def estimate_output_bytes(base: Path, dtype: str) -> int:
    """Bytes of the merged weights in `dtype` (+ the files copied), from the base's weight files."""
    numel = 0
    other = 0
    source_bytes = DTYPE_BYTES[_config_dtype(_read_json(base / "config.json"))]
    for f in _weight_files(base):
        if f.suffix == ".safetensors":
            try:
                numel += sum(int(torch.Size(s).numel()) for s in _tensor_shapes(f).values())
                continue
            except Exception:  # noqa: BLE001 - fall back to scaling the file size
                pass
        other += f.stat().st_size
    extras = sum(f.stat().st_size for f in base.iterdir() if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES))
    weights = numel * DTYPE_BYTES[dtype] + other * DTYPE_BYTES[dtype] // source_bytes
    return int(weights * 1.02) + extras + 16 * 2**20  # index/config overhead and a margin


def _check_disk(out: Path, needed: int) -> None:
    probe = out.resolve()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise ConfigError(f"not enough free disk for {out}: the merged model needs about {needed / 1e9:.2f} GB, "
                          f"{free / 1e9:.2f} GB free on {probe}")


# ----------------------------------------------------------------------------------------------------------------
# Adapter <-> base compatibility


_LORA_KEY = re.compile(r"^(?P<mod>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.weight)?$")


def _strip_prefix(key: str) -> str:
    for prefix in ("base_model.model.", "base_model."):
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _saved_modules_to_save(adapter: _Adapter) -> dict[str, tuple[int, ...]]:
    """Full tensors saved for modules_to_save: base parameter name -> shape."""
    names = adapter.config.get("modules_to_save") or []
    out = {}
    for key, shape in adapter.shapes.items():
        k = _strip_prefix(key)
        mod = k.rsplit(".", 1)[0]
        if any(mod == n or mod.endswith("." + n) for n in names) and not _LORA_KEY.match(k):
            out[k.replace(".modules_to_save.default.", ".")] = shape
    return out


def lora_modules(adapter: _Adapter) -> set[str]:
    return {m.group("mod") for k in adapter.shapes if (m := _LORA_KEY.match(_strip_prefix(k)))}


def check_adapter_fits(model: torch.nn.Module, adapter: _Adapter, base: Path) -> None:
    """Refuse an adapter made for another model, with one line naming what does not fit."""
    modules = dict(model.named_modules())
    params = dict(model.named_parameters(remove_duplicate=False))  # tied lm_head.weight too
    where = f"adapter {adapter.path} does not fit base {base}"
    missing = sorted(m for m in lora_modules(adapter) if m not in modules)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ConfigError(f"{where}: the base has no module {', '.join(missing[:3])}{more} "
                          f"(target modules {adapter.config.get('target_modules')!r}; another model family or size?)")
    for key, shape in adapter.shapes.items():
        m = _LORA_KEY.match(_strip_prefix(key))
        if not m:
            continue
        module = modules[m.group("mod")]
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or len(shape) != 2:
            continue
        kind = m.group("kind")
        if isinstance(module, torch.nn.Embedding):
            expected, got, what = ((weight.shape[0], shape[1], "vocabulary rows") if kind == "lora_embedding_A"
                                   else (weight.shape[1], shape[0], "embedding width"))
        elif isinstance(module, torch.nn.Linear):
            expected, got, what = ((weight.shape[1], shape[1], "input features") if kind == "lora_A"
                                   else (weight.shape[0], shape[0], "output features"))
        else:
            continue
        if expected != got:
            raise ConfigError(f"{where}: shape mismatch at {m.group('mod')}: the adapter's {kind} expects {got} "
                              f"{what}, the base has {expected} (hidden size or model size differs)")
    vocab = getattr(model.config, "vocab_size", None)
    for name, shape in _saved_modules_to_save(adapter).items():
        if name not in params:
            raise ConfigError(f"{where}: the adapter saved a trained copy of {name}, which the base does not have")
        if tuple(params[name].shape) != tuple(shape):
            base_shape = tuple(params[name].shape)
            if len(shape) == 2 and shape[0] != base_shape[0] and base_shape[0] == vocab:
                raise ConfigError(f"{where}: vocabulary size mismatch: the adapter's trained {name} has {shape[0]} "
                                  f"rows, the base has {base_shape[0]} (embeddings resized, or another base)")
            raise ConfigError(f"{where}: shape mismatch at {name}: adapter {list(shape)}, base {list(base_shape)}")


def _check_all_wrapped_modules_loaded(peft_model: torch.nn.Module, adapter: _Adapter, base: Path) -> None:
    """Every module peft wrapped must have weights in the adapter (else it silently merges a zero delta)."""
    saved = lora_modules(adapter)
    if not saved:
        return
    wrapped = set()
    for name, module in peft_model.named_modules():
        if "default" in getattr(module, "lora_A", {}) or "default" in getattr(module, "lora_embedding_A", {}):
            wrapped.add(_strip_prefix(name))
    unloaded = sorted(wrapped - saved)
    if unloaded:
        more = f" and {len(unloaded) - 3} more" if len(unloaded) > 3 else ""
        raise ConfigError(f"adapter {adapter.path} does not fit base {base}: the adapter has no weights for "
                          f"{', '.join(unloaded[:3])}{more} (the base has more layers than the adapter's model?)")


# ----------------------------------------------------------------------------------------------------------------
# Probe batch and logits


PROBE_CONVERSATIONS = [
    (None, [("user", "Write a haiku about merging adapters into a model."),
            ("assistant", "Low-rank whispers fold\ninto the weights they once nudged:\none voice, no seams left.")]),
    ("You are a careful assistant who answers in Chinese.",
     [("user", "用一句话解释什么是微调？"),
      ("assistant", "微调是在预训练模型的基础上，用少量任务数据继续训练，使模型适应特定任务。"),
      ("user", "def add(a, b):\n    return a + b  # what does this return for 2, 3?"),
      ("assistant", "It returns 5.")]),
]


def probe_batch(tokenizer: Any, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A right-padded batch of ChatML conversations, encoded exactly as training encodes them."""
    from ..data.formats import Conversation
    from ..data.template import ChatMLEncoder
    from ..data.tokenizer import ENDOFTEXT_ID

    convs = [Conversation(id=f"probe{i}", turns=turns, system=system)
             for i, (system, turns) in enumerate(PROBE_CONVERSATIONS)]
    rows = [s.input_ids for s in ChatMLEncoder(tokenizer, max_len=256).encode(convs)]
    if max(max(r) for r in rows) >= vocab_size:  # toy models with a cut vocabulary
        log.info("probe ids exceed the model's vocabulary (%d): folded into it", vocab_size)
        rows = [[t % vocab_size for t in r] for r in rows]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ENDOFTEXT_ID
    pad = pad % vocab_size
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask


@torch.inference_mode()
def _logits(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    ids, mask = batch
    model.eval()
    out = model(input_ids=ids, attention_mask=mask, use_cache=False)
    return out.logits.float()[mask.bool()]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def _cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast floating parameters and saved buffers only: non-persistent buffers (rotary inv_freq) keep fp32."""
    persistent = set(model.state_dict().keys())
    for p in model.parameters():
        if p.is_floating_point():
            p.data = p.data.to(dtype)
    for name, buf in model.named_buffers():
        if name in persistent and buf.is_floating_point():
            mod_name, _, attr = name.rpartition(".")
            mod = model.get_submodule(mod_name) if mod_name else model
            setattr(mod, attr, buf.to(dtype))


# ----------------------------------------------------------------------------------------------------------------
# Files


def _tokenizer_source(adapter: Path, base: Path) -> Path:
    return adapter if any((adapter / f).is_file() for f in _TOKENIZER_MARKERS) else base


def _copy_files(base: Path, adapter: Path, dest: Path, avoid: list[Path]) -> list[str]:
    """Copy the tokenizer and every non-weight file of the base into dest; returns the names copied.

    Not copied: weights and weight indexes, config.json and generation_config.json (written by the merge from the
    base's), hidden files, and the base's tokenizer files when the adapter brings its own tokenizer.
    """
    tok_src = _tokenizer_source(adapter, base)
    copied: list[str] = []
    if tok_src != base:
        for name in sorted(TOKENIZER_FILES):
            # transformers 5 saves only tokenizer.json: the base's vocabulary files stay for other loaders.
            src = tok_src / name if (tok_src / name).is_file() else base / name if name in _VOCAB_FILES else None
            if src is not None and src.is_file():
                shutil.copy2(src, dest / name)
                copied.append(name)
    avoid = [p.resolve() for p in avoid]
    for src in sorted(base.iterdir()):
        name = src.name
        if name.startswith(".") or name in _NEVER_COPY or name.endswith(WEIGHT_SUFFIXES):
            continue
        if name.endswith(".index.json") or (tok_src != base and name in TOKENIZER_FILES):
            continue
        if src.is_dir():
            if any(_is_within(a, src.resolve()) for a in avoid):
                continue  # the output itself lives inside the base directory
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns(".*", *(f"*{s}" for s in WEIGHT_SUFFIXES)))
        elif src.is_file():
            shutil.copy2(src, dest / name)
        else:
            continue
        copied.append(name)
    if tok_src != base:
        _keep_tokenizer_auto_map(base, dest)
    return copied


def _keep_tokenizer_auto_map(base: Path, dest: Path) -> None:
    """A tokenizer_config saved by training may lack the base's auto_map (remote-code Qwen-1 loading needs it)."""
    base_cfg, out_cfg = base / "tokenizer_config.json", dest / "tokenizer_config.json"
    if not (base_cfg.is_file() and out_cfg.is_file()):
        return
    auto_map = _read_json(base_cfg).get("auto_map")
    data = _read_json(out_cfg)
    if auto_map and "auto_map" not in data:
        data["auto_map"] = auto_map
        out_cfg.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_config(base: Path, dest: Path, dtype: str, untied: bool) -> None:
    """The base's own config.json with only what the merge changes: dtype (and tying)."""
    config = _read_json(base / "config.json")
    config["torch_dtype"] = config["dtype"] = DTYPE_NAMES[dtype]  # `dtype`: transformers 5; `torch_dtype`: older
    if config.get("model_type") == "qwen":  # the original Qwen-1 code casts the model to the flagged precision
        for short in ("bf16", "fp16", "fp32"):
            config[short] = short == dtype
    if untied:
        config["tie_word_embeddings"] = False
    config.pop("quantization_config", None)
    (dest / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_generation_config(base: Path, adapter: _Adapter, dest: Path, notes: list[str]) -> str | None:
    """generation_config.json of the adapter run (training copies the base's), else the base's.

    An adapter trained by qwen-tune learned ChatML; if the generation config is a base model's (stops only on
    <|endoftext|>, Qwen-1 chat_format raw), the merged chat model would never stop, so <|im_end|> is added.
    """
    from ..data.tokenizer import ENDOFTEXT_ID, IM_END_ID

    src = next((d / "generation_config.json" for d in (adapter.path, base)
                if (d / "generation_config.json").is_file()), None)
    if src is None:
        return None
    gen = _read_json(src)
    eos = gen.get("eos_token_id")
    eos_list = [e for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
    # Same rule as qwen_tune.models.loading.detect_is_chat.
    is_chat = gen["chat_format"] == "chatml" if "chat_format" in gen else IM_END_ID in eos_list
    if adapter.recipe is not None and not is_chat:
        changed = []
        if IM_END_ID not in eos_list:
            gen["eos_token_id"] = [IM_END_ID, *(eos_list or [ENDOFTEXT_ID])]
            changed.append("eos_token_id += <|im_end|>")
        if "chat_format" in gen:
            gen["chat_format"] = "chatml"
            changed.append("chat_format -> chatml")
        msg = (f"generation_config.json: the base is not a chat model but the adapter was trained on ChatML, "
               f"so the merged model is one ({'; '.join(changed)})")
        log.info(msg)
        notes.append(msg)
    (dest / "generation_config.json").write_text(json.dumps(gen, indent=2, ensure_ascii=False) + "\n",
                                                 encoding="utf-8")
    return "generation_config.json"


# ----------------------------------------------------------------------------------------------------------------
# The merge


def _load_base(base: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    from ..models import qwen1  # noqa: F401 - registers model_type "qwen"

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.eval()
    return model


def _load_tokenizer(*dirs: Path) -> Any:
    from ..data.tokenizer import load_tokenizer

    for d in dirs:
        try:
            return load_tokenizer(d)
        except OSError as e:
            log.info("no tokenizer loads from %s (%s)", d, e)
    log.warning("no tokenizer in the output: probing with the bundled Qwen tokenizer")
    return load_tokenizer(None)


def _untie_if_diverged(model: torch.nn.Module, notes: list[str]) -> bool:
    """A tied model whose embedding or lm_head was trained alone (modules_to_save) is no longer tied."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return False
    inp, outp = model.get_input_embeddings(), model.get_output_embeddings()
    if inp is None or outp is None or inp.weight is outp.weight:
        return False
    if inp.weight.shape == outp.weight.shape and torch.equal(inp.weight, outp.weight):
        return False
    model.config.tie_word_embeddings = False
    msg = "the adapter trained the input embedding and lm_head apart: the merged model has untied (separate) weights"
    log.info(msg)
    notes.append(msg)
    return True


def merge_adapter(adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, base_dir: str | os.PathLike | None = None,
                  dtype: str | None = None, max_shard_size: str | int = "2GB", overwrite: bool = False,
                  verify: bool = True) -> MergeResult:
    """Merge the adapter in ``adapter_dir`` into its base and write a standalone checkpoint to ``out_dir``."""
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    shard_bytes = parse_size(max_shard_size)
    out = Path(out_dir)
    notes: list[str] = []

    adapter = read_adapter(adapter_dir)
    base = resolve_base(adapter, base_dir)
    base = _full_precision_base(adapter, base, notes)
    base_config = _read_json(base / "config.json")
    out_dtype = dtype or _config_dtype(base_config)
    _check_output(out, overwrite, [base, adapter.path])
    _check_disk(out, estimate_output_bytes(base, out_dtype))
    log.info("merging adapter %s into base %s -> %s (%s)", adapter.path, base, out, out_dtype)

    model = _load_base(base)
    check_adapter_fits(model, adapter, base)
    vocab_size = model.get_input_embeddings().weight.shape[0]

    from peft import PeftModel

    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter.path), is_trainable=False)
    except (ValueError, KeyError, RuntimeError) as e:
        text = str(e).strip()
        if isinstance(e, RuntimeError) and "size mismatch" not in text and "loading state_dict" not in text:
            raise  # not a mismatch (e.g. out of memory)
        first = text.splitlines()[0] if text else type(e).__name__
        raise ConfigError(f"adapter {adapter.path} does not fit base {base}: {first}") from None
    _check_all_wrapped_modules_loaded(peft_model, adapter, base)

    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    result = MergeResult(out, None, [], out_dtype, base, notes=notes)
    published = False
    try:
        # The tokenizer and extra files go in first: the probe is tokenized by the output's own tokenizer.
        tmp.mkdir(parents=True)
        result.copied_files = _copy_files(base, adapter.path, tmp, [out, tmp])
        batch = reference = None
        if verify:
            batch = probe_batch(_load_tokenizer(tmp), vocab_size)
            reference = _logits(peft_model, batch)
            result.tolerance = FP32_TOLERANCE * max(1.0, float(reference.abs().max()))
        with torch.no_grad():
            merged = peft_model.merge_and_unload()
        del peft_model, model
        untied = _untie_if_diverged(merged, notes)

        expected = None
        if verify:
            expected = _logits(merged, batch)
            result.merge_diff = _max_diff(expected, reference)
            log.info("merge check: merged (fp32, in memory) vs base+adapter: max abs logit diff %.3g (tolerance %.3g)",
                     result.merge_diff, result.tolerance)
            if not result.merge_diff <= result.tolerance:  # fail before writing anything big
                raise MergeVerificationError(
                    f"merge verification failed: the merged model's logits differ from base+adapter by "
                    f"{result.merge_diff:.3g} (tolerance {result.tolerance:.3g}); nothing was written to {out}")
            if out_dtype != "fp32":  # the reference for the reload: exactly the weights written
                _cast_parameters(merged, DTYPES[out_dtype])
                _cast_parameters(merged, torch.float32)
                expected = _logits(merged, batch)
        if out_dtype != "fp32":
            _cast_parameters(merged, DTYPES[out_dtype])
            bad = [n for n, p in merged.named_parameters() if not torch.isfinite(p).all()]
            if bad:
                raise ConfigError(f"merged weights overflow {out_dtype} (e.g. {bad[0]}): use --dtype bf16 or fp32")

        merged.save_pretrained(tmp, max_shard_size=shard_bytes)
        del merged
        _write_config(base, tmp, out_dtype, untied)
        mode = (tmp / "config.json").stat().st_mode & 0o777  # shards are written 0600; give them the usual mode
        for f in tmp.glob("*.safetensors"):
            f.chmod(mode)
        gen = _write_generation_config(base, adapter, tmp, notes)
        if gen:
            result.copied_files.append(gen)

        if verify:
            reloaded = _load_base(tmp)
            got = _logits(reloaded, batch)
            del reloaded
            result.reload_diff = _max_diff(got, expected)
            result.max_abs_diff = _max_diff(got, reference)
            log.info("reload check: %s reloaded in fp32 vs merged weights: max abs logit diff %.3g", out,
                     result.reload_diff)
            if not result.reload_diff <= result.tolerance:
                reason = (f"the written checkpoint, reloaded, gives logits {result.reload_diff:.3g} away from the "
                          f"merged weights (tolerance {result.tolerance:.3g})")
                (tmp / FAILED_MARKER).write_text(f"merge verification failed: {reason}\n", encoding="utf-8")
                raise MergeVerificationError(f"merge verification failed: {reason}; {out} was not written, the "
                                             f"incomplete build is left in {tmp} for inspection (delete it)")
            rounding = "" if out_dtype == "fp32" else f", including {out_dtype} rounding of the weights"
            log.info("verified: merged %s vs base+adapter (fp32): max abs logit diff %.3g%s", out, result.max_abs_diff,
                     rounding)

        (tmp / MERGE_INFO).write_text(json.dumps({
            "adapter": str(adapter.path.resolve()), "base": str(base.resolve()), "dtype": out_dtype,
            "max_abs_diff": result.max_abs_diff, "merge_diff": result.merge_diff, "reload_diff": result.reload_diff,
            "tolerance": result.tolerance, "notes": notes}, indent=2) + "\n", encoding="utf-8")
        _publish(tmp, out)
        published = True
    finally:
        if not published and tmp.exists() and not (tmp / FAILED_MARKER).exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("merged model written to %s", out)
    return result


def _publish(tmp: Path, out: Path) -> None:
    """Rename the finished build to `out`; an existing `out` (overwrite) is replaced only after success."""
    old = None
    if out.exists():
        old = out.parent / f"{out.name}.old-{os.getpid()}"
        out.rename(old)
    try:
        tmp.rename(out)
    except OSError:
        if old is not None:
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
