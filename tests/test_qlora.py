"""Q-LoRA on 4-bit bases: GPTQ Int4 checkpoints (published layout, v1/v2 zero points, Qwen-1 and Qwen2) and
bitsandbytes NF4, on tiny models on CPU: quantize -> load -> train -> save -> reload -> merge, and the refusals.

The GPTQ tests run through qwen-tune's PyTorch path always, and through transformers' GPTQ integration (optimum +
gptqmodel) where those are installed (bash scripts/install_qlora.sh); NF4 needs bitsandbytes (same script).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import EXAMPLES, run_cli
from qwen_tune.config import ConfigError, load_recipe
from qwen_tune import quant as gptq
from qwen_tune.models.loading import build_from_config
from qwen_tune.train.loading import load_model
from qwen_tune.verify import compare_logits
from qwen_tune.train.run import run_training

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
HAS_GPTQMODEL = gptq.gptqmodel_available()
needs_bnb = pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes not installed (bash scripts/install_qlora.sh, "
                                                   "or pip install 'qwen-tune[nf4]')")
needs_gptqmodel = pytest.mark.skipif(not HAS_GPTQMODEL, reason="optimum/gptqmodel not installed "
                                                               "(bash scripts/install_qlora.sh)")

# Linear sizes are multiples of 128 so that group_size 128 applies as in the real models (one or two groups).
QWEN2 = {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 128, "intermediate_size": 256,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
         "tie_word_embeddings": False}
QWEN1 = {"model_type": "qwen", "vocab_size": 151936, "hidden_size": 128, "intermediate_size": 512,
         "num_hidden_layers": 2, "num_attention_heads": 4, "kv_channels": 32, "seq_length": 1024,
         "max_position_embeddings": 1024}
PROBE = torch.tensor([[151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198, 9707,
                       11, 1879, 0, 151645, 198, 151644, 77091, 198, 13048, 0, 151645]])


def _cos_max(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    return compare_logits(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]))


@torch.no_grad()
def _logits(model, ids=PROBE) -> torch.Tensor:
    model.eval()
    return model(input_ids=ids).logits.float()


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("calib") / "calib.json"
    p.write_text(json.dumps(json.loads((EXAMPLES / "example.json").read_text())[:24], ensure_ascii=False))
    return p


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    """Two short conversations: with batch_size 2 and packing every step sees the same row, so the loss falls
    steadily within a few steps even on a random model (a property of the flow, not of the data)."""
    recs = json.loads((EXAMPLES / "example.json").read_text())[24:26]
    p = tmp_path_factory.mktemp("data") / "small.json"
    p.write_text(json.dumps(recs, ensure_ascii=False))
    return p


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, calib) -> dict[str, Path]:
    """fp32 tiny Qwen2 and Qwen-1 checkpoints and their GPTQ Int4 versions made by `qwen-tune quantize`."""
    root = tmp_path_factory.mktemp("qlora_ckpts")
    out = {}
    for name, cfg in (("qwen2", QWEN2), ("qwen1", QWEN1)):
        (root / f"{name}.json").write_text(json.dumps(cfg))
        out[name] = build_from_config(root / f"{name}.json", root / name, seed=3)
    for name, fmt in (("qwen2", "v1"), ("qwen2", "v2"), ("qwen1", "v1")):
        dst = root / f"{name}-int4-{fmt}"
        verify = [] if fmt == "v1" else ["--no-verify"]  # the v1 runs check the reloaded logits
        assert run_cli("quantize", "--model", str(out[name]), "--out", str(dst), "--bits", "4", "--group-size", "128",
                       "--calib", str(calib), "--format", fmt, "--samples", "16", "--seq-len", "256", *verify) == 0
        out[f"{name}-int4-{fmt}"] = dst
    return out


# ------------------------------------------------------------------------------------------------ packing


def test_packing_layout_matches_auto_gptq():
    torch.manual_seed(0)
    vals = torch.randint(0, 16, (16, 24))
    words = gptq.pack_rows(vals, 4)
    assert words.dtype == torch.int32 and words.shape == (2, 24)
    # Row k of column j sits in word k // 8 at bit 4 * (k % 8).
    w = int(words[1, 5]) & 0xFFFFFFFF
    assert [(w >> (4 * i)) & 0xF for i in range(8)] == vals[8:16, 5].tolist()
    assert torch.equal(gptq.unpack_rows(words, 4), vals)
    assert torch.equal(gptq.unpack_cols(gptq.pack_cols(vals, 4), 4), vals)
    # Symmetric 4-bit: the true zero point is 8, stored as 7 in v1 (0x77777777) and as 8 in v2 (0x88888888).
    W = torch.randn(16, 256)
    for fmt, word in (("gptq", 0x77777777), ("gptq_v2", 0x88888888)):
        spec = gptq.GPTQSpec(format=fmt)
        packed = gptq.pack_layer(*gptq.rtn_quantize(W, spec), spec)
        assert packed["qzeros"].shape == (2, 2) and packed["scales"].dtype == torch.float16
        assert all(int(z) & 0xFFFFFFFF == word for z in packed["qzeros"].flatten())
        assert torch.equal(packed["g_idx"], torch.arange(256, dtype=torch.int32) // 128)


@pytest.mark.parametrize("sym", [True, False])
def test_dequantize_inverts_pack_for_both_formats(sym):
    torch.manual_seed(1)
    W = torch.randn(32, 256) * torch.linspace(0.1, 2, 256)
    W[:, :128] += 1.5  # an all-positive group: an asymmetric zero point of 0, which v1 stores as -1
    deq = {}
    for fmt in ("gptq", "gptq_v2"):
        spec = gptq.GPTQSpec(format=fmt, sym=sym)
        qint, scales, zeros = gptq.rtn_quantize(W, spec)
        p = gptq.pack_layer(qint, scales, zeros, spec)
        expected = (qint - zeros.repeat_interleave(128, 0).t()) * scales.half().float().repeat_interleave(128, 0).t()
        deq[fmt] = gptq.dequantize(p["qweight"], p["qzeros"], p["scales"], p["g_idx"], spec).t()
        torch.testing.assert_close(deq[fmt], expected, rtol=0, atol=0)
        # An arbitrary g_idx (act-order checkpoints) goes through the gather path: same result for the trivial one.
        gathered = gptq.dequantize(p["qweight"], p["qzeros"], p["scales"], p["g_idx"], spec, trivial=False).t()
        torch.testing.assert_close(gathered, deq[fmt], rtol=0, atol=0)
        # Round to nearest within the range: off by half a step at most (per group and row).
        step = scales.half().float().repeat_interleave(128, 0).t()
        assert ((deq[fmt] - W).abs() <= 0.51 * step).all()  # (+ the fp16 rounding of the scale)
    assert torch.equal(deq["gptq"], deq["gptq_v2"])


def test_dequantize_partial_groups_and_act_order_g_idx():
    torch.manual_seed(4)
    spec = gptq.GPTQSpec(group_size=128)
    W = torch.randn(16, 192)  # a last group of 64 columns
    qint, scales, zeros = gptq.rtn_quantize(W, spec)
    assert scales.shape == (2, 16)
    p = gptq.pack_layer(qint, scales, zeros, spec)
    groups = torch.arange(192) // 128
    want = (qint.t() - zeros[groups]) * scales.half().float()[groups]
    torch.testing.assert_close(gptq.dequantize(p["qweight"], p["qzeros"], p["scales"], None, spec), want,
                               rtol=0, atol=0)
    # desc_act checkpoints: g_idx is an arbitrary row -> group map; every row uses its own group's scale/zero.
    g_idx = torch.randint(0, 2, (192,), dtype=torch.int32)
    want = (qint.t() - zeros[g_idx.long()]) * scales.half().float()[g_idx.long()]
    torch.testing.assert_close(gptq.dequantize(p["qweight"], p["qzeros"], p["scales"], g_idx, spec), want,
                               rtol=0, atol=0)
    layer = gptq.GPTQLinear(192, 16, False, spec)
    layer.load_state_dict({**{k: p[k] for k in ("qweight", "qzeros", "scales")}, "g_idx": g_idx})
    x = torch.randn(3, 192)
    torch.testing.assert_close(layer(x), x @ want, rtol=1e-5, atol=1e-5)


def test_gptq_beats_round_to_nearest_on_correlated_inputs():
    torch.manual_seed(2)
    W = torch.randn(64, 256)
    X = torch.randn(2048, 256) @ torch.randn(256, 256) * 0.3
    spec = gptq.GPTQSpec()
    errors = {}
    for algo in ("gptq", "rtn"):
        if algo == "gptq":
            qint, s, z, _ = gptq.gptq_quantize(W, 2 * X.t() @ X / len(X), spec)
        else:
            qint, s, z = gptq.rtn_quantize(W, spec)
        p = gptq.pack_layer(qint, s, z, spec)
        Q = gptq.dequantize(p["qweight"], p["qzeros"], p["scales"], p["g_idx"], spec).t()
        errors[algo] = float(((X @ (Q - W).t()) ** 2).mean())
    assert errors["gptq"] < 0.7 * errors["rtn"], errors


# ------------------------------------------------------------------------------------------------ quantize


def test_quantize_writes_the_published_int4_layout(ckpts):
    src, out = ckpts["qwen1"], ckpts["qwen1-int4-v1"]
    config = json.loads((out / "config.json").read_text())
    q = config["quantization_config"]
    assert q["quant_method"] == "gptq" and q["bits"] == 4 and q["group_size"] == 128 and q["sym"] is True
    assert q["desc_act"] is False and q["checkpoint_format"] == "gptq"
    assert json.loads((out / "quantize_config.json").read_text())["bits"] == 4
    assert config["torch_dtype"] == "float16" and config["fp16"] is True and config["bf16"] is False
    for f in ("qwen.tiktoken", "tokenizer_config.json", "generation_config.json"):
        assert (out / f).is_file() and (out / f).read_bytes() == (src / f).read_bytes(), f
    with safe_open(str(out / "model.safetensors"), framework="pt") as fh:
        keys = set(fh.keys())
        t = {k: fh.get_tensor(k) for k in keys if k.startswith("transformer.h.0.")}
    # Qwen-1 names as in Qwen-7B-Chat-Int4: c_attn (bias) 128 -> 384, w1 128 -> 256, mlp.c_proj 256 -> 128.
    p = "transformer.h.0.attn.c_attn."
    assert t[p + "qweight"].dtype == torch.int32 and t[p + "qweight"].shape == (16, 384)
    assert t[p + "qzeros"].dtype == torch.int32 and t[p + "qzeros"].shape == (1, 48)
    assert t[p + "scales"].dtype == torch.float16 and t[p + "scales"].shape == (1, 384)
    assert t[p + "g_idx"].dtype == torch.int32 and t[p + "g_idx"].shape == (128,)
    assert t[p + "bias"].dtype == torch.float16 and p + "weight" not in keys
    assert t["transformer.h.0.mlp.c_proj.qzeros"].shape == (2, 16)
    assert "transformer.h.0.mlp.c_proj.bias" not in keys  # no_bias, as in Qwen-1
    assert "transformer.wte.weight" in keys and "lm_head.weight" in keys  # not quantized
    assert all(int(z) & 0xFFFFFFFF == 0x77777777 for z in t[p + "qzeros"].flatten())


@pytest.mark.parametrize("family", ["qwen2", "qwen1"])
def test_int4_logits_close_to_fp32(ckpts, family, capsys):
    fp = load_model(ckpts[family], dtype="fp32").model
    ref = _logits(fp)
    quant = load_model(ckpts[f"{family}-int4-v1"], dtype="fp32", gptq_backend="torch").model
    assert sum(isinstance(m, gptq.GPTQLinear) for m in quant.modules()) == (10 if family == "qwen1" else 14)
    got = _logits(quant)
    cos, diff = _cos_max(got, ref)
    scale = float(ref.abs().max())
    with capsys.disabled():
        print(f"\n[{family} Int4 (PyTorch path) vs fp32] cosine {cos:.5f}, max abs diff {diff:.4f} "
              f"(max |logit| {scale:.3f})")
    assert cos > 0.98 and diff < 0.3 * scale
    # Not a no-op: the quantized weights differ from the originals.
    assert diff > 1e-3
    if HAS_GPTQMODEL:  # transformers' GPTQ integration reads the same checkpoint to the same logits
        from transformers import GPTQConfig

        hf = load_model(ckpts[f"{family}-int4-v1"], dtype="fp32",
                        quantization_config=GPTQConfig(bits=4, backend="auto_trainable")).model
        hcos, hdiff = _cos_max(_logits(hf), got)
        with capsys.disabled():
            print(f"[{family} Int4 transformers+gptqmodel vs PyTorch path] cosine {hcos:.6f}, max abs diff {hdiff:.2e}")
        assert hcos > 0.9999 and hdiff < 1e-2 * scale


def test_v1_and_v2_zero_point_formats_load_and_agree(ckpts):
    v1, v2 = ckpts["qwen2-int4-v1"], ckpts["qwen2-int4-v2"]
    assert json.loads((v2 / "config.json").read_text())["quantization_config"]["checkpoint_format"] == "gptq_v2"
    a, b = load_file(v1 / "model.safetensors"), load_file(v2 / "model.safetensors")
    qz = "model.layers.0.self_attn.q_proj.qzeros"
    assert torch.equal(a[qz] + 0x11111111, b[qz])  # same zero points, stored zero-1 (v1) vs zero (v2)
    assert torch.equal(a["model.layers.0.self_attn.q_proj.qweight"], b["model.layers.0.self_attn.q_proj.qweight"])
    l1 = _logits(load_model(v1, dtype="fp32", gptq_backend="torch").model)
    l2 = _logits(load_model(v2, dtype="fp32", gptq_backend="torch").model)
    torch.testing.assert_close(l1, l2, rtol=0, atol=0)
    if HAS_GPTQMODEL:
        from transformers import GPTQConfig

        def hf(p):
            return _logits(load_model(p, dtype="fp32", quantization_config=GPTQConfig(bits=4, backend="auto_trainable"))
                           .model)

        h1, h2 = hf(v1), hf(v2)
        torch.testing.assert_close(h1, h2, rtol=0, atol=1e-5)
        assert _cos_max(h1, l1)[0] > 0.9999


# ------------------------------------------------------------------------------------------------ Q-LoRA training


def qlora_recipe(base: Path, data: Path, out: Path, *extra: str):
    overrides = [f"model.path={base}", f"data.path={data}", f"output.dir={out}", "method=qlora",
                 "data.max_len=64", "training.batch_size=2", "training.grad_accum=1", "training.max_steps=4",
                 "training.lr=1e-2", "training.gradient_checkpointing=true", "training.warmup_ratio=0",
                 "training.weight_decay=0", "training.scheduler=constant", "output.logging_steps=1",
                 "output.report_to=[]", "output.save_steps=100", "lora.r=8", "lora.alpha=16", "lora.dropout=0",
                 *extra]
    return load_recipe("qlora", overrides)


def _targets(family: str) -> str:
    # The family's default targets plus lm_head: on a random model LoRA on the head is what moves the loss quickly.
    return ("lora.target_modules=[c_attn,c_proj,w1,w2,lm_head]" if family == "qwen1"
            else "lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head]")


@pytest.mark.parametrize("backend", ["torch", pytest.param("gptqmodel", marks=needs_gptqmodel)])
def test_gradients_reach_only_lora_weights_on_a_gptq_base(ckpts, backend, monkeypatch):
    from qwen_tune.models.families import get_family
    from qwen_tune.train.methods import apply_method
    from qwen_tune.quant.backend import quantization_kwargs

    monkeypatch.setenv("QWEN_TUNE_GPTQ_BACKEND", backend)
    base = ckpts["qwen2-int4-v1"]
    recipe = qlora_recipe(base, EXAMPLES / "example.json", Path("unused"), _targets("qwen2"))
    loaded = load_model(base, dtype="fp32", **quantization_kwargs(recipe, base))
    model = apply_method(loaded.model, recipe, get_family("qwen2"), True)
    packed = {n: b.clone() for n, b in model.named_buffers() if n.endswith(("qweight", "qzeros", "scales"))}
    assert packed
    model.train()
    out = model(input_ids=PROBE, labels=PROBE)
    out.loss.backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    with_grad = [n for n, p in model.named_parameters() if p.grad is not None]
    assert trainable and all("lora_" in n for n in trainable)
    assert set(with_grad) == set(trainable)
    assert any(float(p.grad.abs().max()) > 0 for n, p in model.named_parameters() if "lora_B" in n)  # B starts at 0
    for n, b in model.named_buffers():  # the quantized base is untouched
        if n in packed:
            assert torch.equal(b, packed[n]), n


@pytest.mark.slow
@pytest.mark.parametrize("family, backend", [
    ("qwen2", "torch"), ("qwen1", "torch"), pytest.param("qwen2", "gptqmodel", marks=needs_gptqmodel)])
def test_qlora_on_gptq_trains_saves_reloads_and_merges(ckpts, small_data, tmp_path, family, backend, monkeypatch,
                                                       capsys):
    from transformers import AutoModelForCausalLM

    from qwen_tune.quant.training import load_adapter

    monkeypatch.setenv("QWEN_TUNE_GPTQ_BACKEND", backend)
    base = ckpts[f"{family}-int4-v1"]
    out = tmp_path / "adapter"
    r = run_training(qlora_recipe(base, small_data, out, _targets(family)))
    losses = [h["loss"] for h in r.log_history if "loss" in h]
    with capsys.disabled():
        print(f"\n[Q-LoRA GPTQ {family} {backend}] losses {[round(x, 3) for x in losses]}")
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.5 and losses[-1] == min(losses)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["trainable_params"] < 0.2 * summary["total_params"]
    saved = load_file(out / "adapter_model.safetensors")
    assert saved and all("lora_" in k for k in saved)  # chat checkpoint, Q-LoRA: no modules_to_save
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)

    # Reload onto the quantized base (PyTorch path, whichever backend trained): the adapter changes the model.
    quantized = load_model(base, dtype="fp32", gptq_backend="torch").model
    plain = _logits(quantized)
    tuned = _logits(load_adapter(quantized, out))
    assert (tuned - plain).abs().max() > 1e-2

    # Merge onto the dequantized GPTQ base (no --base), verified against base+adapter, and against Q-LoRA logits.
    merged = tmp_path / "merged"
    assert run_cli("merge-adapter", "--adapter", str(out), "--out", str(merged)) == 0
    text = capsys.readouterr().out
    assert "dequantized" in text and "verification: max abs logit diff" in text
    cfg = json.loads((merged / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["torch_dtype"] == "float16"
    assert not (merged / "quantize_config.json").exists() and not (merged / "qwen_tune_dequantized.json").exists()
    merged_logits = _logits(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32))
    cos, diff = _cos_max(merged_logits, tuned)
    with capsys.disabled():
        print(f"[Q-LoRA GPTQ {family} {backend}] merged (fp16) vs Q-LoRA model: cosine {cos:.6f}, max abs diff "
              f"{diff:.2e} (max |logit| {float(tuned.abs().max()):.3f})")
    assert diff < 2e-3 * max(1.0, float(tuned.abs().max()))

    if (family, backend) != ("qwen2", "torch"):
        return  # the rest does not depend on the family or the training backend
    # With the original full-precision checkpoint as --base instead: a full-precision merge, told so.
    merged_fp = tmp_path / "merged-fp"
    assert run_cli("merge-adapter", "--adapter", str(out), "--out", str(merged_fp), "--base",
                   str(ckpts[family]), "--dtype", "fp32") == 0
    assert "quantized (gptq) base" in capsys.readouterr().out
    fp_logits = _logits(AutoModelForCausalLM.from_pretrained(merged_fp, dtype=torch.float32))
    assert _cos_max(fp_logits, tuned)[0] > 0.95

    # Re-quantizing the merged model gives an Int4 checkpoint again (the documented step).
    requant = tmp_path / "merged-int4"
    assert run_cli("quantize", "--model", str(merged), "--out", str(requant), "--algorithm", "rtn", "--no-verify") == 0
    rq = _logits(load_model(requant, dtype="fp32", gptq_backend="torch").model)
    assert _cos_max(rq, merged_logits)[0] > 0.95


# ------------------------------------------------------------------------------------------------ NF4


@needs_bnb
def test_nf4_eval_then_train_and_only_lora_trains(ckpts):
    from bitsandbytes.nn import Linear4bit

    from qwen_tune.models.families import get_family
    from qwen_tune.train.methods import apply_method
    from qwen_tune.quant.backend import quantization_kwargs
    from qwen_tune.quant.training import prepare_loaded_model

    base = ckpts["qwen2"]
    recipe = qlora_recipe(base, EXAMPLES / "example.json", Path("unused"), "quantization.method=nf4",
                          "lora.target_modules=[q_proj,v_proj,down_proj]")
    kwargs = quantization_kwargs(recipe, base)
    assert kwargs["quantization_config"].bnb_4bit_use_double_quant is True
    model = prepare_loaded_model(load_model(base, dtype="fp32", **kwargs).model)
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert len(layers) == 14 and all(m.support_avx512bf16_for_cpu is False for m in layers)
    model = apply_method(model, recipe, get_family("qwen2"), True)
    model.eval()
    with torch.no_grad():  # an evaluation first: on AVX512-BF16 CPUs this used to repack the weights
        model(input_ids=PROBE)
    model.train()
    out = model(input_ids=PROBE, labels=PROBE)
    out.loss.backward()
    assert all("lora_" in n for n, p in model.named_parameters() if p.grad is not None)
    assert any(p.grad is not None for n, p in model.named_parameters() if "lora_B" in n)


@needs_bnb
@pytest.mark.slow
def test_nf4_qlora_with_evaluation_trains_saves_and_merges(ckpts, small_data, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    base = ckpts["qwen2"]
    out = tmp_path / "adapter"
    r = run_training(qlora_recipe(base, small_data, out, "quantization.method=nf4", _targets("qwen2"),
                                  f"data.eval_path={small_data}", "training.eval_steps=2"))
    losses = [h["loss"] for h in r.log_history if "loss" in h]
    evals = [h["eval_loss"] for h in r.log_history if "eval_loss" in h]
    with capsys.disabled():
        print(f"\n[Q-LoRA NF4 qwen2] losses {[round(x, 3) for x in losses]}, eval {[round(x, 3) for x in evals]}")
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.5 and losses[-1] == min(losses)
    assert len(evals) >= 2 and evals[-1] < evals[0]  # evaluated at step 2, trained on afterwards
    adapter_cfg = json.loads((out / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str(base)  # the full-precision checkpoint (nf4 on load)

    nf4 = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32))
    tuned = _logits(PeftModel.from_pretrained(nf4, out))
    merged = tmp_path / "merged"
    assert run_cli("merge-adapter", "--adapter", str(out), "--out", str(merged)) == 0
    assert "quantized (nf4) base" in capsys.readouterr().out
    merged_logits = _logits(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32))
    cos, diff = _cos_max(merged_logits, tuned)
    with capsys.disabled():
        print(f"[Q-LoRA NF4 qwen2] merged (full-precision base + LoRA) vs NF4 + LoRA: cosine {cos:.5f}, "
              f"max abs diff {diff:.4f}")
    assert cos > 0.98


# ------------------------------------------------------------------------------------------------ refusals


def test_bf16_with_gptq_is_refused_before_loading(ckpts, tmp_path):
    for override in ("training.precision=bf16", "model.dtype=bf16"):
        with pytest.raises(ConfigError, match="bf16.*GPTQ.*fp16"):
            run_training(qlora_recipe(ckpts["qwen2-int4-v1"], EXAMPLES / "example.json", tmp_path / "o", override))


def test_qlora_under_zero3_or_fsdp_is_refused(ckpts, tmp_path):
    with pytest.raises(ConfigError, match="ZeRO-3"):
        run_training(qlora_recipe(ckpts["qwen2-int4-v1"], EXAMPLES / "example.json", tmp_path / "o",
                                  "deepspeed=ds_configs/zero3.json"))
    with pytest.raises(ConfigError, match="FSDP"):
        run_training(qlora_recipe(ckpts["qwen2-int4-v1"], EXAMPLES / "example.json", tmp_path / "o",
                                  "fsdp=full_shard auto_wrap"))


def test_gptq_checkpoint_without_its_quantization_config(ckpts, tmp_path, capsys):
    bare = tmp_path / "no-qconfig"
    shutil.copytree(ckpts["qwen2-int4-v1"], bare)
    (bare / "quantize_config.json").unlink()
    cfg = json.loads((bare / "config.json").read_text())
    del cfg["quantization_config"]
    (bare / "config.json").write_text(json.dumps(cfg))
    for method in ("qlora", "lora"):
        rc = run_cli("train", "--recipe", "qlora", f"model.path={bare}", f"method={method}",
                     f"data.path={EXAMPLES / 'example.json'}", f"output.dir={tmp_path / 'o'}", "output.report_to=[]")
        err = capsys.readouterr().err.strip()
        assert rc == 2 and "GPTQ tensors" in err and "no quantization config" in err, err
        assert "Traceback" not in err and len(err.splitlines()) == 1
    # quantize_config.json alone (auto-gptq's file) is enough.
    shutil.copy2(ckpts["qwen2-int4-v1"] / "quantize_config.json", bare / "quantize_config.json")
    got = _logits(load_model(bare, dtype="fp32", gptq_backend="torch").model)
    want = _logits(load_model(ckpts["qwen2-int4-v1"], dtype="fp32", gptq_backend="torch").model)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_gptq_checkpoint_outside_qlora_and_nf4_on_gptq_are_refused(ckpts, tmp_path):
    with pytest.raises(ConfigError, match="method=qlora"):
        run_training(qlora_recipe(ckpts["qwen2-int4-v1"], EXAMPLES / "example.json", tmp_path / "o", "method=lora"))
    with pytest.raises(ConfigError, match="already GPTQ-quantized"):
        run_training(qlora_recipe(ckpts["qwen2-int4-v1"], EXAMPLES / "example.json", tmp_path / "o",
                                  "quantization.method=nf4"))


def test_modules_to_save_refused_on_a_quantized_base(ckpts, tmp_path, caplog):
    from qwen_tune.models.families import get_family
    from qwen_tune.train.methods import lora_modules_to_save

    recipe = qlora_recipe(ckpts["qwen2-int4-v1"], EXAMPLES / "example.json", tmp_path / "o",
                          "lora.modules_to_save=[embed_tokens,lm_head]")
    with pytest.raises(ConfigError, match="modules_to_save.*Q-LoRA"):
        lora_modules_to_save(recipe, get_family("qwen2"), is_chat=True)
    caplog.set_level(logging.WARNING)
    auto = qlora_recipe(ckpts["qwen2-int4-v1"], EXAMPLES / "example.json", tmp_path / "o")
    assert lora_modules_to_save(auto, get_family("qwen2"), is_chat=False) is None  # a base checkpoint
    assert "stay frozen" in caplog.text and "modules_to_save" in caplog.text


def test_missing_optional_dependencies_name_the_extra(ckpts, tmp_path, monkeypatch):
    import sys

    from qwen_tune.quant import backend as quant

    nf4 = qlora_recipe(ckpts["qwen2"], EXAMPLES / "example.json", tmp_path / "o", "quantization.method=nf4")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    with pytest.raises(ConfigError, match=r"bitsandbytes.*qwen-tune\[nf4\]"):
        quant.quantization_kwargs(nf4, ckpts["qwen2"])
    monkeypatch.setattr(quant, "gptqmodel_available", lambda: False)
    monkeypatch.setenv("QWEN_TUNE_GPTQ_BACKEND", "gptqmodel")
    g = qlora_recipe(ckpts["qwen2-int4-v1"], EXAMPLES / "example.json", tmp_path / "o")
    with pytest.raises(ConfigError, match=r"gptqmodel.*install_qlora\.sh.*qwen-tune\[qlora\]"):
        quant.quantization_kwargs(g, ckpts["qwen2-int4-v1"])
    monkeypatch.setenv("QWEN_TUNE_GPTQ_BACKEND", "auto")  # auto falls back to the PyTorch path
    assert quant.quantization_kwargs(g, ckpts["qwen2-int4-v1"]) == {"gptq_backend": "torch"}


def test_quantize_cli_refusals(ckpts, tmp_path, capsys):
    assert run_cli("quantize", "--model", str(ckpts["qwen2-int4-v1"]), "--out", str(tmp_path / "x"),
                   "--algorithm", "rtn") == 2
    assert "already quantized" in capsys.readouterr().err
    assert run_cli("quantize", "--model", str(ckpts["qwen2"]), "--out", str(tmp_path / "x")) == 2
    assert "--calib" in capsys.readouterr().err
