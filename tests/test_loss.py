import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from qwen_tune.train import loss_kernel
from qwen_tune.train.loss import IGNORE_INDEX, causal_lm_loss, estimate_logits_bytes

ATOL = 1e-5
B, T, H, V = 2, 33, 16, 5000


def _reference(hidden, lm_head, labels, num_items_in_batch=None):
    """Plain full-logits loss, written like transformers' ForCausalLMLoss."""
    logits = lm_head(hidden).float()
    shift = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    red = "mean" if num_items_in_batch is None else "sum"
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), shift.reshape(-1), reduction=red)
    return loss if num_items_in_batch is None else loss / num_items_in_batch


def _labels(gen, ignore_frac=0.3):
    labels = torch.randint(0, V, (B, T), generator=gen)
    labels[torch.rand(B, T, generator=gen) < ignore_frac] = IGNORE_INDEX
    labels[:, :5] = IGNORE_INDEX  # a "prompt"
    return labels


def _loss_and_grads(fn, hidden, head, labels, **kw):
    h = hidden.detach().clone().requires_grad_(True)
    head.zero_grad(set_to_none=True)
    loss = fn(h, head, labels, **kw)
    loss.backward()
    return loss.detach(), h.grad, {n: p.grad.clone() for n, p in head.named_parameters() if p.grad is not None}


@pytest.fixture
def setup():
    gen = torch.Generator().manual_seed(0)
    head = nn.Linear(H, V, bias=False)
    hidden = torch.randn(B, T, H, generator=gen)
    return head, hidden, _labels(gen), gen


def _assert_same(a, b):
    la, ha, pa = a
    lb, hb, pb = b
    torch.testing.assert_close(la, lb, atol=ATOL, rtol=0)
    torch.testing.assert_close(ha, hb, atol=ATOL, rtol=0)
    assert pa.keys() == pb.keys() and pa
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], atol=ATOL, rtol=0)


@pytest.mark.parametrize("recompute,compile", [(False, False), (False, True), (True, None)],
                         ids=["grads-in-forward", "grads-in-forward-compiled", "recompute"])
@pytest.mark.parametrize("chunk_size", [1, 5, 7, 16, 2048])
def test_matches_full_logits(setup, chunk_size, recompute, compile, monkeypatch):
    monkeypatch.delenv("QWEN_TUNE_COMPILE_LOSS", raising=False)
    head, hidden, labels, _ = setup
    n_valid = int((labels[:, 1:] != IGNORE_INDEX).sum())
    assert n_valid % 5 and n_valid % 7  # chunk sizes that don't divide the row count
    ref = _loss_and_grads(_reference, hidden, head, labels)
    got = _loss_and_grads(causal_lm_loss, hidden, head, labels, chunk_size=chunk_size, use_liger=False,
                          recompute=recompute, compile=compile)
    _assert_same(got, ref)
    if compile and chunk_size > 1:  # the compiled kernel really ran (a failed compile would have fallen back to eager)
        assert loss_kernel._COMPILE_FAILED is None and loss_kernel._COMPILED is not None


def test_compiled_chunk_matches_eager_in_bf16_and_fp32():
    gen = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16):
        logits = (torch.randn(37, 3001, generator=gen) * 4).to(dtype)
        t = torch.randint(0, 3001, (37,), generator=gen)
        a, b = logits.clone(), logits.clone()
        la = loss_kernel.ce_grad_inplace(a, t, compile=False)
        lb = loss_kernel.ce_grad_inplace(b, t, compile=True)
        torch.testing.assert_close(lb, la, atol=1e-4, rtol=1e-6)
        torch.testing.assert_close(b.float(), a.float(), atol=1e-5 if dtype == torch.float32 else 1e-2, rtol=0)
        ref = F.cross_entropy(logits.float(), t, reduction="sum")
        torch.testing.assert_close(lb, ref, atol=1e-4, rtol=1e-6)
    assert loss_kernel._COMPILE_FAILED is None


@pytest.mark.parametrize("block_rows", [None, 1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_eager_chunk_against_float64(dtype, block_rows, monkeypatch):
    """The eager softmax - onehot (in place, max first, a block of rows at a time; 16-bit logits through the
    block's fp32 copy) against float64 math, with blocks that split the chunk unevenly."""
    if block_rows is not None:
        monkeypatch.setattr(loss_kernel, "EAGER_BLOCK_ELEMENTS", block_rows * 3001 + 17)
    gen = torch.Generator().manual_seed(2)
    for rows in (37, 1, 20):
        logits = (torch.randn(rows, 3001, generator=gen) * 4).to(dtype)
        t = torch.randint(0, 3001, (rows,), generator=gen)
        exact = logits.double()
        ref_loss = F.cross_entropy(exact, t, reduction="sum")
        ref_grad = torch.softmax(exact, -1) - F.one_hot(t, 3001).double()
        got = logits.clone()
        loss = loss_kernel.ce_grad_inplace(got, t, compile=False)
        assert loss.dtype == torch.float32 and got.dtype == dtype
        torch.testing.assert_close(loss.double(), ref_loss, atol=0, rtol=1e-6)
        tol = {torch.float32: 1e-6, torch.bfloat16: 4e-3, torch.float16: 5e-4}[dtype]  # the 16-bit store rounds
        torch.testing.assert_close(got.double(), ref_grad, atol=tol, rtol=0)


def test_compile_failure_falls_back_to_eager_with_one_warning(setup, monkeypatch):
    head, hidden, labels, _ = setup

    def broken(*a, **k):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(loss_kernel, "_COMPILED", None)
    monkeypatch.setattr(loss_kernel, "_COMPILE_FAILED", None)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: broken)
    ref = _loss_and_grads(_reference, hidden, head, labels)
    with pytest.warns(UserWarning, match="torch.compile of the loss chunk failed .*no C\\+\\+ compiler"):
        got = _loss_and_grads(causal_lm_loss, hidden, head, labels, chunk_size=16, compile=True)
    _assert_same(got, ref)
    assert "no C++ compiler" in loss_kernel._COMPILE_FAILED


def test_compile_setting_env_override(monkeypatch):
    monkeypatch.setenv("QWEN_TUNE_COMPILE_LOSS", "0")
    assert loss_kernel.compile_enabled(True) is False
    monkeypatch.setenv("QWEN_TUNE_COMPILE_LOSS", "1")
    assert loss_kernel.compile_enabled(None) is True
    monkeypatch.delenv("QWEN_TUNE_COMPILE_LOSS")
    assert loss_kernel.compile_enabled(None) is None and loss_kernel.compile_enabled(False) is False


def test_compile_auto_switches_after_the_eager_work_repays_a_compile(monkeypatch):
    """compile=None: big chunks compile at once; small ones stay eager until the workspace's eager work reaches
    COMPILE_AFTER_ELEMENTS (and only that workspace's: another trainer starts at zero)."""
    monkeypatch.delenv("QWEN_TUNE_COMPILE_LOSS", raising=False)
    monkeypatch.setattr(loss_kernel, "COMPILE_AFTER_ELEMENTS", 3 * 50 * 64)
    ws = loss_kernel.LossWorkspace()
    assert loss_kernel.use_compiled(None, loss_kernel.COMPILE_MIN_ELEMENTS, None)
    assert not loss_kernel.use_compiled(None, 50 * 64, ws) and not loss_kernel.use_compiled(False, 1 << 40, ws)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        logits, t = torch.randn(50, 64, generator=gen), torch.randint(0, 64, (50,), generator=gen)
        ref = F.cross_entropy(logits, t, reduction="sum")
        torch.testing.assert_close(loss_kernel.ce_grad_inplace(logits, t, None, ws), ref, atol=1e-4, rtol=1e-6)
    assert ws.eager_elements == 3 * 50 * 64
    assert loss_kernel.use_compiled(None, 50 * 64, ws)
    assert not loss_kernel.use_compiled(None, 50 * 64, loss_kernel.LossWorkspace())
    monkeypatch.setenv("QWEN_TUNE_COMPILE_LOSS", "0")
    assert not loss_kernel.use_compiled(None, 50 * 64, ws)


@pytest.mark.parametrize("hooked", [False, True], ids=["bare-matmuls", "hooked-head-called-as-module"])
def test_frozen_plain_head_runs_as_matmuls_into_a_reused_buffer(setup, hooked, monkeypatch):
    """A frozen bias-free nn.Linear without hooks is applied as two matmuls, its logits written into the
    workspace's buffer (kept across calls); a hook (or a wrapper) keeps the module call. Same numbers either way."""
    head, hidden, labels, _ = setup
    head.weight.requires_grad_(False)
    calls = []
    if hooked:
        head.register_forward_hook(lambda m, a, out: calls.append(a[0].shape[0]))
    ws = loss_kernel.LossWorkspace()
    ref = _loss_and_grads(_reference, hidden, head, labels)
    calls.clear()
    n_valid = int((labels[:, 1:] != IGNORE_INDEX).sum())
    for chunk in (7, 2048, 7):
        got = _loss_and_grads(causal_lm_loss, hidden, head, labels, chunk_size=chunk, compile=False, workspace=ws)
        torch.testing.assert_close(got[0], ref[0], atol=ATOL, rtol=0)
        torch.testing.assert_close(got[1], ref[1], atol=ATOL, rtol=0)
        if chunk == 2048 and not hooked:
            ptr = ws.buffer.data_ptr()
    if hooked:
        assert ws.buffer is None and sum(calls) == 3 * n_valid
    else:
        assert calls == [] and ws.buffer.numel() == n_valid * V and ws.buffer.data_ptr() == ptr  # grown once, reused
        assert ws.eager_elements == 3 * n_valid * V


@pytest.mark.parametrize("head_dtype", [torch.bfloat16, torch.float32])
def test_frozen_head_under_bf16_autocast(setup, head_dtype):
    """bf16 autocast on CPU (training.precision=bf16): a frozen head already in bf16 takes the bare matmuls, with
    the very numbers of the module call (autocast casts nothing there); an fp32 head keeps the module call, which
    autocast computes in bf16."""
    head, hidden, labels, _ = setup
    head = head.to(head_dtype).requires_grad_(False)
    hidden = hidden.to(head_dtype)
    hooked = nn.Linear(H, V, bias=False, dtype=head_dtype).requires_grad_(False)
    hooked.weight.data.copy_(head.weight)
    calls = []
    hooked.register_forward_hook(lambda m, a, out: calls.append(out.dtype))
    results = []
    for h in (head, hooked):
        ws = loss_kernel.LossWorkspace()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(_loss_and_grads(causal_lm_loss, hidden, h, labels, chunk_size=16, compile=False,
                                           workspace=ws))
        if h is head:
            bare = ws.buffer is not None
    assert bare == (head_dtype == torch.bfloat16)
    assert calls and set(calls) == {torch.bfloat16}  # the module call ran in autocast's dtype
    (l0, g0, _), (l1, g1, _) = results
    assert torch.equal(l0, l1) and torch.equal(g0, g1)
    fp32 = nn.Linear(H, V, bias=False).requires_grad_(False)
    fp32.weight.data.copy_(head.weight.float())
    torch.testing.assert_close(l0, _reference(hidden.float(), fp32, labels), rtol=1e-2, atol=0)  # bf16 rounding


def test_frozen_head_gets_no_grad_and_hidden_grads_match(setup):
    head, hidden, labels, _ = setup
    head.weight.requires_grad_(False)
    ref = _loss_and_grads(_reference, hidden, head, labels)
    got = _loss_and_grads(causal_lm_loss, hidden, head, labels, chunk_size=9)
    torch.testing.assert_close(got[0], ref[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(got[1], ref[1], atol=ATOL, rtol=0)
    assert got[2] == {} and head.weight.grad is None


def test_grad_out_scaling_and_accumulation(setup):
    """Backward scales the stored gradients by the incoming gradient and accumulates across calls."""
    head, hidden, labels, _ = setup
    h = hidden.clone().requires_grad_(True)
    (3.0 * causal_lm_loss(h, head, labels, chunk_size=8)).backward()
    causal_lm_loss(h, head, labels, chunk_size=8).backward()
    h_ref = hidden.clone().requires_grad_(True)
    head_ref = nn.Linear(H, V, bias=False)
    head_ref.load_state_dict(head.state_dict())
    (4.0 * _reference(h_ref, head_ref, labels)).backward()
    torch.testing.assert_close(h.grad, h_ref.grad, atol=ATOL, rtol=0)
    torch.testing.assert_close(head.weight.grad, head_ref.weight.grad, atol=ATOL, rtol=0)


@pytest.mark.parametrize("recompute,dtype", [(False, torch.float32), (True, torch.float32), (None, torch.float16)],
                         ids=["grads-in-forward", "recompute", "fp16-recomputes"])
def test_head_sees_only_supervised_rows_in_chunks(setup, recompute, dtype):
    head, hidden, labels, _ = setup
    head, hidden = head.to(dtype), hidden.to(dtype)
    n_valid = int((labels[:, 1:] != IGNORE_INDEX).sum())
    rows_seen = []
    handle = head.register_forward_hook(lambda m, args, out: rows_seen.append(args[0].shape[0]))
    try:
        causal_lm_loss(hidden.requires_grad_(), head, labels, chunk_size=7, recompute=recompute).backward()
    finally:
        handle.remove()
    fwd = [7] * (n_valid // 7) + [n_valid % 7]
    assert rows_seen[: len(fwd)] == fwd  # forward: only supervised rows, chunk by chunk
    if recompute is not False:
        assert sorted(rows_seen[len(fwd) :]) == sorted(fwd)  # backward: each chunk recomputed once
    else:
        assert len(rows_seen) == len(fwd)  # gradients were taken in forward: no second pass


def test_bias_head_and_num_items_in_batch(setup):
    _, hidden, labels, _ = setup
    head = nn.Linear(H, V, bias=True)
    for n in (1234, torch.tensor(1234)):
        ref = _loss_and_grads(_reference, hidden, head, labels, num_items_in_batch=n)
        got = _loss_and_grads(causal_lm_loss, hidden, head, labels, num_items_in_batch=n, chunk_size=10)
        _assert_same(got, ref)
        assert set(got[2]) == {"weight", "bias"}


def test_all_ignored_is_connected_zero(setup):
    head, hidden, _, _ = setup
    labels = torch.full((B, T), IGNORE_INDEX)
    labels[:, 0] = 3  # first position is never a target after the shift
    h = hidden.clone().requires_grad_(True)
    loss = causal_lm_loss(h, head, labels, num_items_in_batch=5)
    assert loss.item() == 0.0 and loss.requires_grad and loss.dtype == torch.float32
    loss.backward()
    assert torch.count_nonzero(h.grad) == 0
    assert head.weight.grad is not None and torch.count_nonzero(head.weight.grad) == 0


def test_no_grad_and_single_token():
    head = nn.Linear(H, V, bias=False)
    with torch.no_grad():
        assert causal_lm_loss(torch.randn(1, 1, H), head, torch.tensor([[5]])).item() == 0.0
        hidden, labels = torch.randn(1, 4, H), torch.tensor([[1, 2, 3, 4]])
        torch.testing.assert_close(causal_lm_loss(hidden, head, labels, chunk_size=2), _reference(hidden, head, labels))


def test_packed_labels(setup):
    """Packed rows: several sequences in one row, each boundary token ignored."""
    head, hidden, _, gen = setup
    labels = torch.randint(0, V, (B, T), generator=gen)
    for b, starts in enumerate([(0, 9, 20), (0, 14, 15, 30)]):
        for s in starts:
            labels[b, s] = IGNORE_INDEX  # first token of each packed sequence
        labels[b, starts[1] - 3 : starts[1]] = IGNORE_INDEX  # some prompt/pad tokens
    ref = _loss_and_grads(_reference, hidden, head, labels, num_items_in_batch=100)
    got = _loss_and_grads(causal_lm_loss, hidden, head, labels, num_items_in_batch=100, chunk_size=13)
    _assert_same(got, ref)


def test_bad_arguments(setup):
    head, hidden, labels, _ = setup
    with pytest.raises(ValueError):
        causal_lm_loss(hidden, head, labels, chunk_size=0)
    with pytest.raises(ValueError):
        causal_lm_loss(hidden, head, labels[:, :-1])


def test_liger_falls_back_off_cuda(setup):
    head, hidden, labels, _ = setup
    with pytest.warns(UserWarning, match="liger"):
        got = causal_lm_loss(hidden, head, labels, use_liger=True, chunk_size=9)
    torch.testing.assert_close(got, _reference(hidden, head, labels), atol=ATOL, rtol=0)


def test_estimate_logits_bytes():
    assert estimate_logits_bytes(8192, 151_936, None) == 8192 * 151_936 * 4 * 2
    assert estimate_logits_bytes(8192, 151_936, 2048) == 2048 * 151_936 * 4 * 2
    assert estimate_logits_bytes(100, 10, 2048) == 100 * 10 * 8
    assert estimate_logits_bytes(0, 10, 2048) == 0


@pytest.mark.parametrize("head_trains", [False, True])
def test_saved_for_backward_is_structurally_small(head_trains):
    """The plain path saves O(N*V) fp32 for backward; the chunked one O(N*H), plus the head's own
    [V, H] gradient when the head trains (taken in forward)."""
    vocab, n, h = 20_000, 256, 32
    head = nn.Linear(h, vocab, bias=False).requires_grad_(head_trains)
    hidden = torch.randn(1, n + 1, h, requires_grad=True)
    labels = torch.randint(0, vocab, (1, n + 1))

    params = {p.untyped_storage().data_ptr() for p in head.parameters()}

    def saved_bytes(fn, **kw):
        seen = {}

        def pack(t):  # references to parameters cost nothing: count new tensors only
            if t.untyped_storage().data_ptr() not in params:
                seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = fn(hidden, head, labels, **kw)
        loss.backward()
        return sum(seen.values())

    logits_bytes = n * vocab * 4
    head_grad_bytes = vocab * h * 4 if head_trains else 0
    plain = saved_bytes(_reference)
    assert plain >= logits_bytes
    for recompute in (False, True):
        chunked = saved_bytes(causal_lm_loss, chunk_size=64, recompute=recompute)
        assert chunked < logits_bytes / 50 + 2 * head_grad_bytes
        assert chunked < estimate_logits_bytes(n, vocab, 64) + 2 * head_grad_bytes


# ------------------------------------------------------------------ transformers / peft


def _tiny_qwen2(tied=False):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
    )
    model = Qwen2ForCausalLM(cfg).eval()
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 1000, (2, 24), generator=gen)
    labels = input_ids.clone()
    labels[:, :6] = IGNORE_INDEX
    labels[1, 18:] = IGNORE_INDEX
    return model, input_ids, labels


def _model_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _compare_with_hf(model, backbone, head, input_ids, labels, recompute=None, **kw):
    model.zero_grad(set_to_none=True)
    ref = model(input_ids=input_ids, labels=labels, **kw).loss
    ref.backward()
    ref_grads = _model_grads(model)

    model.zero_grad(set_to_none=True)
    hidden = backbone(input_ids=input_ids).last_hidden_state
    loss = causal_lm_loss(hidden, head, labels, chunk_size=5, recompute=recompute, **kw)
    loss.backward()
    grads = _model_grads(model)

    torch.testing.assert_close(loss, ref, atol=ATOL, rtol=0)
    assert grads.keys() == ref_grads.keys()
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], atol=ATOL, rtol=0)
    return grads


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied-embeddings"])
def test_qwen2_model_loss_and_grads(tied):
    model, input_ids, labels = _tiny_qwen2(tied)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    for kw in ({}, {"num_items_in_batch": torch.tensor(50)}):
        grads = _compare_with_hf(model, model.model, model.lm_head, input_ids, labels, **kw)
        assert ("lm_head.weight" in grads) != tied  # a tied matrix is listed once, as the embedding


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("mode", ["lora", "modules_to_save"])
def test_peft_wrapped_lm_head(mode, recompute):
    from peft import LoraConfig, get_peft_model

    model, input_ids, labels = _tiny_qwen2()
    if mode == "lora":
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], init_lora_weights=False)
    else:
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"])
    peft_model = get_peft_model(model, cfg)
    inner = peft_model.base_model.model
    # Perturb the trainable copy so a loss computed with the frozen original would differ.
    if mode == "modules_to_save":
        with torch.no_grad():
            inner.lm_head.modules_to_save["default"].weight.mul_(1.5)

    grads = _compare_with_hf(peft_model, inner.model, inner.lm_head, input_ids, labels, recompute=recompute)
    head_grads = {k for k in grads if "lm_head" in k}
    if mode == "lora":
        assert any("lm_head.lora_A" in k for k in head_grads)
        assert any("lm_head.lora_B" in k for k in head_grads)
        assert not any("base_layer" in k for k in head_grads)
    else:
        assert head_grads and all("modules_to_save" in k for k in head_grads)


def _path(**kw):
    from qwen_tune.train.loss import select_loss_path

    base = dict(device_type="cuda", fp16_logits=False, zero3=False, head_trainable=False, plain_head=True,
                liger_installed=True, use_liger=None, recompute=None, grad_enabled=True)
    return select_loss_path(**(base | kw))


def test_loss_path_selection():
    # GPTQ Q-LoRA on GPU: fp16 logits, a frozen plain head, liger installed -> never liger's gradient-in-forward.
    assert _path(fp16_logits=True) == ("recompute", None)
    assert _path(fp16_logits=True, use_liger=True) == (
        "recompute", "fp16 logits underflow in a gradient taken before the loss scale")
    assert _path() == ("liger", None)
    assert _path(head_trainable=True) == ("liger", None)
    assert _path(liger_installed=False) == ("grads_in_forward", None)
    assert _path(device_type="cpu") == ("grads_in_forward", None)
    assert _path(device_type="cpu", use_liger=True)[1] == "liger-kernel needs CUDA tensors"
    assert _path(plain_head=False) == ("grads_in_forward", None)
    assert _path(use_liger=False) == ("grads_in_forward", None)
    assert _path(grad_enabled=False, liger_installed=False) == ("recompute", None)
    # ZeRO-3: a frozen head recomputes its chunks; a trainable one takes the single-gradient path.
    assert _path(zero3=True) == ("recompute", None)
    assert _path(zero3=True, head_trainable=True) == ("zero3_head", None)
    assert _path(zero3=True, head_trainable=True, grad_enabled=False) == ("recompute", None)
    assert _path(zero3=True, head_trainable=True, fp16_logits=True) == ("zero3_head", None)
    with pytest.raises(ValueError, match="impossible"):
        _path(zero3=True, recompute=False)


def test_trainer_keeps_one_workspace_across_steps(tmp_path):
    """QwenTrainer hands its LossWorkspace to every loss call: a frozen head's logits reuse one buffer from step to
    step, and the loss and gradients stay those of transformers' own loss."""
    from transformers import TrainingArguments

    from qwen_tune.train.trainer import QwenTrainer

    model, input_ids, labels = _tiny_qwen2()
    model.lm_head.weight.requires_grad_(False)  # as with LoRA on a chat model
    trainer = QwenTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True,
                                                              report_to="none"), compile_loss=False)
    batch = {"input_ids": input_ids, "labels": labels}
    ptrs = []
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        ref = model(input_ids=input_ids, labels=labels).loss
        ref.backward()
        ref_grads = _model_grads(model)
        model.zero_grad(set_to_none=True)
        loss = trainer.compute_loss(model, dict(batch))
        loss.backward()
        torch.testing.assert_close(loss, ref, atol=ATOL, rtol=0)
        grads = _model_grads(model)
        assert grads.keys() == ref_grads.keys() and "lm_head.weight" not in grads
        for k in grads:
            torch.testing.assert_close(grads[k], ref_grads[k], atol=ATOL, rtol=0)
        ptrs.append(trainer.loss_workspace.buffer.data_ptr())
    assert ptrs[0] == ptrs[1]
