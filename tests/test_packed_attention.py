"""Per-sample SDPA ("sdpa_packed") is exact: a packed row's loss and gradients equal the dense block-mask path's and
those of each sample trained alone, and everything that is not a packed causal row keeps transformers' SDPA."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.masking_utils import create_causal_mask

from qwen_tune.models.packed_attention import (PACKED_SDPA, dense_mask_is_faster, register_packed_sdpa, segment_lengths,
                                               use_packed_sdpa)
from qwen_tune.models.qwen1 import QWenConfig
from qwen_tune.train.trainer import packed_attention_mask

V = 1000  # the attention is under test, not the vocabulary
QWEN2 = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, initializer_range=0.2)


def _model(model_type: str = "qwen2", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    if model_type == "qwen":
        config = QWenConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, kv_channels=16,
                            intermediate_size=128, seq_length=2048, max_position_embeddings=2048,
                            initializer_range=0.2)
    else:
        config = AutoConfig.for_model(model_type, **QWEN2)
    config._attn_implementation = "sdpa"
    return AutoModelForCausalLM.from_config(config).to(dtype).train()


def _row(lens: list[int], seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (1, sum(lens)), generator=g)
    labels = ids.clone()
    starts = torch.tensor([0, *lens[:-1]]).cumsum(0)
    labels[0, starts] = -100  # as PackingCollator: no sample predicts its first token from the previous one
    return {"input_ids": ids, "labels": labels, "position_ids": torch.cat([torch.arange(n) for n in lens])[None]}


def _loss_and_grads(model, batch, dense_mask: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    kwargs = {k: v for k, v in batch.items() if k != "labels"}
    if dense_mask:
        kwargs["attention_mask"] = packed_attention_mask(batch["position_ids"], next(model.parameters()).dtype)
    logits = model(**kwargs, use_cache=False).logits.float()
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], batch["labels"][0, 1:], ignore_index=-100,
                                             reduction="sum")
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _separately(model, lens: list[int], batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Each sample in a row of its own (plain causal SDPA, no mask): losses and gradients summed."""
    total, grads, start = torch.zeros(()), {}, 0
    for n in lens:
        one = {k: v[:, start:start + n] for k, v in batch.items()}
        one["position_ids"] = torch.arange(n)[None]
        loss, g = _loss_and_grads(model, one, dense_mask=False)
        total += loss
        for k, v in g.items():
            grads[k] = grads[k] + v if k in grads else v
        start += n
    return total, grads


def _assert_same(a, b, atol: float, rtol: float, what: str) -> None:
    torch.testing.assert_close(a[0], b[0], atol=atol, rtol=rtol, msg=lambda m: f"{what} loss: {m}")
    assert a[1].keys() == b[1].keys()
    for k in a[1]:
        torch.testing.assert_close(a[1][k], b[1][k], atol=atol, rtol=rtol, msg=lambda m: f"{what} grad {k}: {m}")


LENGTHS = {"mixed": [7, 1, 13, 2, 9], "single sample": [21], "length 1 first and last": [1, 6, 1],
           "all length 1": [1, 1, 1]}


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "qwen"])
@pytest.mark.parametrize("case", list(LENGTHS))
def test_per_sample_loss_and_grads_equal_dense_mask_and_separate_samples(model_type, case):
    lens = LENGTHS[case]
    model, batch = _model(model_type), _row(lens)
    dense = _loss_and_grads(model, batch, dense_mask=True)
    alone = _separately(model, lens, batch)
    assert use_packed_sdpa(model) and model.config._attn_implementation == PACKED_SDPA
    packed = _loss_and_grads(model, batch, dense_mask=False)
    _assert_same(packed, dense, 1e-5, 1e-5, f"{model_type} {case} vs dense")
    _assert_same(packed, alone, 1e-5, 1e-5, f"{model_type} {case} vs separate")
    # The dense mask still passes through unchanged (rows of many tiny samples keep it).
    _assert_same(_loss_and_grads(model, batch, dense_mask=True), dense, 1e-6, 1e-6, f"{model_type} {case} dense")


def test_dense_mask_rule():
    def pos(lens):
        return torch.cat([torch.arange(n) for n in lens])[None]

    assert not dense_mask_is_faster(pos([300, 700, 1048]))  # a realistic 2k row
    assert not dense_mask_is_faster(pos([32] * 64))
    assert dense_mask_is_faster(pos([8] * 256))  # 256 samples > 2048^2 / 32768 = 128
    assert not dense_mask_is_faster(pos([16] * 512))  # 512 <= 8192^2 / 32768 = 2048
    assert not dense_mask_is_faster(pos([5]))


def test_bf16_per_sample_is_as_close_to_fp32_as_the_dense_mask():
    lens = LENGTHS["mixed"]
    batch = _row(lens)
    ref = _loss_and_grads(_model(), batch, dense_mask=True)  # fp32
    model = _model(dtype=torch.bfloat16)
    dense = _loss_and_grads(model, batch, dense_mask=True)
    use_packed_sdpa(model)
    packed = _loss_and_grads(model, batch, dense_mask=False)
    # bf16 rounds differently in each kernel, so compare both paths' distance to fp32, gradient by gradient.
    assert abs(packed[0] - ref[0]) / ref[0] < 1e-2
    for k, g in ref[1].items():
        err = {name: ((r[1][k].float() - g).norm() / g.norm()).item() for name, r in (("packed", packed),
                                                                                      ("dense", dense))}
        assert err["packed"] < 0.1 and err["packed"] < 1.5 * err["dense"] + 1e-3, (k, err)


def test_segments_and_masks():
    register_packed_sdpa()
    assert segment_lengths(torch.tensor([[0, 1, 2, 0, 0, 1], [0, 1, 2, 3, 4, 5]])) == [[3, 1, 2], [6]]
    config = AutoConfig.for_model("qwen2", **QWEN2)
    config._attn_implementation = PACKED_SDPA
    embeds = torch.zeros(1, 6, 64)
    position_ids = torch.tensor([[0, 1, 2, 0, 0, 1]])
    # A packed causal row gets no mask at all: the attention function finds the samples in position_ids.
    assert create_causal_mask(config=config, inputs_embeds=embeds, attention_mask=None, cache=None,
                              position_ids=position_ids) is None
    # A padded batch keeps SDPA's own mask.
    pad = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    embeds2 = torch.zeros(2, 6, 64)
    got = create_causal_mask(config=config, inputs_embeds=embeds2, attention_mask=pad, cache=None,
                             position_ids=torch.arange(6)[None].expand(2, 6))
    config._attn_implementation = "sdpa"
    want = create_causal_mask(config=config, inputs_embeds=embeds2, attention_mask=pad, cache=None,
                              position_ids=torch.arange(6)[None].expand(2, 6))
    assert torch.equal(got, want)


def test_padded_generation_is_unchanged(tokenizer):
    """After training switched a model to sdpa_packed, padded batches and KV-cache decoding run SDPA as before."""
    model = _model().eval()
    ids = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = model.generate(**kw, output_scores=True, return_dict_in_generate=True)
        use_packed_sdpa(model)
        got = model.generate(**kw, output_scores=True, return_dict_in_generate=True)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.scores, want.scores):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_a_sliding_window_layer_keeps_its_mask():
    """Qwen2 with use_sliding_window: the window mask (which also holds the sample boundaries) is kept."""
    torch.manual_seed(0)
    config = AutoConfig.for_model("qwen2", **QWEN2, use_sliding_window=True, sliding_window=4, max_window_layers=0)
    config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(config).eval()
    batch = _row([9, 3, 6])
    kwargs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        want = model(**kwargs, use_cache=False).logits  # transformers' own packed + sliding mask
        use_packed_sdpa(model)
        got = model(**kwargs, use_cache=False).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
