"""`qwen-tune estimate`: analytic parameter counts, the Qwen-1 README table, and CPU measurements."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qwen_tune.config import ConfigError, recipe_from_dict
from qwen_tune.train.loss import estimate_logits_bytes
from qwen_tune.estimate import (
    LOSS_PEAK_FACTOR,
    QWEN1_PRESETS,
    QWEN1_PUBLISHED,
    ModelShape,
    estimate_memory,
    reference_comparison,
)

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "memory_estimator.md"

# The Qwen-1 README rows the estimate misses by more than 15% (documented in docs/memory_estimator.md).
KNOWN_OUTSIDE_15 = {("qwen-7b", "lora_multinode", 4096), ("qwen-7b", "lora_multinode", 8192)}

TINY = {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 256, "intermediate_size": 1024,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True}
QWEN2_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_recipe(**over) -> object:
    data = {"model": {"from_config": "unused.json", "is_chat": True}, "method": "lora",
            "data": {"max_len": 512, "packing": False},
            "training": {"batch_size": 1, "precision": "bf16", "gradient_checkpointing": True}}
    for key, value in over.items():
        node = data
        *path, leaf = key.split("__")
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return recipe_from_dict(data)


# --------------------------------------------------------------------------- parameter counts

SMALL_CONFIGS = {
    "qwen2": {"model_type": "qwen2", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 160,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True},
    "qwen3": {"model_type": "qwen3", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 160,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32},
    "qwen2_moe": {"model_type": "qwen2_moe", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 160,
                  "moe_intermediate_size": 32, "shared_expert_intermediate_size": 96, "num_experts": 8,
                  "num_experts_per_tok": 2, "num_hidden_layers": 3, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "mlp_only_layers": [1]},
    "qwen3_moe": {"model_type": "qwen3_moe", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 160,
                  "moe_intermediate_size": 32, "num_experts": 8, "num_experts_per_tok": 2, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16},
    "qwen3_next": {"model_type": "qwen3_next", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 160,
                   "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "num_experts": 4,
                   "num_experts_per_tok": 2, "num_hidden_layers": 4, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "head_dim": 16, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
                   "linear_key_head_dim": 16, "linear_value_head_dim": 16, "full_attention_interval": 4},
    "qwen": {"model_type": "qwen", "vocab_size": 1000, "hidden_size": 96, "kv_channels": 16,
             "num_attention_heads": 6, "intermediate_size": 384, "num_hidden_layers": 3, "no_bias": True},
}


def _meta_model(cfg: dict):
    import qwen_tune.models.qwen1  # noqa: F401 - registers model_type "qwen"
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(cfg)
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    with torch.device("meta"):  # shapes only, no memory
        return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("name", sorted(SMALL_CONFIGS))
def test_parameter_and_lora_counts_match_transformers_and_peft(name):
    from peft import LoraConfig, get_peft_model

    from qwen_tune.models.families import get_family

    cfg = SMALL_CONFIGS[name]
    shape = ModelShape.from_config(cfg)
    assert shape.total_params == sum(p.numel() for p in _meta_model(cfg).parameters())
    for targets in (list(get_family(cfg["model_type"]).lora_targets), "all-linear"):
        peft_model = get_peft_model(_meta_model(cfg), LoraConfig(r=8, target_modules=targets))
        real = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
        assert shape.lora_params(targets, 8) == real, targets


def test_qwen1_presets_have_published_sizes():
    sizes = {k: ModelShape.from_config(v).total_params / 1e9 for k, v in QWEN1_PRESETS.items()}
    # Qwen-1 model cards: 1.8B, 7.7B, 14.2B, 72.3B parameters
    assert sizes["qwen-1.8b"] == pytest.approx(1.84, abs=0.01)
    assert sizes["qwen-7b"] == pytest.approx(7.72, abs=0.01)
    assert sizes["qwen-14b"] == pytest.approx(14.17, abs=0.01)
    assert sizes["qwen-72b"] == pytest.approx(72.29, abs=0.01)
    # LoRA r=64 on c_attn/c_proj(attn+mlp)/w1/w2 of Qwen-7B
    qwen7b = ModelShape.from_config(QWEN1_PRESETS["qwen-7b"])
    assert qwen7b.lora_params(["c_attn", "c_proj", "w1", "w2"], 64) == 143_130_624


# --------------------------------------------------------------------------- the Qwen-1 README table


def test_published_table_within_15_percent():
    rows = reference_comparison()
    assert len(rows) == sum(len(v) for v in QWEN1_PUBLISHED.values()) == 81
    bad = [r for r in rows if abs(r["error_pct"]) > 15 and (r["model"], r["method"], r["seq"]) not in KNOWN_OUTSIDE_15]
    assert not bad, "\n".join(map(str, bad))
    # the rows documented as outside 15% really are (update the docs when the model improves)
    known = [r for r in rows if (r["model"], r["method"], r["seq"]) in KNOWN_OUTSIDE_15]
    assert len(known) == len(KNOWN_OUTSIDE_15) and all(abs(r["error_pct"]) > 15 for r in known)


def test_docs_table_matches_the_estimator():
    text = DOC.read_text()
    documented = {}
    for m in re.finditer(r"^\| (qwen-[\d.]+b) \| (\w+) \| (\d) \| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([+-][\d.]+)% \|",
                         text, re.M):
        documented[(m[1], m[2], int(m[4]))] = (float(m[5]), float(m[6]), float(m[7]))
    rows = reference_comparison()
    assert len(documented) == len(rows)
    for r in rows:
        assert documented[(r["model"], r["method"], r["seq"])] == (r["published"], r["estimate"], r["error_pct"]), r


# --------------------------------------------------------------------------- behaviour of the model


def test_logits_use_estimate_logits_bytes_and_chunking():
    V = TINY["vocab_size"]
    plain = estimate_memory(make_recipe(training__loss="plain", data__max_len=8192), model_config=TINY)
    chunked = estimate_memory(make_recipe(training__loss="chunked", training__loss_chunk_size=1024,
                                          data__max_len=8192), model_config=TINY)
    assert plain.logits == int(LOSS_PEAK_FACTOR * estimate_logits_bytes(8192, V, None))
    assert chunked.logits == int(LOSS_PEAK_FACTOR * estimate_logits_bytes(8192, V, 1024))
    assert chunked.total < plain.total
    # packing keeps tokens per step = batch_size x max_len
    packed = estimate_memory(make_recipe(training__batch_size=4, data__packing=True, data__max_len=512),
                             model_config=TINY)
    assert packed.tokens_per_step == 2048


def test_packed_sdpa_rows_are_charged_no_mask():
    """Packed SDPA rows run per-sample attention (no T x T mask), like flash-attention varlen; padded rows still
    get transformers' mask."""
    def act(attn: str, packing: bool) -> int:
        return estimate_memory(make_recipe(training__batch_size=4, data__packing=packing, data__max_len=8192,
                                           model__attn_implementation=attn), model_config=TINY).activations

    assert act("sdpa", True) == act("flash_attention_2", True)
    assert act("sdpa", False) >= act("flash_attention_2", False) + 4 * 8192 ** 2


def test_methods_precision_and_checkpointing_order():
    cfg = QWEN1_PRESETS["qwen-7b"]
    targets = ["c_attn", "c_proj", "w1", "w2"]
    est = {m: estimate_memory(make_recipe(method=m, lora__target_modules=targets, data__max_len=2048), model_config=cfg)
           for m in ("qlora", "lora", "full")}
    assert est["qlora"].total < est["lora"].total < est["full"].total
    assert est["qlora"].weights < 0.6 * est["lora"].weights  # nf4 blocks; embeddings upcast to fp32 by peft
    emb = estimate_memory(make_recipe(lora__target_modules=targets, lora__trainable_embeddings=True), model_config=cfg)
    plain = estimate_memory(make_recipe(lora__target_modules=targets), model_config=cfg)
    assert emb.params_trainable - plain.params_trainable == 2 * 151936 * 4096
    no_gc = estimate_memory(make_recipe(method="lora", lora__target_modules=targets, data__max_len=2048,
                                        training__gradient_checkpointing=False), model_config=cfg)
    assert no_gc.activations > 5 * est["lora"].activations
    # full training without DeepSpeed under bf16 autocast loads fp32 master weights (train/precision.load_dtype):
    # model.dtype=auto counts as fp32; an explicit model.dtype=bf16 trains bf16 weights with bf16 AdamW states.
    full_auto = estimate_memory(make_recipe(method="full"), model_config=cfg)
    full_bf16 = estimate_memory(make_recipe(method="full", model__dtype="bf16"), model_config=cfg)
    full_fp32 = estimate_memory(make_recipe(method="full", model__dtype="fp32"), model_config=cfg)
    assert full_auto.weight_dtype == "fp32" and full_auto.weights == full_fp32.weights
    assert full_bf16.optimizer == 2 * full_bf16.weights
    assert full_fp32.weights == 2 * full_bf16.weights and full_fp32.optimizer == 2 * full_bf16.optimizer


def test_zero_stages_and_offload_split_over_gpus():
    cfg = QWEN1_PRESETS["qwen-7b"]
    n = ModelShape.from_config(cfg).total_params

    def run(ds, gpus):
        return estimate_memory(make_recipe(method="full", deepspeed=f"ds_configs/{ds}.json"), gpus=gpus,
                               model_config=cfg)

    z2, z3, off = run("zero2", 8), run("zero3", 8), run("zero3_offload", 8)
    assert z2.optimizer == pytest.approx(12 * n / 8, rel=1e-6)  # fp32 master + Adam m, v, partitioned
    assert z2.gradients == pytest.approx(2 * n / 8, rel=1e-6)
    assert z2.weights == pytest.approx(2 * n, rel=1e-6)  # ZeRO-2 keeps full 16-bit weights
    assert z3.weights < z2.weights / 4  # ZeRO-3 partitions them (+ a gathered working set)
    assert off.optimizer == 0 and off.cpu_offload >= 12 * n / 8
    assert off.total < z3.total < z2.total
    assert run("zero3", 16).total < z3.total
    with pytest.raises(ConfigError, match="ZeRO-3"):
        estimate_memory(make_recipe(method="qlora", deepspeed="ds_configs/zero3.json"), model_config=cfg)


def test_moe_and_hybrid_configs_estimate():
    for name in ("qwen2_moe", "qwen3_moe", "qwen3_next"):
        est = estimate_memory(make_recipe(lora__dropout=0.0), model_config=SMALL_CONFIGS[name])
        assert est.total > est.weights > 0


# --------------------------------------------------------------------------- CLI


def test_cli_estimate_prints_every_part(capsys):
    from qwen_tune.cli.main import main

    assert main(["estimate", "--recipe", "tiny", "data.max_len=1024"]) == 0
    out = capsys.readouterr().out
    for part in ("weights", "gradients", "optimizer states", "activations", "logits", "CUDA/framework overhead",
                 "total (peak)", "tokens per micro-step: 4,096"):
        assert part in out
    assert main(["estimate", "--recipe", "full_ds", "--config", "qwen-7b", "--gpus", "8", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["zero_stage"] == 3 and data["gpus"] == 8 and data["total"] < 40e9


def test_cli_estimate_without_local_config_says_what_to_do(capsys):
    from qwen_tune.cli.main import main

    assert main(["estimate", "--recipe", "lora", "model.path=/nonexistent/dir"]) == 2
    assert "--config" in capsys.readouterr().err


# --------------------------------------------------------------------------- measured on CPU

# Saved-tensor accounting is exact bookkeeping (no allocator noise): 15%.
@pytest.mark.parametrize("method,dropout", [("lora", 0.05), ("lora", 0.0), ("full", 0.0)])
def test_activation_model_matches_saved_tensors(method, dropout):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = dict(TINY, vocab_size=1000)  # activations do not depend on the vocabulary
    T = 128
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**{k: v for k, v in cfg.items() if k != "model_type"},
                                         attn_implementation="sdpa"))
    model.train()
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout,
                                                 target_modules=QWEN2_TARGETS))
        model.enable_input_require_grads()
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            saved[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        inner.model(input_ids=torch.randint(0, 1000, (1, T)))
    measured = sum(saved.values())
    recipe = make_recipe(method=method, lora__r=16, lora__dropout=dropout, data__max_len=T,
                         training__precision="fp32", training__gradient_checkpointing=False)
    parts = estimate_memory(recipe, model_config=cfg).activation_parts
    estimated = parts["layers"] + parts["head"] + parts["embedding"]
    assert estimated == pytest.approx(measured, rel=0.15)


MEASURE = r"""
import ctypes, gc, json, sys
import torch
torch.set_num_threads(1)
from peft import LoraConfig, get_peft_model
from transformers import Qwen2Config, Qwen2ForCausalLM

from qwen_tune.train.loss import causal_lm_loss

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

cfg, cases = json.loads(sys.argv[1]), json.loads(sys.argv[2])
libc = ctypes.CDLL("libc.so.6")
out = []
for case in cases:
    gc.collect(); libc.malloc_trim(0)
    T = case["tokens"]
    ids = torch.randint(0, cfg["vocab_size"], (1, T), generator=torch.Generator().manual_seed(0))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS counter (VmHWM)
    base = status("VmRSS")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**cfg))
    model.train()
    if case["method"] == "lora":
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                                 target_modules=case["targets"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    for step in range(2):
        if case["loss"] == "plain":
            loss = model(input_ids=ids, labels=ids).loss
        else:
            hidden = inner.model(input_ids=ids).last_hidden_state
            loss = causal_lm_loss(hidden, inner.lm_head, ids, chunk_size=case["chunk"])
            del hidden
        loss.backward()
        del loss
        if step == 0:
            opt.step()  # Adam states now exist; gradients stay allocated, as under gradient accumulation
    out.append({**case, "peak": status("VmHWM") - base})
    del model, opt, inner
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to measure peak RSS")
def test_estimate_matches_measured_cpu_peak():
    """Tiny Qwen2 with the real 151,936-token vocabulary, fp32, two forward/backward passes and one fused AdamW
    step, measured as the peak process RSS above the pre-model baseline (large allocations go straight to mmap so
    freed memory leaves RSS). CPU RSS also holds allocator and library buffers, hence a loose 35% tolerance."""
    cases = [
        {"method": "lora", "loss": "plain", "tokens": 128, "targets": QWEN2_TARGETS},
        {"method": "full", "loss": "plain", "tokens": 128},
        {"method": "lora", "loss": "chunked", "tokens": 256, "chunk": 64, "targets": QWEN2_TARGETS},
    ]
    cfg = {k: v for k, v in TINY.items() if k != "model_type"} | {"attn_implementation": "sdpa"}
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536",
               MALLOC_ARENA_MAX="2", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(cfg), json.dumps(cases)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured = json.loads(proc.stdout.split("RESULT ", 1)[1])
    report = []
    for case in measured:
        recipe = make_recipe(method=case["method"], lora__r=16, lora__dropout=0.05, data__max_len=case["tokens"],
                             training__precision="fp32", training__gradient_checkpointing=False,
                             training__loss=case["loss"], training__loss_chunk_size=case.get("chunk", 2048))
        est = estimate_memory(recipe, model_config=TINY)
        report.append((case["method"], case["loss"], case["peak"], est.state_peak, est.training_state))
    msg = "\n".join(f"{m} {l}: measured {p / 1e6:.0f} MB, estimate {e / 1e6:.0f} MB "
                    f"(weights+grads+optimizer+activations+logits {s / 1e6:.0f} MB)" for m, l, p, e, s in report)
    for _m, _l, peak, est_peak, state in report:
        assert est_peak == pytest.approx(peak, rel=0.35), msg
        assert state == pytest.approx(peak, rel=0.35), msg
    print(msg)
