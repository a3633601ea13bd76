"""Dynamic padding and padding-free packing give the same per-sample loss on a real tiny model."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from qwen_tune.data.collators import PackingCollator, PaddingCollator
from qwen_tune.data.formats import Conversation
from qwen_tune.data.template import IGNORE_INDEX, ChatMLEncoder
from qwen_tune.train.trainer import packed_attention_mask


@pytest.fixture(scope="module")
def samples(tokenizer):
    convs = [Conversation("a", [("user", "What is 2+2?"), ("assistant", "4")]),
             Conversation("b", [("user", "Write a haiku about rain."), ("assistant", "Soft rain on the roof\nthe "
                                "gutters hum a low song\nmorning smells of earth")]),
             Conversation("c", [("user", "你好"), ("assistant", "你好！有什么可以帮你？"), ("user", "谢谢"),
                                ("assistant", "不客气 😊")], system="Answer in Chinese.")]
    return [{"input_ids": s.input_ids, "labels": s.labels} for s in ChatMLEncoder(tokenizer, 512).encode(convs)]


def tiny_qwen2(attn: str) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attn_implementation=attn)
    return Qwen2ForCausalLM(cfg).eval()


def per_token_loss_sum(model, batch) -> float:
    kwargs = {k: v for k, v in batch.items() if k != "labels"}
    # Without a KV cache, as in training: transformers only reads packed position_ids when no cache is used.
    logits = model(**kwargs, use_cache=False).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                             ignore_index=IGNORE_INDEX, reduction="sum").item()


def test_padding_collator_shapes(samples):
    batch = PaddingCollator(pad_id=151643, pad_to_multiple_of=8)(samples)
    longest = max(len(s["input_ids"]) for s in samples)
    assert batch["input_ids"].shape[1] == -(-longest // 8) * 8
    for row, s in enumerate(samples):
        n = len(s["input_ids"])
        assert batch["input_ids"][row, :n].tolist() == s["input_ids"]
        assert (batch["input_ids"][row, n:] == 151643).all() and (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][row].sum() == n


def test_packing_collator_layout(samples):
    batch = PackingCollator(flash_attn_kwargs=True)(samples)
    lens = [len(s["input_ids"]) for s in samples]
    assert batch["input_ids"].shape == (1, sum(lens))
    starts = [0, lens[0], lens[0] + lens[1]]
    assert [int(batch["position_ids"][0, s]) for s in starts] == [0, 0, 0]
    assert all(int(batch["labels"][0, s]) == IGNORE_INDEX for s in starts)
    assert batch["cu_seq_lens_q"].tolist() == [0, *torch.tensor(lens).cumsum(0).tolist()]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_unpacked(samples, attn):
    model = tiny_qwen2(attn)
    with torch.no_grad():
        separate = sum(per_token_loss_sum(model, PaddingCollator(151643)([s])) for s in samples)
        padded = per_token_loss_sum(model, PaddingCollator(151643)(samples))
        packed = per_token_loss_sum(model, PackingCollator()(samples))
    assert packed == pytest.approx(separate, rel=1e-5)
    assert padded == pytest.approx(separate, rel=1e-5)


def test_packed_float_mask_matches_transformers_mask(samples):
    """QwenTrainer's one shared float mask gives the same logits as transformers' own packed mask."""
    model = tiny_qwen2("sdpa")
    batch = PackingCollator()(samples)
    mask = packed_attention_mask(batch["position_ids"], torch.float32)
    T = batch["input_ids"].shape[1]
    assert mask.shape == (1, 1, T, T)
    lens = [len(s["input_ids"]) for s in samples]
    allowed = torch.block_diag(*[torch.ones(n, n).tril() for n in lens]).bool()
    assert torch.equal(mask[0, 0] == 0, allowed)
    with torch.no_grad():
        ref = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        got = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=mask,
                    use_cache=False).logits
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)


def test_trainer_runs_packed_sdpa_rows_per_sample(tmp_path, caplog):
    """QwenTrainer switches a packed SDPA model to per-sample SDPA: no T x T mask reaches the model and the loss is
    transformers' own packed one; a row of many tiny samples keeps the dense mask (dense_mask_is_faster)."""
    import logging

    from transformers import TrainingArguments

    from qwen_tune.models.packed_attention import PACKED_SDPA
    from qwen_tune.train.trainer import QwenTrainer

    def row(lens):
        g = torch.Generator().manual_seed(len(lens))
        feats = [{"input_ids": torch.randint(0, 151936, (n,), generator=g).tolist()} for n in lens]
        return PackingCollator()([dict(f, labels=f["input_ids"]) for f in feats])

    model = tiny_qwen2("sdpa")
    rows = {"long": row([300, 1, 211]), "tiny": row([4] * 32)}
    expected = {}
    with torch.no_grad():
        for name, batch in rows.items():  # transformers' own packed (boolean) mask
            expected[name] = per_token_loss_sum(model, batch) / int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    trainer = QwenTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none"))
    seen = []
    handle = model.model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs.get("attention_mask")), with_kwargs=True)
    try:
        with torch.no_grad(), caplog.at_level(logging.INFO, logger="qwen_tune"):
            losses = {name: [trainer.compute_loss(model, dict(b)).item() for _ in range(2)]
                      for name, b in rows.items()}
    finally:
        handle.remove()
    assert seen[:2] == [None, None]
    assert all(torch.equal(m, packed_attention_mask(rows["tiny"]["position_ids"], torch.float32)) for m in seen[2:])
    assert model.config._attn_implementation == PACKED_SDPA
    assert sum("per-sample SDPA" in r.getMessage() for r in caplog.records) == 1  # decided and logged once
    for name in rows:
        assert losses[name] == pytest.approx([expected[name]] * 2, rel=1e-5)
