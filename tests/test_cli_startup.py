"""Start-up cost of the CLI: light commands never import the training stack, and `import qwen_tune` alone
registers Qwen-1 with transformers' Auto classes (without importing transformers itself)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "datasets", "deepspeed", "peft", "pydantic")

# Runs the CLI in-process in a fresh interpreter and reports which heavy modules it imported.
_PROBE = """
import json, sys
from qwen_tune.cli.main import main
try:
    rc = main(sys.argv[1:])
except SystemExit as e:
    rc = e.code or 0
print(json.dumps({"rc": rc, "loaded": [m for m in %r if m in sys.modules]}), file=sys.stderr)
""" % (HEAVY,)


def _probe(*argv: str, cwd: Path = ROOT) -> tuple[dict, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, env=env, cwd=cwd,
                       timeout=300)
    return json.loads(p.stderr.strip().splitlines()[-1]), p.stdout


@pytest.mark.parametrize("argv", [["--version"], ["version"], ["--help"], ["help"], [], ["recipes"],
                                  ["help", "train"], ["data", "preview", "--help"]])
def test_light_commands_import_nothing_heavy(argv):
    result, out = _probe(*argv)
    assert result["rc"] == 0
    loaded = set(result["loaded"]) - ({"pydantic"} if argv == ["recipes"] else set())  # recipes reads the schema
    assert not loaded, f"qwen-tune {' '.join(argv)} imported {sorted(loaded)}"
    if "version" in " ".join(argv):
        assert out.strip().startswith("qwen-tune ")
    elif argv == ["recipes"]:
        assert "lora" in out
    else:
        assert "usage: qwen-tune" in out


def test_data_tokenize_does_not_import_torch(tmp_path, family_dirs):
    data = ROOT / "data_examples" / "sharegpt.json"
    model = family_dirs["qwen2.5-instruct"]  # a Qwen2.5 tokenizer.json dir: transformers' fast tokenizer, no torch
    args = ["data", "tokenize", "--data", str(data), "--out", str(tmp_path / "t.jsonl"), "--model", str(model)]
    result, _ = _probe(*args)
    assert result["rc"] == 0
    assert not {"torch", "datasets"} & set(result["loaded"]), result["loaded"]
    assert (tmp_path / "t.jsonl").read_text().count("\n") == 8


def test_data_commands_on_chatml_import_no_transformers(tmp_path, tokenizer):
    # Qwen-1's ChatML path reads the vocabulary with tiktoken alone: transformers (~1 s), torch, datasets,
    # DeepSpeed and peft stay unloaded. The ids must equal what training's QWenTokenizer encodes.
    from qwen_tune.data.chat_template import make_encoder
    from qwen_tune.data.dataset import load_conversations
    from qwen_tune.config import DatasetSpec
    from qwen_tune.data.report import DataReport

    qwen1_dir = tmp_path / "qwen1"
    tokenizer.save_pretrained(qwen1_dir)  # qwen.tiktoken + tokenizer_config.json, as a Qwen-1 checkpoint ships it
    heavy = {"torch", "transformers", "datasets", "deepspeed", "peft"}
    data = ROOT / "data_examples" / "example.json"
    convs = load_conversations(DatasetSpec(path=str(data)), DataReport("x"), False)
    want = [{"id": s.id, "input_ids": s.input_ids, "labels": s.labels}
            for s in make_encoder(tokenizer, 512).encode(convs) if not s.drop_reason]
    assert want
    for model in ([], ["--model", str(qwen1_dir)], ["--model", str(qwen1_dir / "qwen.tiktoken")]):
        out = tmp_path / "t.jsonl"
        result, _ = _probe("data", "tokenize", "--data", str(data), "--out", str(out), *model)
        assert result["rc"] == 0
        assert not heavy & set(result["loaded"]), (model, result["loaded"])
        assert [json.loads(line) for line in out.read_text().splitlines()] == want
    for argv in (["data", "check", str(data)], ["data", "preview", str(data), "-n", "2"]):
        result, stdout = _probe(*argv)
        assert result["rc"] == 0 and "chatml" in stdout
        assert not heavy & set(result["loaded"]), (argv, result["loaded"])


def test_import_qwen_tune_alone_registers_qwen1(tmp_path):
    import torch

    from qwen_tune.data.tokenizer import load_tokenizer
    from qwen_tune.models.qwen1 import QWenConfig, QWenLMHeadModel

    cfg = QWenConfig(vocab_size=151851, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, kv_channels=8, seq_length=64, max_position_embeddings=64)
    torch.manual_seed(0)
    QWenLMHeadModel(cfg).save_pretrained(tmp_path)
    load_tokenizer(None).save_pretrained(tmp_path)
    # A user's script: only `import qwen_tune`, then plain transformers, no trust_remote_code.
    script = f"""
import sys
import qwen_tune
assert "transformers" not in sys.modules and "torch" not in sys.modules
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
d = {str(tmp_path)!r}
print(type(AutoConfig.from_pretrained(d)).__name__)
print(type(AutoTokenizer.from_pretrained(d)).__name__)
print(type(AutoModelForCausalLM.from_pretrained(d)).__name__)
print(any(type(f).__name__ == "_AutoHook" for f in sys.meta_path))
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split() == ["QWenConfig", "QWenTokenizer", "QWenLMHeadModel", "False"]


@pytest.mark.parametrize("verbose", [False, True])
def test_third_party_warnings_hidden_unless_verbose(verbose):
    # What the CLI entry does before any command: transformers' and datasets' warnings (and Python warnings
    # raised inside those libraries) are hidden by default, shown with --verbose / QWEN_TUNE_VERBOSE=1.
    script = """
import sys, warnings
from qwen_tune.cli.main import _is_verbose, quiet_third_party
quiet_third_party(_is_verbose(sys.argv[1:]))
from transformers.utils import logging
logging.get_logger("transformers.modeling_utils").warning("SPAM-transformers")
import datasets.utils.logging as dl
dl.get_logger("datasets.builder").warning("SPAM-datasets")
print("ran")
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # an in-process CLI call earlier in the session (run_cli) set the quiet defaults in os.environ: start clean
    for var in ("QWEN_TUNE_VERBOSE", "TRANSFORMERS_VERBOSITY", "DATASETS_VERBOSITY", "TRANSFORMERS_NO_ADVISORY_WARNINGS"):
        env.pop(var, None)
    p = subprocess.run([sys.executable, "-c", script, *(["--verbose"] if verbose else [])], capture_output=True,
                       text=True, env=env, timeout=300)
    assert p.returncode == 0 and "ran" in p.stdout, p.stderr[-2000:]
    assert ("SPAM-transformers" in p.stderr) == verbose and ("SPAM-datasets" in p.stderr) == verbose


def test_registration_when_the_model_module_is_imported_first():
    # modeling_qwen's own imports load transformers' modeling_auto while it is half-initialized: the hook must
    # not lose the registration (was: "could not register ... partially initialized module").
    script = """
import warnings
warnings.simplefilter("error", UserWarning)
import qwen_tune
from qwen_tune.models.qwen1 import QWenConfig, QWenLMHeadModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
assert MODEL_FOR_CAUSAL_LM_MAPPING[QWenConfig] is QWenLMHeadModel
print("ok")
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-2000:]
