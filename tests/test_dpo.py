"""Preference tuning (stage: dpo): pair data, chunked log-probs, TRL equivalence, training, resume, recipes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import EXAMPLES, run_cli
from qwen_tune.config import ConfigError, DataConfig, load_recipe
from qwen_tune.data.formats import Conversation, DataError
from qwen_tune.data.pairs import prepare_pairs
from qwen_tune.data.template import ChatMLEncoder
from qwen_tune.models.loading import build_from_config
from qwen_tune.train.logprobs import token_logprobs

TINY = {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
        "tie_word_embeddings": False}
PAIRS = EXAMPLES / "dpo_pairs.jsonl"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dpo_base")
    (root / "cfg.json").write_text(json.dumps(TINY))
    return build_from_config(root / "cfg.json", root / "chat", seed=1)


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in records) + "\n")
    return path


def dpo_recipe(base: Path, out: Path, *extra: str, data: Path = PAIRS):
    return load_recipe("dpo_lora", [f"model.path={base}", f"data.path={data}", f"output.dir={out}",
                                    "data.max_len=96", "training.batch_size=2", "training.grad_accum=1",
                                    "training.max_steps=6", "training.lr=1e-2", "training.warmup_ratio=0",
                                    "output.report_to=[]", "output.save_steps=3", "lora.r=8", *extra])


# ---------------------------------------------------------------- data

def test_pair_layouts_render_with_the_sft_template(tokenizer, tmp_path):
    q, good, bad, system = "Name a prime above 10.", "11 is prime.", "12 is prime.", "Be brief."
    trl_msgs = {"prompt": [{"role": "system", "content": system}, {"role": "user", "content": q}],
                "chosen": [{"role": "assistant", "content": good}], "rejected": [{"role": "assistant", "content": bad}]}
    trl_implicit = {"chosen": trl_msgs["prompt"] + trl_msgs["chosen"], "rejected": trl_msgs["prompt"] + trl_msgs["rejected"]}
    sharegpt = {"conversations": [{"from": "human", "value": q}], "system": system,
                "chosen": {"from": "gpt", "value": good}, "rejected": {"from": "gpt", "value": bad}}
    alpaca = {"instruction": q, "system": system, "chosen": good, "rejected": bad}
    enc = ChatMLEncoder(tokenizer, 512, "assistant_only", "You are a helpful assistant.")
    sft = {side: enc.encode([Conversation("x", [("user", q), ("assistant", reply)], system)])[0]
           for side, reply in (("chosen", good), ("rejected", bad))}
    for i, rec in enumerate([trl_msgs, trl_implicit, sharegpt, alpaca]):
        d = prepare_pairs(DataConfig(path=str(write_jsonl(tmp_path / f"{i}.jsonl", [rec])), max_len=512), tokenizer)
        row = d.train[0]
        for side in ("chosen", "rejected"):
            # prompt + reply is exactly the SFT rendering, and the reply is exactly its labeled span.
            assert row["prompt_ids"] + row[f"{side}_ids"] == sft[side].input_ids, (i, side)
            assert row[f"{side}_ids"] == [t for t in sft[side].labels if t != -100], (i, side)
        assert tokenizer.decode(row["prompt_ids"]).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("family", ["qwen2.5-instruct", "qwen3", "qwen3.5"])
def test_pairs_render_with_the_checkpoint_chat_template(family, family_dirs, tmp_path):
    """A Qwen2.5 / Qwen3 / Qwen3.5 checkpoint's pairs are its own template: prompt + reply == apply_chat_template
    of the whole conversation, and the reply is exactly the last assistant turn's labeled body."""
    from transformers import AutoTokenizer

    from test_chat_templates import expected_labels

    tok = AutoTokenizer.from_pretrained(family_dirs[family])
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a prime above 10."}]
    replies = {"chosen": "11 is prime.", "rejected": "12 is prime, surely."}
    rec = {"prompt": prompt, **{k: [{"role": "assistant", "content": v}] for k, v in replies.items()}}
    d = prepare_pairs(DataConfig(path=str(write_jsonl(tmp_path / "p.jsonl", [rec])), max_len=512), tok)
    assert "checkpoint chat_template" in d.reports[0].template
    row = d.train[0]
    for side, reply in replies.items():
        full = tok.apply_chat_template(prompt + [{"role": "assistant", "content": reply}], tokenize=True,
                                       return_dict=False)
        assert row["prompt_ids"] + row[f"{side}_ids"] == full, side
        labels = expected_labels(tok, full)  # oracle: every assistant body, the prompt's earlier one included
        n = len(row["prompt_ids"])
        assert labels[n - 1] == -100 and all(t != -100 for t in labels[n:]), side
        assert tok.decode(row[f"{side}_ids"]).endswith(reply + "<|im_end|>\n")
    # enable_thinking reaches the template: Qwen3 then renders no empty think block in the last turn.
    if family == "qwen3":
        on = tok.decode(row["chosen_ids"])
        cfg = DataConfig(path=str(tmp_path / "p.jsonl"), max_len=512, enable_thinking=False)
        off = prepare_pairs(cfg, tok).train[0]
        assert on.startswith("<think>") and off["prompt_ids"] + off["chosen_ids"] == tok.apply_chat_template(
            prompt + rec["chosen"], tokenize=True, return_dict=False, enable_thinking=False)
    # A second prepare reads the on-disk cache (same key: data, tokenizer, template, settings).
    again = prepare_pairs(DataConfig(path=str(tmp_path / "p.jsonl"), max_len=512), tok)
    assert again.from_cache and again.train[0] == row and again.reports[0].kept == 1


def test_pair_errors_are_located_and_counted(tokenizer, tmp_path):
    ok = {"prompt": "hi", "chosen": "a", "rejected": "b"}
    path = write_jsonl(tmp_path / "bad.jsonl", [
        ok,
        {"prompt": "hi", "chosen": "a"},  # 1: no rejected
        '{"prompt": "hi", "chosen": ',  # 2: invalid JSON
        {"prompt": [{"role": "robot", "content": "x"}], "chosen": "a", "rejected": "b"},  # 3: bad role in prompt
        {"prompt": "hi", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},  # 4: reply from user
        {"prompt": "hi", "chosen": "same", "rejected": "same"},  # 5: identical pair (dropped)
        {"id": "long", "prompt": "word " * 200, "chosen": "a", "rejected": "b"},  # 6: prompt fills max_len
        {"prompt": "hi", "chosen": "x " * 100, "rejected": "b"},  # 7: truncated reply side, kept
    ])
    d = prepare_pairs(DataConfig(path=str(path), max_len=64), tokenizer)
    r = d.reports[0]
    assert (r.records, r.kept, r.truncated) == (8, 2, 1)
    assert dict(r.skipped) == {"missing_field": 1, "invalid_json": 1, "unknown_role": 2}
    assert dict(r.dropped) == {"identical_pair": 1, "prompt_too_long": 1}
    text = "\n".join(r.lines())
    assert f"{path}:2 record 1 field `rejected`" in text
    assert f"{path}:4 record 3 field `prompt[0].role`" in text
    assert f"{path}:5 record 4 field `chosen[0].role`" in text
    assert "id='long'" in text
    assert all(len(p) + max(len(c), len(x)) <= 64 for p, c, x in
               zip(d.train["prompt_ids"], d.train["chosen_ids"], d.train["rejected_ids"]))
    with pytest.raises(DataError, match=r"record 1 field `rejected`"):
        prepare_pairs(DataConfig(path=str(path), max_len=64, strict=True), tokenizer)
    with pytest.raises(DataError, match="cannot detect a preference-pair format"):
        prepare_pairs(DataConfig(path=str(EXAMPLES / "example.json")), tokenizer)


# ---------------------------------------------------------------- log-probs

@pytest.mark.parametrize("train_head", [False, True])
def test_chunked_token_logprobs_equal_plain(train_head):
    torch.manual_seed(0)
    hidden = torch.randn(2, 24, 16, requires_grad=True)
    weight = (torch.randn(151936, 16) * 0.1).requires_grad_(train_head)
    labels = torch.randint(0, 151936, (2, 24))
    labels[:, :6] = -100
    labels[1, 20:] = -100
    upstream = torch.randn(2, 24)
    logps, entropy, mean_logits, top1 = token_logprobs(hidden, weight, labels, chunk_size=5, with_stats=True)
    (logps * upstream).sum().backward()
    got = (hidden.grad.clone(), weight.grad.clone() if train_head else None)
    hidden.grad = None
    weight.grad = None

    mask = labels != -100
    logits = (hidden @ weight.t()).float()
    logsm = torch.log_softmax(logits, -1)
    plain = logsm.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * mask
    (plain * upstream).sum().backward()
    torch.testing.assert_close(logps, plain, rtol=0, atol=1e-5)
    torch.testing.assert_close(got[0], hidden.grad, rtol=1e-4, atol=1e-6)
    if train_head:
        torch.testing.assert_close(got[1], weight.grad, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(entropy, -(logsm.exp() * logsm).sum(-1) * mask, rtol=0, atol=1e-4)
        torch.testing.assert_close(mean_logits, logits.mean(-1) * mask)
        assert torch.equal(top1, (logits.argmax(-1) == labels) & mask)


# ---------------------------------------------------------------- trainer vs TRL

def _trainer(recipe):
    from qwen_tune.train.loading import load_model
    from qwen_tune.train.methods import apply_method
    from qwen_tune.train.preference import REFERENCE_FREE, QwenDPOTrainer, dpo_config

    loaded = load_model(recipe.model.path)
    data = prepare_pairs(recipe.data, loaded.tokenizer)
    torch.manual_seed(0)
    model = apply_method(loaded.model, recipe, loaded.family, loaded.is_chat)
    if recipe.method == "lora":  # a non-zero adapter, so policy and reference differ
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
    return QwenDPOTrainer(model=model, args=dpo_config(recipe, Path(recipe.output.dir), False),
                          train_dataset=data.train, processing_class=loaded.tokenizer,
                          loss_mode=recipe.training.loss, loss_chunk_size=recipe.training.loss_chunk_size,
                          reference_free=recipe.preference.loss in REFERENCE_FREE,
                          simpo_gamma=recipe.preference.simpo_gamma)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_dpo_loss_and_gradients_equal_trl_fused_head(base, tmp_path, method):
    """Our chunked log-probs under TRL's loss == TRL's own fused-head forward, on the same model and batch."""
    grads, losses = {}, {}
    for mode in ("chunked", "plain"):  # plain = TRL's add_fused_lm_head, untouched
        r = dpo_recipe(base, tmp_path / mode, f"method={method}", f"training.loss={mode}",
                       "training.loss_chunk_size=7", "training.gradient_checkpointing=false")
        trainer = _trainer(r)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in (0, 3)])
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        losses[mode] = loss.detach()
        grads[mode] = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
        losses[mode + "_metrics"] = metrics
    torch.testing.assert_close(losses["chunked"], losses["plain"], rtol=1e-5, atol=1e-6)
    if method == "lora":  # the adapter was perturbed: policy != reference, the loss is not the trivial log 2
        assert losses["chunked"].item() != pytest.approx(0.6931, abs=1e-3)
    assert grads["chunked"].keys() == grads["plain"].keys() and grads["chunked"]
    if method == "full":
        assert "lm_head.weight" in grads["chunked"]  # the trainable-head (recompute) path is covered
    for n, ref in grads["plain"].items():
        # fp32 sums in another order (vocabulary tiles vs row chunks): equal to a tolerance relative to the tensor.
        torch.testing.assert_close(grads["chunked"][n], ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item(),
                                   msg=lambda m, n=n: f"{n}: {m}")
    for k in ("rewards/margins", "logps/chosen", "logps/rejected", "entropy", "mean_token_accuracy"):
        assert losses["chunked_metrics"][k] == pytest.approx(losses["plain_metrics"][k], rel=1e-4, abs=1e-6), k


def test_simpo_loss_is_simpo_without_a_reference(base, tmp_path):
    beta, gamma = 2.0, 0.7
    r = dpo_recipe(base, tmp_path / "s", "preference.loss=simpo", f"preference.beta={beta}",
                   f"preference.simpo_gamma={gamma}", "training.gradient_checkpointing=false")
    trainer = _trainer(r)
    assert trainer.ref_model is None
    rows = [trainer.train_dataset[i] for i in range(2)]
    loss = trainer.compute_loss(trainer.model, trainer.data_collator(rows))
    model = trainer.model
    expected = []
    with torch.no_grad():
        for row in rows:
            avg = {}
            for side in ("chosen", "rejected"):
                ids = torch.tensor([row["prompt_ids"] + row[f"{side}_ids"]])
                logits = model(input_ids=ids).logits[0, :-1].float()
                n = len(row[f"{side}_ids"])
                avg[side] = torch.log_softmax(logits, -1)[-n:].gather(1, ids[0, -n:, None]).sum() / n
            expected.append(-F.logsigmoid(beta * (avg["chosen"] - avg["rejected"]) - gamma))
    torch.testing.assert_close(loss.detach(), torch.stack(expected).mean(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- training

def _pair_margins(model_dir: Path, base: Path, rows) -> torch.Tensor:
    """Implicit reward margins (policy - reference log-ratio, chosen minus rejected) per pair, recomputed plainly."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    def logp(model, prompt, reply):
        ids = torch.tensor([prompt + reply])
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        return lp[-len(reply):].gather(1, ids[0, -len(reply):, None]).sum()

    ref = AutoModelForCausalLM.from_pretrained(base).eval()
    pol = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), model_dir).eval()
    return torch.stack([(logp(pol, r["prompt_ids"], r["chosen_ids"]) - logp(ref, r["prompt_ids"], r["chosen_ids"]))
                        - (logp(pol, r["prompt_ids"], r["rejected_ids"]) - logp(ref, r["prompt_ids"], r["rejected_ids"]))
                        for r in rows])


def test_dpo_lora_training_raises_the_margin(base, tmp_path, tokenizer, capsys):
    from qwen_tune.train.preference import run_preference

    out = tmp_path / "out"
    res = run_preference(dpo_recipe(base, out, "training.max_steps=8", "output.report_to=[tensorboard]"))
    logged = [h for h in res.log_history if "rewards/margins" in h]
    assert len(logged) == 8 and logged[0]["rewards/margins"] == 0.0  # step 1: policy == reference
    assert all(h["loss"] == h["loss"] and "tokens_per_s" in h for h in logged)
    for f in ("adapter_model.safetensors", "loss_curve.png", "train_summary.json", "data_report.json"):
        assert (out / f).exists(), f
    assert list((out / "runs").rglob("events.out.tfevents*"))
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["preference"]["last"]["rewards/margins"] > 0
    assert summary["trained_label_tokens_this_session"] > 0  # chosen + rejected reply tokens (completion_mask)
    rows = prepare_pairs(DataConfig(path=str(PAIRS), max_len=96), tokenizer).train
    margins = _pair_margins(out, base, rows)
    assert margins.mean() > 0.1 and (margins > 0).float().mean() >= 0.8, margins
    # The result is an ordinary adapter: merge-adapter (which checks merged logits == adapter logits) takes it.
    assert run_cli("merge-adapter", "--adapter", str(out), "--out", str(tmp_path / "merged")) == 0
    assert (tmp_path / "merged" / "config.json").exists()
    # chat takes it both ways: greedy replies of base + adapter and of the merged model are the same text.
    capsys.readouterr()
    replies = []
    for args in (["--model", str(base), "--adapter", str(out)], ["--model", str(tmp_path / "merged")]):
        assert run_cli("chat", *args, "-p", "Name a prime above 10.", "--max-new-tokens", "6") == 0
        replies.append(capsys.readouterr().out.strip())
    assert replies[0] and replies[0] == replies[1], replies


def test_dpo_resume_reproduces_losses(base, tmp_path):
    from qwen_tune.train.preference import run_preference

    short = ("training.max_steps=4", "output.save_steps=2", "output.save_final=false")
    # One uninterrupted run is both the reference and, with its last checkpoint removed, the run to resume.
    full = run_preference(dpo_recipe(base, tmp_path / "b", *short))
    assert (tmp_path / "b" / "checkpoint-2" / "qwen_tune_complete").exists()
    shutil.rmtree(tmp_path / "b" / "checkpoint-4")  # killed before step 4 was saved
    (tmp_path / "b" / "train_summary.json").unlink()
    resumed = run_preference(dpo_recipe(base, tmp_path / "b", *short, "output.resume_from_checkpoint=auto"))
    ref = {h["step"]: h for h in full.log_history if "loss" in h}
    got = {h["step"]: h for h in resumed.log_history if "loss" in h}
    assert sorted(got) == [1, 2, 3, 4]
    assert resumed.global_step == 4 and got[3]["rewards/margins"] != 0.0
    for step in (3, 4):
        for k in ("loss", "rewards/margins"):
            assert got[step][k] == pytest.approx(ref[step][k], rel=1e-4, abs=1e-6), (step, k)


# ---------------------------------------------------------------- Q-LoRA

@pytest.fixture(scope="module")
def q_bases(tmp_path_factory) -> dict[str, Path]:
    """A tiny fp32 checkpoint (NF4 quantizes it on load) and its GPTQ Int4 version made by `qwen-tune quantize`.
    Linears are multiples of 128 so GPTQ's group size 128 applies as in real models."""
    root = tmp_path_factory.mktemp("dpo_q")
    (root / "cfg.json").write_text(json.dumps({**TINY, "hidden_size": 128, "intermediate_size": 256}))
    fp = build_from_config(root / "cfg.json", root / "fp32", seed=2)
    calib = root / "calib.json"
    calib.write_text(json.dumps(json.loads((EXAMPLES / "example.json").read_text())[:8], ensure_ascii=False))
    assert run_cli("quantize", "--model", str(fp), "--out", str(root / "int4"), "--bits", "4", "--group-size", "128",
                   "--calib", str(calib), "--samples", "8", "--seq-len", "128", "--no-verify") == 0
    return {"nf4": fp, "gptq": root / "int4"}


# NF4 through bitsandbytes' CPU kernels is the slower of the two here (~2 min on a loaded 2-core box): slow-marked.
@pytest.mark.parametrize("quant", ["gptq", pytest.param("nf4", marks=pytest.mark.slow)])
def test_qlora_dpo_raises_the_margin_over_the_quantized_base(q_bases, tmp_path, tokenizer, quant):
    """Q-LoRA DPO: the reference is the quantized base with the adapter disabled (step 1 margin exactly 0), the
    preference loss falls and the margin, recomputed on the reloaded quantized base +- adapter, rises."""
    from qwen_tune.quant.training import load_adapter
    from qwen_tune.train.loading import load_model
    from qwen_tune.train.preference import run_preference

    out = tmp_path / quant
    extra = ["quantization.method=nf4"] if quant == "nf4" else []
    res = run_preference(dpo_recipe(q_bases[quant], out, "method=qlora", "training.max_steps=6", *extra))
    logged = [h for h in res.log_history if "rewards/margins" in h]
    assert logged[0]["rewards/margins"] == 0.0 and logged[0]["loss"] == pytest.approx(0.6931, abs=1e-4)
    assert logged[-1]["loss"] < logged[0]["loss"] and logged[-1]["rewards/margins"] > 0, logged
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["trainable_params"] < 0.2 * summary["total_params"]

    kw = {"quantization_config": __import__("transformers").BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32)} if quant == "nf4" else {"gptq_backend": "torch"}
    model = load_adapter(load_model(q_bases[quant], dtype="fp32", **kw).model, out).eval()
    rows = prepare_pairs(DataConfig(path=str(PAIRS), max_len=96), tokenizer).train

    def logp(prompt, reply):
        ids = torch.tensor([prompt + reply])
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        return lp[-len(reply):].gather(1, ids[0, -len(reply):, None]).sum()

    def side_margins():
        return torch.stack([logp(r["prompt_ids"], r["chosen_ids"]) - logp(r["prompt_ids"], r["rejected_ids"])
                            for r in rows])

    policy = side_margins()
    with model.disable_adapter():
        reference = side_margins()
    margins = policy - reference
    print(f"\n[DPO Q-LoRA {quant}] losses {[round(h['loss'], 4) for h in logged]}, "
          f"mean reward margin (logp units) {margins.mean():.3f}")
    assert margins.mean() > 0 and (margins > 0).float().mean() >= 0.6, margins


# ---------------------------------------------------------------- recipes

def test_preference_recipes_validate_with_hints(base, tmp_path):
    for name in ("dpo_lora", "dpo_full", "simpo_lora", "dpo_lora_ds", "dpo_lora_ds3"):
        r = load_recipe(name, [f"model.path={base}"])
        assert r.stage == "dpo", name
    with pytest.raises(ConfigError, match=r"unknown key `preference.pref_beta`; did you mean `preference.beta`"):
        load_recipe("dpo_lora", [f"model.path={base}", "preference.pref_beta=0.2"])
    with pytest.raises(ConfigError, match=r"preference.loss"):
        load_recipe("dpo_lora", [f"model.path={base}", "preference.loss=kto"])
    from qwen_tune.train.preference import run_preference

    with pytest.raises(ConfigError, match="lm_head cannot carry LoRA"):
        run_preference(dpo_recipe(base, tmp_path / "x", "lora.target_modules=[q_proj,lm_head]"))


def test_nan_guard_stops_a_dpo_step(base, tmp_path):
    from qwen_tune.train.trainer import NonFiniteLossError

    trainer = _trainer(dpo_recipe(base, tmp_path / "n", "training.gradient_checkpointing=false"))
    with torch.no_grad():
        next(p for n, p in trainer.model.named_parameters() if "lora_A" in n).fill_(float("nan"))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in (0, 1)])
    trainer.current_gradient_accumulation_steps = 1  # set by train(); this calls one step directly
    with pytest.raises(NonFiniteLossError, match="before the optimizer step"):
        trainer.training_step(trainer.model, batch)


# ---------------------------------------------------------------- memory estimate

def test_estimate_knows_stage_dpo(base, tmp_path):
    """stage: dpo costs like SFT with twice the rows (chosen + rejected), unpacked; full DPO with a reference loss
    adds TRL's frozen reference copy (sharded under ZeRO-3); LoRA's reference is the adapter-disabled base."""
    from qwen_tune.config import recipe_from_dict
    from qwen_tune.estimate import QWEN1_PRESETS, estimate_memory

    cfg = QWEN1_PRESETS["qwen-1.8b"]

    def est(stage, method="lora", batch=2, loss="sigmoid", packing=True, gpus=1, ds=None):
        r = recipe_from_dict({"model": {"from_config": "unused.json", "is_chat": True}, "method": method,
                              "stage": stage, "preference": {"loss": loss}, "deepspeed": ds,
                              "data": {"max_len": 1024, "packing": packing},
                              "training": {"batch_size": batch, "precision": "bf16"}})
        return estimate_memory(r, gpus=gpus, model_config=cfg)

    sft, dpo = est("sft", batch=4, packing=False), est("dpo")
    assert dpo.tokens_per_step == sft.tokens_per_step == 4 * 1024
    assert (dpo.activations, dpo.logits, dpo.weights, dpo.total) == (sft.activations, sft.logits, sft.weights, sft.total)
    assert any("2 sequences per pair" in n and "adapter-disabled base" in n for n in dpo.notes)
    full_sft, full_dpo, full_simpo = (est("sft", "full", 4, packing=False), est("dpo", "full"),
                                      est("dpo", "full", loss="simpo"))
    n = full_sft.params_total
    # SFT keeps fp32 master weights (4 B/param); the DPO runner trains the bf16 policy plus a bf16 reference copy
    assert full_sft.weights == pytest.approx(n * 4, rel=1e-6)
    assert full_dpo.weights == pytest.approx(n * 2 + n * 2, rel=1e-6)
    assert full_simpo.weights == pytest.approx(n * 2, rel=1e-6) and full_dpo.total > full_simpo.total
    z3 = "ds_configs/zero3.json"
    z3_sft, z3_dpo = est("sft", "full", 4, packing=False, gpus=4, ds=z3), est("dpo", "full", gpus=4, ds=z3)
    assert z3_dpo.weights - z3_sft.weights == pytest.approx(n * 2 / 4, rel=1e-6)
    # The CLI takes a bundled dpo recipe as it is.
    assert run_cli("estimate", "--recipe", "dpo_lora", f"model.path={base}") == 0


@pytest.mark.slow
def test_zero3_dpo_lora_matches_single_process(base, tmp_path):
    """ZeRO-3 LoRA DPO on 2 processes (partitioned weights; the reference is the adapter-disabled partitioned base)
    reproduces one process accumulating the same 2 micro-batches: losses and reward margins per step.

    ZeRO-2 DPO has no launch of its own: stage 3 is the harder case of the same TRL/accelerate path, and ZeRO-2
    LoRA is launched by tests/test_distributed.py (two launches cost ~30 s each on this machine)."""
    from safetensors.torch import load_file
    from test_distributed import _ds_config, _run, _torchrun

    from qwen_tune.train.preference import run_preference

    # 6 pairs = 3 full global batches of 2: an odd last batch would be padded differently on 2 ranks than 1.
    lines = PAIRS.read_text().splitlines()
    rec = json.loads(lines[0]) | {"id": "again"}
    data = write_jsonl(tmp_path / "pairs6.jsonl", [*lines, json.dumps(rec)])
    common = ("training.batch_size=1", "training.max_steps=3", "training.scheduler=constant", "output.save_steps=100",
              "training.gradient_checkpointing=false")
    single = run_preference(dpo_recipe(base, tmp_path / "one", *common, "training.grad_accum=2", data=data))
    out = tmp_path / "z3"
    _run(_torchrun("--recipe", "dpo_lora_ds3", f"model.path={base}", f"data.path={data}", f"output.dir={out}",
                   f"deepspeed={_ds_config(tmp_path, 'zero3')}", "data.max_len=96", "training.grad_accum=1",
                   "training.lr=1e-2", "training.warmup_ratio=0", "output.report_to=[]", "lora.r=8", *common),
         tmp_path / "z3.log")
    summary = json.loads((out / "train_summary.json").read_text())
    assert (summary["engine"]["deepspeed_zero_stage"], summary["engine"]["world_size"]) == (3, 2)
    history = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["log_history"]
    got = {h["step"]: h for h in history if "rewards/margins" in h}
    want = {h["step"]: h for h in single.log_history if "rewards/margins" in h}
    assert sorted(got) == sorted(want) == [1, 2, 3] and got[1]["rewards/margins"] == 0.0
    for step in (2, 3):
        assert want[step]["rewards/margins"] != 0.0
        for k in ("loss", "rewards/margins", "logps/chosen"):
            assert got[step][k] == pytest.approx(want[step][k], rel=1e-3, abs=1e-5), (step, k)
    adapter = load_file(out / "adapter_model.safetensors")  # gathered from the ZeRO-3 partitions on save
    assert adapter and all(v.numel() > 0 for v in adapter.values())
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in adapter.items()), "LoRA did not train"
