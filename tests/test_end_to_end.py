"""Train -> merge -> reload, for a Qwen-1 checkpoint (bundled implementation) and a Qwen2 base model."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from conftest import EXAMPLES, run_cli
from qwen_tune.config import load_recipe
from qwen_tune.models.loading import build_from_config
from qwen_tune.train.run import run_training

QWEN1 = {"model_type": "qwen", "vocab_size": 151936, "hidden_size": 32, "num_attention_heads": 4, "kv_channels": 8,
         "intermediate_size": 128, "num_hidden_layers": 2, "seq_length": 256, "max_position_embeddings": 256,
         "use_dynamic_ntk": True, "use_logn_attn": True, "no_bias": True, "rotary_pct": 1.0,
         "rotary_emb_base": 10000, "layer_norm_epsilon": 1e-6}
QWEN2_BASE = {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "tie_word_embeddings": False, "qwen_tune_is_chat": False}
PROBE = [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198, 9707, 151645, 198,
         151644, 77091, 198]


def train_and_merge(tmp_path: Path, config: dict, *extra: str) -> tuple[Path, Path, Path]:
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(config))
    base = build_from_config(cfg, tmp_path / "base", seed=3)
    (base / "NOTICE.txt").write_text("extra file that save_pretrained would drop\n")
    data = tmp_path / "d.json"
    data.write_text(json.dumps(json.loads((EXAMPLES / "example.json").read_text())[:12], ensure_ascii=False))
    out = tmp_path / "adapter"
    recipe = load_recipe("lora", [f"model.path={base}", f"data.path={data}", f"output.dir={out}",
                                  "data.max_len=96", "training.max_steps=3", "training.batch_size=2",
                                  "training.grad_accum=1", "training.lr=1e-2", "lora.r=4", "lora.dropout=0",
                                  "output.report_to=[]", "output.save_steps=100", *extra])
    result = run_training(recipe)
    losses = [h["loss"] for h in result.log_history if "loss" in h]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    merged = tmp_path / "merged"
    assert run_cli("merge-adapter", "--adapter", str(out), "--out", str(merged)) == 0
    return base, out, merged


def adapter_and_merged_logits(base: Path, adapter: Path, merged: Path, model_cls=None):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([PROBE])
    with torch.no_grad():
        tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
        expected = tuned.eval()(input_ids=ids).logits
        loader = model_cls or AutoModelForCausalLM
        got = loader.from_pretrained(merged, dtype=torch.float32).eval()(input_ids=ids).logits
    return expected, got


def test_qwen1_lora_train_merge_reload(tmp_path):
    from qwen_tune.models.qwen1 import QWenLMHeadModel

    base, adapter, merged = train_and_merge(tmp_path, QWEN1)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert set(cfg["target_modules"]) == {"c_attn", "c_proj", "w1", "w2"}
    for cls in (None, QWenLMHeadModel):
        expected, got = adapter_and_merged_logits(base, adapter, merged, cls)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert (merged / "qwen.tiktoken").exists() and (merged / "NOTICE.txt").exists()
    assert json.loads((merged / "config.json").read_text())["model_type"] == "qwen"


def test_qwen2_base_model_adapter_with_embeddings_merges(tmp_path):
    base, adapter, merged = train_and_merge(tmp_path, QWEN2_BASE)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert set(cfg["modules_to_save"]) >= {"embed_tokens", "lm_head"}
    expected, got = adapter_and_merged_logits(base, adapter, merged)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    from safetensors.torch import load_file

    weights = {}
    for f in merged.glob("*.safetensors"):
        weights.update(load_file(f))
    orig = load_file(base / "model.safetensors")
    assert not torch.equal(weights["model.embed_tokens.weight"], orig["model.embed_tokens.weight"])
    assert (merged / "tokenizer.json").exists() and (merged / "NOTICE.txt").exists()


def test_chat_prompt_matches_training_template_and_cli_runs(tmp_path, capsys, tokenizer):
    from qwen_tune.cli.chat import build_prompt_ids

    ids = build_prompt_ids(tokenizer, "You are a helpful assistant.", [("user", "Hello")])
    assert tokenizer.decode(ids) == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                                     "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n")
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(QWEN1))
    base = build_from_config(cfg, tmp_path / "base", seed=3)
    assert run_cli("chat", "--model", str(base), "-p", "Hello", "--max-new-tokens", "4") == 0
    reply = capsys.readouterr().out.rstrip("\n").splitlines()[-1]  # libraries may log to stdout first
    assert 0 < len(tokenizer.encode(reply)) <= 4 * 3  # 4 new tokens, re-encoded out of context
