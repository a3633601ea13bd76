"""Per-device training memory estimate from a recipe and a model's config.json (no weights read).

The estimate is a sum of named parts -- weights, gradients, optimizer states, activations, logits,
CUDA/framework overhead -- taken at the largest of three phases of a training step:

* forward/backward: weights + gradients + optimizer states + stored activations + the larger of
  (the LM-head logits at the loss) and (one decoder layer recomputed in backward). The logits are
  freed before the decoder layers run backward, so those two never coexist. Gradients count in
  full: gradient accumulation keeps them alive across micro-batches.
* end of backward: weights + gradients + optimizer states + the freshly computed [vocab, hidden]
  gradient of a trainable embedding / lm_head before it is added into the accumulated one.
* optimizer step: weights + gradients + optimizer states + step temporaries (DeepSpeed's fp32
  copy of the gradient partition; HF's default fused AdamW needs none).

Overhead is a fixed CUDA context plus a share of the rest for caching-allocator slack, plus
NCCL / DeepSpeed bucket / dequantization buffers where they apply.

Assumptions: tokens per micro-step are ``batch_size * max_len`` (packing concatenates
``batch_size`` samples of at most ``max_len`` tokens; padding pads to the longest), i.e. the worst
case, and every token is supervised (an upper bound for the chunked loss). The model, its
calibration against Qwen's published numbers and its limits are in docs/memory_estimator.md.

:func:`estimate_memory` reads top to bottom as its steps: the engine (precision, ZeRO/FSDP sharding), which
parameters train, weights, gradients and optimizer states, activations (:mod:`.activations`), logits, the
end-of-backward temporaries, buffers, and the peak over the phases.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import ConfigError, Recipe
from ..models.families import get_family
from ..train.distributed import check_combination
from ..train.loss import estimate_logits_bytes
from .activations import activation_parts
from .inputs import Engine, engine, is_chat, load_model_config, num, quant_method
from .preference import as_sequences, reference_weights
from .render import MemoryEstimate
from .shape import ModelShape

GB = 1e9  # the reported unit (the Qwen README's "G" columns are 10^9 bytes, see the docs)

# CUDA context + cuBLAS workspace on one device, as nvidia-smi counts it.
CUDA_CONTEXT_BYTES = int(1.0e9)
# Caching-allocator slack (reserved but unused blocks), as a share of everything allocated.
ALLOCATOR_SLACK = 0.05
# NCCL communicators and buffers, per device, when more than one device trains.
NCCL_BYTES = int(0.6e9)
# Bytes per parameter of a 4-bit quantized weight, scales included.
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit codes, 8-bit absmax per 64, fp32 per 256 absmax (double quant)
NF4_BYTES_NO_DQ = 0.5 + 4 / 64  # 4-bit codes, fp32 absmax per 64
GPTQ_BYTES = 0.5 + 2 / 128 + 0.5 / 128  # 4-bit codes, fp16 scale + 4-bit zero per group of 128
# The chunked loss holds, per chunk, the head's logits (compute dtype), their fp32 copy, the logsumexp
# temporary and the compute-dtype gradient: three fp32-sized [rows, vocab] buffers in bf16 (two in fp32);
# the plain loss's log-softmax + NLL backward holds three too. `estimate_logits_bytes` counts two fp32 ones.
LOSS_PEAK_FACTOR = 1.5


# --------------------------------------------------------------------------- steps


@dataclass
class _Trainable:
    targets: Any
    N: int  # all parameters
    q_method: str
    lora_n: int = 0
    emb_train: int = 0  # trainable copies of the embedding and lm_head (modules_to_save)
    trainable_n: int = 0


def _trainable(recipe: Recipe, shape: ModelShape, cfg: dict[str, Any], notes: list[str]) -> _Trainable:
    lora = recipe.lora
    family = get_family(shape.model_type)
    targets = lora.target_modules if lora.target_modules != "auto" else list(family.lora_targets)
    tr = _Trainable(targets, shape.total_params, quant_method(recipe, cfg))
    if recipe.method == "full":
        tr.trainable_n = tr.N
        if recipe.training.freeze:
            notes.append("training.freeze is not modelled: every parameter counted as trainable")
        check_combination(recipe)
        return tr
    tr.lora_n = shape.lora_params(targets, lora.r)
    if tr.lora_n == 0:
        raise ConfigError(f"lora.target_modules {targets!r} match no linear layer of this {shape.model_type} model")
    if lora.modules_to_save is not None:
        wanted = bool(lora.modules_to_save)
    elif lora.trainable_embeddings is not None:
        wanted = lora.trainable_embeddings
    else:
        wanted = not is_chat(recipe, cfg)
    if wanted and recipe.method == "qlora":
        notes.append("Q-LoRA: embeddings/lm_head stay frozen (a quantized base cannot train them)")
        wanted = False
    check_combination(recipe, trainable_embeddings=wanted)
    if shape.expert_lora_params(targets, lora.r):
        notes.append("LoRA reaches the fused MoE experts (peft ParamWrapper): each forward materializes the "
                     "experts' effective 16-bit weights layer by layer (counted in activations)")
        if lora.dropout > 0:
            notes.append("peft refuses lora.dropout != 0 on fused MoE experts: set lora.dropout=0 to train "
                         "this recipe")
    if wanted:
        tr.emb_train = 2 * shape.vocab * shape.hidden
        notes.append("trainable embeddings: peft trains copies of the embedding and lm_head (2 x vocab x hidden "
                     "params) next to the frozen originals")
    tr.trainable_n = tr.lora_n + tr.emb_train
    return tr


@dataclass
class _Weights:
    weights: float
    frozen_bytes: float
    train_bytes: float
    a: int  # bytes per trainable (adapter) parameter
    emb_a: int  # bytes per trainable embedding-copy parameter


def _weights(recipe: Recipe, shape: ModelShape, e: Engine, tr: _Trainable, details: dict[str, str],
             notes: list[str]) -> _Weights:
    p, b, N = e.p, e.b, tr.N
    if recipe.method == "full":
        a = p
    elif e.mixed:
        a = b
    else:
        a = 4 if (p == 2 or recipe.method == "qlora") else p  # peft autocasts 16-bit adapters to fp32
    emb_a = p  # modules_to_save copies keep the base dtype
    if recipe.method == "qlora":
        qbytes = {"gptq": GPTQ_BYTES, "nf4": NF4_BYTES if recipe.quantization.double_quant else NF4_BYTES_NO_DQ}[
            tr.q_method]
        quantized = shape.linear_weight_params
        rest = N - quantized
        # peft's prepare_model_for_kbit_training upcasts every other 16-bit parameter to fp32 (not for GPTQ)
        rest_bytes = 2 if (tr.q_method == "gptq" or e.mixed) else 4
        frozen_bytes = quantized * qbytes + rest * rest_bytes
        details["weights"] = (f"{tr.q_method} 4-bit block linears ({quantized / 1e9:.2f} B params) + "
                              f"{rest / 1e9:.2f} B others in {'fp32' if rest_bytes == 4 else '16-bit'}")
        if shape.fused_expert_params and rest_bytes == 4:
            notes.append("Q-LoRA on this MoE: the fused expert weights are not quantized and are upcast to fp32")
    elif recipe.method == "lora":
        frozen_bytes = N * p
        details["weights"] = f"base {N / 1e9:.2f} B params x {p} B"
    else:
        frozen_bytes = 0
        details["weights"] = f"{N / 1e9:.2f} B params x {p} B"
    train_bytes = N * p if recipe.method == "full" else tr.lora_n * a + tr.emb_train * emb_a
    if recipe.method != "full":
        details["weights"] += f" + trainable {tr.trainable_n / 1e6:,.1f} M"

    if e.stage_like >= 3:
        weights = 0.0 if e.off_par else (frozen_bytes + train_bytes) / e.shard_par
        # gathered parameters in flight: the larger of (lm_head/embedding, two decoder layers) + the prefetch bucket
        prefetch = num(e.zo.get("stage3_prefetch_bucket_size"), 0.9 * shape.hidden ** 2)
        gathered = b * (max(shape.vocab * shape.hidden, 2 * shape.largest_layer_params) + prefetch)
        weights += gathered
        details["weights"] += (f"; {'offloaded to CPU' if e.off_par else f'partitioned over {e.d}'}, "
                               f"+{gathered / GB:.2f} GB gathered working set")
    else:
        weights = frozen_bytes + train_bytes
    return _Weights(weights, frozen_bytes, train_bytes, a, emb_a)


@dataclass
class _States:
    gradients: float
    optimizer: float
    step_transient: float
    cpu_offload: float = 0.0


def _states(recipe: Recipe, e: Engine, tr: _Trainable, w: _Weights, reference: bool, details: dict[str, str],
            notes: list[str]) -> _States:
    """Gradients, optimizer states and optimizer-step temporaries."""
    p, b, a = e.p, e.b, w.a
    grad_bytes = tr.N * p if recipe.method == "full" else tr.lora_n * a + tr.emb_train * w.emb_a
    trainable_n = tr.trainable_n
    if e.ds:
        zo = e.zo
        if e.mixed:
            master_adam = trainable_n * 12
            if e.stage_like >= 3:  # ZeRO-3 steps one sub-group at a time: fp32 gradients of <= sub_group_size params
                sub = num(zo.get("sub_group_size"), 1e9)
                step_tmp = 4 * min(trainable_n / e.shard_opt, sub) * e.shard_opt
            else:  # fp32 copy of the gradient partition + the flattened 16-bit gradients it is made from
                step_tmp = trainable_n * (4 + b)
            opt_detail = "fp32 master weights + fp32 Adam m, v (12 B/param)"
            if e.stage_like == 0 and e.precision == "bf16":
                grad_bytes = trainable_n * 4  # DeepSpeed's BF16_Optimizer accumulates gradients in fp32
        else:
            master_adam, step_tmp = trainable_n * 8, 0
            opt_detail = "Adam m, v (8 B/param)"
        s = _States(grad_bytes / e.shard_grad, master_adam / e.shard_opt, step_tmp / e.shard_opt)
        if e.off_opt:
            s.cpu_offload += s.optimizer + s.step_transient
            s.optimizer = s.step_transient = 0.0
            opt_detail += ", offloaded to CPU"
        if e.off_par:
            s.cpu_offload += (w.frozen_bytes + w.train_bytes) / e.shard_par
        details["optimizer"] = opt_detail + (f", partitioned over {e.d}" if e.shard_opt > 1 and not e.off_opt else "")
        details["gradients"] = (f"{b} B/param" + (f", partitioned over {e.d}" if e.shard_grad > 1 else ""))
        if s.step_transient:
            details["step"] = "fp32 gradients for the optimizer (step only)"
    else:
        # AdamW m, v in the trainable parameters' dtype. HF's default optimizer (adamw_torch_fused) updates in
        # place; the 2023 reference ran torch's foreach AdamW, whose sqrt(v) is one parameter-sized temporary.
        s = _States(grad_bytes / e.shard_grad, 2 * grad_bytes / e.shard_opt,
                    grad_bytes / e.shard_opt if reference else 0.0)
        gd = a if recipe.method != "full" else p
        details["optimizer"] = f"AdamW m, v in the trainable parameters' dtype ({2 * gd} B/param)"
        details["gradients"] = f"{gd} B/param" + (f", sharded over {e.d}" if e.shard_grad > 1 else "")
        if s.step_transient:
            details["step"] = "foreach AdamW temporary (step only)"
        if recipe.method == "full" and p == 2:
            notes.append(f"full training without DeepSpeed: {e.weight_dtype} weights, gradients and AdamW states, no "
                         "fp32 master copy (8 B/param); model.dtype=fp32 keeps fp32 weights and states (16 B/param), "
                         "a DeepSpeed config keeps fp32 master weights + Adam states (16 B/param + fp32 gradients "
                         "at the step)")
    if recipe.method != "full" and a == 4 and not e.ds:
        notes.append("LoRA adapters train in fp32 (peft upcasts 16-bit adapters): 16 B per adapter param")
    return s


def _activations(recipe: Recipe, shape: ModelShape, e: Engine, w: _Weights, tr: _Trainable,
                 details: dict[str, str]) -> tuple[dict[str, int], int, int, int]:
    """(parts, stored, recomputed, tokens per micro-step)."""
    t = recipe.training
    T = t.batch_size * recipe.data.max_len
    rows, S = (1, T) if recipe.data.packing else (t.batch_size, recipe.data.max_len)
    parts = activation_parts(shape, recipe, e.b, w.a, e.p, T, rows, S, tr.targets, e.autocast)
    if t.gradient_checkpointing:
        stored = parts["checkpoints"] + parts["head"] + parts["embedding"] + parts["mask"]
        recompute = parts["recompute"]
        details["activations"] = (f"{shape.layers} layer inputs {parts['checkpoints'] / GB:.2f} + one recomputed "
                                  f"layer {recompute / GB:.2f} GB (gradient checkpointing)")
    else:
        stored = parts["layers"] + parts["head"] + parts["embedding"] + parts["mask"]
        recompute = 0
        details["activations"] = f"all {shape.layers} layers kept (no gradient checkpointing)"
    if parts["mask"] > 0.05 * GB:
        details["activations"] += f"; {S}x{S} attention mask {parts['mask'] / GB:.2f} GB (flash_attention_2 has none)"
    if parts["scores"]:
        details["activations"] += f"; eager attention scores {parts['scores'] / GB:.2f} GB (use sdpa/flash)"
    return parts, stored, recompute, T


def _logits(recipe: Recipe, V: int, T: int, e: Engine, reference: bool, details: dict[str, str],
            notes: list[str]) -> float:
    t = recipe.training
    if reference:
        loss_bytes = 4 if (e.autocast or not e.half) else e.b  # Qwen-1's own loss: 16-bit under DeepSpeed
        details["logits"] = (f"Qwen-1 reference loss: {T:,} x {V:,} in "
                             f"{'fp32' if loss_bytes == 4 else e.precision}")
        return LOSS_PEAK_FACTOR * estimate_logits_bytes(T, V, None) * loss_bytes / 4
    if t.loss == "chunked":
        details["logits"] = f"chunked loss: {min(t.loss_chunk_size, T):,} rows x {V:,} vocab in fp32 at a time"
        return LOSS_PEAK_FACTOR * estimate_logits_bytes(T, V, t.loss_chunk_size)
    logits = LOSS_PEAK_FACTOR * estimate_logits_bytes(T, V, None)
    details["logits"] = f"plain loss: {T:,} rows x {V:,} vocab in fp32"
    if T > t.loss_chunk_size:
        chunked = LOSS_PEAK_FACTOR * estimate_logits_bytes(T, V, t.loss_chunk_size)
        notes.append(f"training.loss=chunked would hold {chunked / GB:.2f} GB of logits instead of "
                     f"{logits / GB:.2f} GB")
    return logits


def _grad_transient(recipe: Recipe, shape: ModelShape, e: Engine, w: _Weights, tr: _Trainable,
                    details: dict[str, str]) -> int:
    """End of backward: the embedding / lm_head gradients are produced as new [vocab, hidden] tensors and then
    added into the accumulated .grad (or a ZeRO bucket); a tied matrix sums its two uses first."""
    vh = shape.vocab * shape.hidden
    if recipe.method == "full":
        grad_transient = vh * e.p * (3 if shape.tied else 1)
    elif tr.emb_train:
        grad_transient = vh * w.emb_a
    else:
        grad_transient = 0
    if grad_transient:
        times = "3 x " if recipe.method == "full" and shape.tied else ""
        details["grad_tmp"] = f"{times}vocab x hidden gradient (end of backward)"
    return grad_transient


def _buffers(recipe: Recipe, shape: ModelShape, e: Engine, gradients: float, details: dict[str, str]) -> float:
    """Communication and dequantization buffers (the allocator slack is added at the peak)."""
    zo, b, d = e.zo, e.b, e.d
    buffers = 0.0
    ov = [f"CUDA context {CUDA_CONTEXT_BYTES / GB:.1f} GB", f"allocator slack {ALLOCATOR_SLACK:.0%}"]
    if d > 1:
        buffers += NCCL_BYTES
        ov.append(f"NCCL {NCCL_BYTES / GB:.1f} GB")
    if e.ds and e.stage_like in (1, 2) and zo.get("contiguous_gradients", True):
        ipg = num(zo.get("reduce_bucket_size"), 5e8) * b * (2 if zo.get("overlap_comm", False) else 1)
        buffers += ipg
        ov.append(f"ZeRO reduce buckets {ipg / GB:.1f} GB")
    elif e.ds and e.stage_like >= 3:
        red = 2 * num(zo.get("reduce_bucket_size"), shape.hidden ** 2) * b
        buffers += red
        ov.append(f"ZeRO-3 reduce buckets {red / GB:.2f} GB")
    if not e.ds and not e.fsdp and d > 1:
        buffers += gradients  # DDP reducer buckets: a second copy of the gradients
        ov.append("DDP gradient buckets")
    if recipe.method == "qlora":
        # 4-bit kernels dequantize for training; autograd keeps the 16-bit weights of the recomputed layer
        deq = shape.linear_weight_params / shape.layers * b
        buffers += deq
        ov.append(f"dequantized layer weights {deq / GB:.2f} GB")
    details["overhead"] = ", ".join(ov)
    return buffers


# --------------------------------------------------------------------------- estimate


def estimate_memory(recipe: Recipe, gpus: int = 1, model_config: dict[str, Any] | None = None, *,
                    reference: bool = False) -> MemoryEstimate:
    """Estimate per-device training memory for `recipe` on `gpus` devices.

    `model_config` is a config.json dict (default: the recipe's own config.json, read without weights).
    `reference=True` models Qwen's 2023 finetune.py where it differs from qwen-tune: the original
    Qwen-1 loss (logits, a shifted copy and the cross-entropy in the compute dtype -- fp32 under
    torch autocast, 16-bit under DeepSpeed) and torch's foreach AdamW (one parameter-sized
    temporary at the step); the recipe's `training.loss` is then ignored.
    """
    if gpus < 1:
        raise ConfigError(f"--gpus must be >= 1, got {gpus}")
    cfg = model_config if model_config is not None else load_model_config(recipe)
    shape = ModelShape.from_config(cfg)
    notes: list[str] = list(shape.notes)
    if cfg.get("qwen_tune_preset"):
        notes.insert(0, f"model {recipe.model.path!r}: no local config.json, sized from the published "
                        f"{cfg['qwen_tune_preset']} config (estimate/presets.py)")
    details: dict[str, str] = {}
    recipe = as_sequences(recipe, notes)  # stage: dpo -> two sequences per pair (see .preference)

    e = engine(recipe, gpus, notes)
    tr = _trainable(recipe, shape, cfg, notes)
    w = _weights(recipe, shape, e, tr, details, notes)
    w.weights += reference_weights(recipe, tr.N, e.p, e.stage_like, e.d, details)
    s = _states(recipe, e, tr, w, reference, details, notes)
    parts, act_stored, act_recompute, T = _activations(recipe, shape, e, w, tr, details)
    logits = _logits(recipe, shape.vocab, T, e, reference, details, notes)
    grad_transient = _grad_transient(recipe, shape, e, w, tr, details)
    buffers = _buffers(recipe, shape, e, s.gradients, details)

    # ---- the peak over the three phases of a step
    common = w.weights + s.gradients + s.optimizer + buffers
    fb = common + act_stored + max(logits, act_recompute)
    st = common + s.step_transient
    be = common + grad_transient
    fb_total, be_total, st_total = (x * (1 + ALLOCATOR_SLACK) + CUDA_CONTEXT_BYTES for x in (fb, be, st))
    peak = max(fb, be, st)
    overhead = buffers + CUDA_CONTEXT_BYTES + ALLOCATOR_SLACK * peak
    total = max(fb_total, be_total, st_total)
    phase = "forward/backward" if fb == peak else "end-of-backward" if be == peak else "optimizer step"

    method = recipe.method + (" + trainable embeddings" if tr.emb_train else "") + (
        f" ({tr.q_method} 4-bit)" if recipe.method == "qlora" else "")
    if e.d > 1 and e.stage is None and not e.fsdp:
        notes.append(f"{e.d} devices without DeepSpeed/FSDP: plain data parallel, every device holds everything")
    if recipe.training.loss == "chunked" and not reference:
        notes.append("with liger-kernel installed on CUDA, the fused loss needs less than the chunked estimate")
    return MemoryEstimate(
        weights=int(w.weights), gradients=int(s.gradients), optimizer=int(s.optimizer),
        activations=int(act_stored + act_recompute), logits=int(logits), overhead=int(overhead), total=int(total),
        activations_stored=int(act_stored), activations_recompute=int(act_recompute),
        step_transient=int(s.step_transient), grad_transient=int(grad_transient), peak_phase=phase,
        forward_backward=int(fb_total), backward_end=int(be_total), optimizer_step=int(st_total),
        cpu_offload=int(s.cpu_offload), params_total=tr.N, params_trainable=tr.trainable_n, lora_params=tr.lora_n,
        tokens_per_step=T, gpus=e.d, zero_stage=e.stage, precision=e.precision,
        weight_dtype=e.weight_dtype if not e.mixed else e.precision, method=method, activation_parts=parts,
        details=details, notes=notes)
