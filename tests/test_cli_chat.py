"""`qwen-tune chat`: streamed replies, one-shot and interactive, /reset, and an empty reply said plainly."""

from __future__ import annotations

import io
import json

import pytest

from conftest import run_cli
from qwen_tune.models.loading import build_from_config

TINY = {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
        "tie_word_embeddings": False, "qwen_tune_is_chat": True}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    (root / "cfg.json").write_text(json.dumps(TINY))
    return build_from_config(root / "cfg.json", root / "model", seed=5)


def test_one_shot_streams_the_same_reply_generate_returns(model_dir, capsys):
    from qwen_tune.cli.chat import build_prompt_ids, generate, load_for_chat

    assert run_cli("chat", "--model", str(model_dir), "-p", "Hello", "--max-new-tokens", "6") == 0
    streamed = capsys.readouterr().out
    model, tokenizer = load_for_chat(str(model_dir), None)
    reply = generate(model, tokenizer, build_prompt_ids(tokenizer, None, [("user", "Hello")]), 6, 0.0)
    assert reply.strip()  # a random model says something in 6 greedy tokens (suppressed padding rows aside)
    assert streamed == reply + "\n"


def test_empty_reply_is_said_plainly(model_dir, capsys):
    from qwen_tune.cli.chat import EMPTY_REPLY

    assert run_cli("chat", "--model", str(model_dir), "-p", "Hello", "--max-new-tokens", "0") == 0
    assert capsys.readouterr().out.strip() == EMPTY_REPLY


def test_interactive_reset_is_confirmed(model_dir, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n/reset\nHello\n\n"))
    assert run_cli("chat", "--model", str(model_dir), "--max-new-tokens", "3") == 0
    out = capsys.readouterr().out
    assert "(history cleared" in out
    replies = [line for line in out.splitlines() if line.startswith("user> assistant> ") or "assistant> " in line]
    assert len(replies) == 2 and replies[0].split("assistant> ")[1] == replies[1].split("assistant> ")[1]


def test_chat_with_adapter_prints_only_the_reply(model_dir, tmp_path):
    # peft's LoRA dispatcher imports gptqmodel whenever it is installed; its import banner, GIL notice and env
    # notes went to stdout (through logbar) and torch's pytree warnings to stderr, around the reply.
    import os
    import subprocess
    import sys
    from importlib.util import find_spec
    from pathlib import Path

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "adapter"
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(r=4, target_modules=["q_proj"]))
    lora.save_pretrained(adapter)
    probe = ("import sys; from qwen_tune.cli.main import main; rc = main(sys.argv[1:]); "
             "print('gptqmodel' in sys.modules, file=sys.stderr); sys.exit(rc)")
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k not in ("QWEN_TUNE_VERBOSE", "TORCH_LOGS")}
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, "-c", probe, "chat", "--model", str(model_dir), "--adapter", str(adapter),
                        "-p", "Hello", "--max-new-tokens", "4"], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    *noise, imported = p.stderr.splitlines()
    assert imported == str(find_spec("gptqmodel") is not None and find_spec("optimum") is not None)
    assert not noise, noise  # no banner, GIL notice, pytree or bitsandbytes warnings
    assert p.stdout.count("\n") == 1 and p.stdout.strip(), repr(p.stdout)  # the reply line and nothing else
