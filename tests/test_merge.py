"""`qwen-tune merge-adapter`: tiny real checkpoints and real peft adapters, written to temp dirs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import run_cli

QWEN2_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IM_END_ID, ENDOFTEXT_ID = 151645, 151643


# ---------------------------------------------------------------------------------------------------------------
# Fixtures: tiny bases and adapters


def _save_qwen2(path: Path, hidden_size: int = 32, vocab_size: int = 151936, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(path)
    return path


def _make_adapter(base: Path, out: Path, targets: list[str], modules_to_save: list[str] | None = None,
                  seed: int = 1) -> Path:
    """A LoRA adapter with every trainable tensor perturbed (lora_B non-zero), so the merge changes the model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    import qwen_tune.models.qwen1  # noqa: F401

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets,
                                                  modules_to_save=modules_to_save, task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    peft_model.save_pretrained(out)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    return out


@pytest.fixture(scope="session")
def qwen2_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from qwen_tune.data.tokenizer import export_qwen2_tokenizer

    base = _save_qwen2(tmp_path_factory.mktemp("qwen2_base"))
    export_qwen2_tokenizer(base)
    (base / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [IM_END_ID, ENDOFTEXT_ID], "pad_token_id": ENDOFTEXT_ID, "do_sample": False}))
    (base / "custom_note.py").write_text("# model code shipped with the checkpoint\nNOTE = 'kept'\n")
    (base / "LICENSE").write_text("test license\n")
    return base


@pytest.fixture(scope="session")
def qwen2_adapter(qwen2_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_adapter(qwen2_base, tmp_path_factory.mktemp("qwen2_adapter"), QWEN2_LORA_TARGETS)


@pytest.fixture(scope="session")
def embeddings_adapter(qwen2_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A base-model run: LoRA plus fully trained embed_tokens and lm_head (modules_to_save)."""
    return _make_adapter(qwen2_base, tmp_path_factory.mktemp("emb_adapter"), ["q_proj", "v_proj"],
                         modules_to_save=["embed_tokens", "lm_head"], seed=2)


@pytest.fixture(scope="session")
def qwen1_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    qwen1 = pytest.importorskip("qwen_tune.models.qwen1")
    from qwen_tune.data.tokenizer import QWEN_TIKTOKEN_PATH

    base = tmp_path_factory.mktemp("qwen1_base")
    cfg = qwen1.QWenConfig(vocab_size=151851, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, kv_channels=8, seq_length=64, max_position_embeddings=64)
    torch.manual_seed(0)
    qwen1.QWenLMHeadModel(cfg).save_pretrained(base)
    # The original Qwen-1 layout: remote-code auto_map, precision flags, code files, qwen.tiktoken.
    config = json.loads((base / "config.json").read_text())
    config.update(auto_map={"AutoConfig": "configuration_qwen.QWenConfig",
                            "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
                  bf16=False, fp16=False, fp32=True, tokenizer_class="QWenTokenizer")
    (base / "config.json").write_text(json.dumps(config, indent=2))
    (base / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "QWenTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}}))
    # A copy (the parsed BPE is cached by content, so it is parsed once): a link pointing out of the base would not
    # be copied into the merged output (see test_checkpoint.py).
    shutil.copy2(QWEN_TIKTOKEN_PATH, base / "qwen.tiktoken")
    (base / "modeling_qwen.py").write_text("# dummy remote code\n")
    (base / "tokenization_qwen.py").write_text("# dummy remote code\n")
    # A base (not chat) checkpoint: raw format, stops on <|endoftext|> only.
    (base / "generation_config.json").write_text(json.dumps(
        {"chat_format": "raw", "eos_token_id": ENDOFTEXT_ID, "pad_token_id": ENDOFTEXT_ID}))
    return base


def _ids(vocab: int = 151643) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 20), generator=torch.Generator().manual_seed(7))


@torch.no_grad()
def _adapter_logits(base: Path, adapter: Path, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(base+adapter, base alone) logits in fp32."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    plain = model(input_ids=ids).logits
    with_adapter = PeftModel.from_pretrained(model, str(adapter)).eval()
    return with_adapter(input_ids=ids).logits, plain


@torch.no_grad()
def _plain_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()(input_ids=ids).logits


def _saved_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


# ---------------------------------------------------------------------------------------------------------------
# Merges


def test_merge_qwen2_lora_cli(qwen2_base: Path, qwen2_adapter: Path, tmp_path: Path,
                              capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "merged"
    rc = run_cli("merge-adapter", "--adapter", str(qwen2_adapter), "--out", str(out), "--max-shard-size", "8MB")
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "max abs logit diff" in printed.out

    # Sharded safetensors with an index naming every shard.
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) >= 2 and all((out / s).is_file() for s in shards)
    assert not any("lora" in k for k in index["weight_map"])
    # Tokenizer, generation config and the base's extra files; nothing of the adapter; no build dir left.
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "custom_note.py", "LICENSE"):
        assert (out / name).read_bytes() == (qwen2_base / name).read_bytes(), name
    assert json.loads((out / "generation_config.json").read_text()) == json.loads(
        (qwen2_base / "generation_config.json").read_text())
    assert not (out / "adapter_config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]

    # A plain transformers load reproduces base+adapter; and the adapter matters.
    ids = _ids()
    expected, plain = _adapter_logits(qwen2_base, qwen2_adapter, ids)
    merged = _plain_logits(out, ids)
    assert (expected - plain).abs().max() > 1e-2
    torch.testing.assert_close(merged, expected, atol=1e-4, rtol=0)

    # The output now exists: a second merge refuses without --overwrite, in one line, exit code 2.
    rc = run_cli("merge-adapter", "--adapter", str(qwen2_adapter), "--out", str(out))
    errors = _error_lines(capsys.readouterr().err)
    assert rc == 2 and len(errors) == 1 and "not empty" in errors[0] and "--overwrite" in errors[0]


def test_merge_modules_to_save_bf16_with_adapter_tokenizer(qwen2_base: Path, embeddings_adapter: Path,
                                                           tmp_path: Path) -> None:
    from qwen_tune.export import merge_adapter

    # The training run saved its tokenizer next to the adapter: that one wins over the base's.
    adapter = tmp_path / "adapter"
    shutil.copytree(embeddings_adapter, adapter)
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        shutil.copy(qwen2_base / name, adapter / name)
    tok_cfg = json.loads((qwen2_base / "tokenizer_config.json").read_text()) | {"model_max_length": 1234}
    (adapter / "tokenizer_config.json").write_text(json.dumps(tok_cfg))

    out = tmp_path / "merged"
    result = merge_adapter(adapter, out, dtype="bf16")
    assert result.out_dir == out and result.dtype == "bf16"
    assert result.merge_diff <= result.tolerance and result.reload_diff <= result.tolerance
    assert result.max_abs_diff is not None and result.max_abs_diff < 0.1  # bf16 rounding only
    assert "tokenizer_config.json" in result.copied_files and "custom_note.py" in result.copied_files
    # except tokenizer_config.json: the base's, byte for byte (a re-save by the tokenizer class rewrites fields)
    assert (out / "tokenizer_config.json").read_bytes() == (qwen2_base / "tokenizer_config.json").read_bytes()

    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"
    merged = _saved_weights(out)
    trained = _saved_weights(adapter)
    base = _saved_weights(qwen2_base)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert merged[name].dtype == torch.bfloat16
        assert torch.equal(merged[name], trained[f"base_model.model.{name}"].to(torch.bfloat16)), name
        assert not torch.equal(merged[name], base[name].to(torch.bfloat16)), name


def test_merge_qwen1(qwen1_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    adapter = _make_adapter(qwen1_base, tmp_path / "adapter", ["c_attn", "c_proj", "w1", "w2"])
    (adapter / "qwen_tune_recipe.yaml").write_text("model:\n  path: base\nmethod: lora\n")
    # a tokenizer re-saved next to the adapter, fields rewritten: the merged model keeps the base's file byte for byte
    (adapter / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "QWenTokenizer",
                                                                 "model_max_length": 8192}))
    out = tmp_path / "merged"
    rc = run_cli("merge-adapter", "--adapter", str(adapter), "--out", str(out))
    assert rc == 0, capsys.readouterr().err

    assert not (out / "qwen.tiktoken").is_symlink()
    assert (out / "qwen.tiktoken").read_bytes() == (qwen1_base / "qwen.tiktoken").read_bytes()
    for name in ("modeling_qwen.py", "tokenization_qwen.py"):
        assert (out / name).read_text() == "# dummy remote code\n"
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_qwen.QWenLMHeadModel"
    assert (config["fp32"], config["bf16"], config["fp16"]) == (True, False, False)
    assert "auto_map" in json.loads((out / "tokenizer_config.json").read_text())
    # Fine-tuned on ChatML, the merged model is a chat model: it must stop on <|im_end|>.
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["chat_format"] == "chatml" and IM_END_ID in gen["eos_token_id"]
    # ... and Qwen-1's model.chat() needs max_window_size: the chat generation config Qwen-7B-Chat ships
    assert {k: gen.get(k) for k in ("max_window_size", "max_new_tokens", "top_k", "top_p", "repetition_penalty")} == {
        "max_window_size": 6144, "max_new_tokens": 512, "top_k": 0, "top_p": 0.8, "repetition_penalty": 1.1}
    assert (out / "tokenizer_config.json").read_bytes() == (qwen1_base / "tokenizer_config.json").read_bytes()

    ids = _ids()
    expected, plain = _adapter_logits(qwen1_base, adapter, ids)
    assert (expected - plain).abs().max() > 1e-2
    torch.testing.assert_close(_plain_logits(out, ids), expected, atol=1e-4, rtol=0)


def test_qlora_adapter_merges_onto_full_precision_base(qwen2_base: Path, qwen2_adapter: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    # An adapter trained on a GPTQ checkpoint of the base.
    gptq = tmp_path / "base-gptq"
    gptq.mkdir()
    config = json.loads((qwen2_base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (gptq / "config.json").write_text(json.dumps(config))
    adapter = tmp_path / "adapter"
    shutil.copytree(qwen2_adapter, adapter)
    adapter_cfg = json.loads((adapter / "adapter_config.json").read_text()) | {"base_model_name_or_path": str(gptq)}
    (adapter / "adapter_config.json").write_text(json.dumps(adapter_cfg))
    (adapter / "qwen_tune_recipe.yaml").write_text("model:\n  path: x\nmethod: qlora\nquantization:\n  method: gptq\n")

    out = tmp_path / "merged"
    rc = run_cli("merge-adapter", "--adapter", str(adapter), "--out", str(out))
    errors = _error_lines(capsys.readouterr().err)
    assert rc == 2 and len(errors) == 1 and "GPTQ" in errors[0] and "--base" in errors[0]
    assert not out.exists()

    # With the full-precision base: merged, and told what it gets. Also replaces an old output (--overwrite).
    # (Verification is covered by the other tests.)
    out.mkdir()
    (out / "old.txt").write_text("old")
    rc = run_cli("merge-adapter", "--adapter", str(adapter), "--out", str(out), "--base", str(qwen2_base),
                 "--overwrite", "--no-verify")
    printed = capsys.readouterr().out
    assert rc == 0
    assert "Q-LoRA" in printed and "full-precision" in printed
    assert not (out / "old.txt").exists() and (out / "config.json").exists()
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


def test_failed_merge_check_writes_nothing(qwen2_adapter: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture) -> None:
    from qwen_tune.export import merge

    monkeypatch.setattr(merge, "FP32_TOLERANCE", -1.0)  # nothing passes
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("previous model")
    rc = run_cli("merge-adapter", "--adapter", str(qwen2_adapter), "--out", str(out), "--overwrite")
    errors = _error_lines(capsys.readouterr().err)
    assert rc == 1 and len(errors) == 1 and "verification failed" in errors[0]
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no build directory left
    assert [p.name for p in out.iterdir()] == ["keep.txt"]  # the old output is untouched


def test_failed_reload_check_keeps_marked_build(qwen2_adapter: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture) -> None:
    from qwen_tune.export import merge

    write_config = merge._write_config

    def broken_config(base: Path, dest: Path, dtype: str, untied: bool) -> None:  # a config that changes the model
        write_config(base, dest, dtype, untied)
        config = json.loads((dest / "config.json").read_text()) | {"rms_norm_eps": 0.5}
        (dest / "config.json").write_text(json.dumps(config))

    monkeypatch.setattr(merge, "_write_config", broken_config)
    out = tmp_path / "merged"
    rc = run_cli("merge-adapter", "--adapter", str(qwen2_adapter), "--out", str(out))
    errors = _error_lines(capsys.readouterr().err)
    assert rc == 1 and len(errors) == 1 and "verification failed" in errors[0] and "reloaded" in errors[0]
    assert not out.exists()
    (build,) = tmp_path.iterdir()
    assert build.name.startswith("merged.tmp-") and (build / merge.FAILED_MARKER).is_file()


# ---------------------------------------------------------------------------------------------------------------
# Refusals: one clear line, exit code 2, nothing written


def _refused(capsys: pytest.CaptureFixture, *args: str) -> str:
    rc = run_cli("merge-adapter", *args)
    errors = _error_lines(capsys.readouterr().err)
    assert rc == 2 and len(errors) == 1, errors
    return errors[0]


def test_refuses_base_with_other_hidden_size(qwen2_adapter: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    other = _save_qwen2(tmp_path / "wide", hidden_size=48)
    out = tmp_path / "merged"
    err = _refused(capsys, "--adapter", str(qwen2_adapter), "--base", str(other), "--out", str(out))
    assert "does not fit" in err and "shape mismatch" in err and "32" in err and "48" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wide"]


def test_refuses_vocab_mismatch(embeddings_adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    other = _save_qwen2(tmp_path / "small_vocab", vocab_size=1000)
    err = _refused(capsys, "--adapter", str(embeddings_adapter), "--base", str(other), "--out", str(tmp_path / "o"))
    assert "vocabulary size mismatch" in err and "151936" in err and "1000" in err


def test_refuses_adapter_of_other_family(qwen1_base: Path, qwen2_base: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture) -> None:
    adapter = _make_adapter(qwen1_base, tmp_path / "adapter", ["c_attn", "w1"])
    err = _refused(capsys, "--adapter", str(adapter), "--base", str(qwen2_base), "--out", str(tmp_path / "o"))
    assert "has no module transformer.h.0.attn.c_attn" in err


def test_refuses_missing_base_and_full_disk(qwen2_adapter: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture) -> None:
    adapter = tmp_path / "adapter"
    shutil.copytree(qwen2_adapter, adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text()) | {"base_model_name_or_path": "/nowhere/base"}
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    err = _refused(capsys, "--adapter", str(adapter), "--out", str(tmp_path / "o"))
    assert "'/nowhere/base'" in err and "does not exist" in err and "--base" in err

    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 10**6, 10**6))
    err = _refused(capsys, "--adapter", str(qwen2_adapter), "--out", str(tmp_path / "o"))
    assert "not enough free disk" in err
    assert not (tmp_path / "o").exists()


def test_refuses_output_that_would_replace_the_adapter(qwen2_adapter: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    shutil.copytree(qwen2_adapter, run / "adapter")
    err = _refused(capsys, "--adapter", str(run / "adapter"), "--out", str(run), "--overwrite")
    assert "would replace" in err
    assert (run / "adapter" / "adapter_config.json").is_file()


def test_parse_size() -> None:
    from qwen_tune.config import ConfigError
    from qwen_tune.export.merge import parse_size

    assert parse_size("2GB") == 2 * 10**9 and parse_size("500mb") == 5 * 10**8 and parse_size("1GiB") == 2**30
    with pytest.raises(ConfigError, match="not a size"):
        parse_size("lots")


@pytest.fixture
def small_tmpfs(mount_tmpfs):
    """An 80 MB filesystem to merge into (the tiny Qwen2 merge needs ~60 MB)."""
    return mount_tmpfs(80)


def test_disk_full_during_merge(qwen2_base: Path, qwen2_adapter: Path, small_tmpfs: Path, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture) -> None:
    """The free-space check passes, then another writer fills the disk: the merge fails while writing weights."""
    import hashlib

    from qwen_tune.export import merge

    def digest(d: Path) -> dict[str, str]:
        return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.iterdir()) if f.is_file()}

    before = digest(qwen2_base), digest(qwen2_adapter)
    real_check = merge.check_disk

    def check_then_fill(out: Path, needed: int) -> None:
        real_check(out, needed)
        free = shutil.disk_usage(small_tmpfs).free
        (small_tmpfs / "other_writer.bin").write_bytes(b"\0" * (free - 12 * 2**20))  # 12 MB left: the tokenizer fits

    monkeypatch.setattr(merge, "check_disk", check_then_fill)
    out = small_tmpfs / "merged"
    rc = run_cli("merge-adapter", "--adapter", str(qwen2_adapter), "--out", str(out))
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    lines = _error_lines(err)
    assert len(lines) == 1 and "disk full while writing the merged model" in lines[0], err[-2000:]
    assert sorted(p.name for p in small_tmpfs.iterdir()) == ["other_writer.bin"]  # no output, no build dir
    assert (digest(qwen2_base), digest(qwen2_adapter)) == before


def test_base_and_chat_checkpoints_leave_in_their_own_chat_format(qwen2_base: Path, qwen2_adapter: Path,
                                                                  tmp_path: Path) -> None:
    """A Qwen2 *base* (no chat template, stops on <|endoftext|> only) fine-tuned on ChatML leaves as a chat model:
    the ChatML template it was trained with and <|im_end|> as eos. A chat checkpoint's files stay byte for byte."""
    from transformers import AutoTokenizer

    from qwen_tune.export import merge_adapter

    base = tmp_path / "qwen2_pretrained"
    shutil.copytree(qwen2_base, base)
    tok_cfg = json.loads((base / "tokenizer_config.json").read_text())
    tok_cfg.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    (base / "generation_config.json").write_text(json.dumps({"eos_token_id": ENDOFTEXT_ID, "do_sample": False}))
    adapter = tmp_path / "adapter"
    shutil.copytree(qwen2_adapter, adapter)
    (adapter / "qwen_tune_recipe.yaml").write_text("method: lora\ndata:\n  template: auto\n")
    merge_adapter(adapter, tmp_path / "merged", base_dir=base, verify=False)
    merged = tmp_path / "merged"
    gen = json.loads((merged / "generation_config.json").read_text())
    assert IM_END_ID in gen["eos_token_id"] and ENDOFTEXT_ID in gen["eos_token_id"]
    out_cfg = json.loads((merged / "tokenizer_config.json").read_text())
    assert out_cfg["chat_template"] and out_cfg | {"chat_template": None} == tok_cfg | {"chat_template": None}
    text = AutoTokenizer.from_pretrained(merged).apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                                      add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                    "<|im_start|>assistant\n")

    # a chat checkpoint (qwen2_base: a template, stops on <|im_end|>): nothing of its chat setup changes
    merge_adapter(adapter, tmp_path / "merged_chat", verify=False)
    chat = tmp_path / "merged_chat"
    assert (chat / "tokenizer_config.json").read_bytes() == (qwen2_base / "tokenizer_config.json").read_bytes()
    assert json.loads((chat / "generation_config.json").read_text()) == json.loads(
        (qwen2_base / "generation_config.json").read_text())


@pytest.mark.parametrize("family", ["qwen1", "qwen2"])
def test_base_trained_on_chat_leaves_as_a_chat_model(family: str, tmp_path: Path) -> None:
    """Real runs: a Qwen-1 *base* LoRA run merges into a chat generation config as Qwen-7B-Chat ships; a Qwen2
    base whose tokenizer has no template leaves full fine-tuning with the ChatML template and <|im_end|> as eos."""
    from qwen_tune.config import load_recipe
    from qwen_tune.models.loading import build_from_config
    from qwen_tune.train.run import run_training

    cfg = {"qwen1": {"model_type": "qwen", "vocab_size": 151936, "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 1, "num_attention_heads": 4, "kv_channels": 8, "seq_length": 256,
                     "max_position_embeddings": 256},
           "qwen2": {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "max_position_embeddings": 256, "tie_word_embeddings": False}}[family]
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "qwen_tune_is_chat": False}))
    base = build_from_config(tmp_path / "cfg.json", tmp_path / "base", seed=1)
    if family == "qwen2":
        tok = json.loads((base / "tokenizer_config.json").read_text())
        tok.pop("chat_template", None)
        (base / "tokenizer_config.json").write_text(json.dumps(tok))
        (base / "chat_template.jinja").unlink(missing_ok=True)
    method = "lora" if family == "qwen1" else "full"
    run_training(load_recipe("lora", [f"model.path={base}", "data.path=data_examples/example.json",
                                      f"output.dir={tmp_path / 'run'}", f"method={method}", "data.max_len=64",
                                      "training.batch_size=1", "training.grad_accum=1", "training.max_steps=1",
                                      "training.use_cpu=true", "output.report_to=[]", "output.save_steps=100",
                                      "lora.r=2"]))
    run = tmp_path / "run"
    if family == "qwen1":
        assert run_cli("merge-adapter", "--adapter", str(run), "--out", str(tmp_path / "merged")) == 0
        gen = json.loads((tmp_path / "merged" / "generation_config.json").read_text())
        assert gen["chat_format"] == "chatml" and gen["max_window_size"] == 6144 and IM_END_ID in gen["eos_token_id"]
        assert (tmp_path / "merged" / "tokenizer_config.json").read_bytes() == \
            (base / "tokenizer_config.json").read_bytes()
    else:
        gen = json.loads((run / "generation_config.json").read_text())
        assert IM_END_ID in gen["eos_token_id"]
        assert json.loads((run / "tokenizer_config.json").read_text())["chat_template"]


def test_links_out_of_the_base_never_reach_the_merged_output(qwen2_base: Path, qwen2_adapter: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    """A downloaded base with links to files elsewhere on the machine: the published output holds none of them."""
    secret = tmp_path / "id_rsa"
    secret.write_text("PRIVATE KEY")
    base = tmp_path / "base"
    shutil.copytree(qwen2_base, base)
    (base / "notes.md").symlink_to(secret)
    (base / "extra").mkdir()
    (base / "extra" / "key.txt").symlink_to(secret)
    (base / "home").symlink_to(tmp_path)
    out = tmp_path / "merged"
    rc = run_cli("merge-adapter", "--adapter", str(qwen2_adapter), "--base", str(base), "--out", str(out))
    assert rc == 0, capsys.readouterr().err
    assert (out / "custom_note.py").is_file()  # the base's own extra files are still copied
    leaked = [p for p in out.rglob("*") if p.is_symlink() or (p.is_file() and "PRIVATE KEY" in p.read_text(errors="replace"))]
    assert not leaked and not (out / "notes.md").exists() and not (out / "home").exists()
