"""The chat-template path's tiktoken shortcut gives the HF tokenizer's ids and labels exactly, and only where the
tokenizer is verified to be qwen.tiktoken's BPE (family tokenizers: tests/conftest.py `family_dirs`)."""

from __future__ import annotations

import json
import re
import shutil
from array import array

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, normalizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from qwen_tune.constants import cache_root
from qwen_tune.data import fast_bpe
from qwen_tune.data.chat_template import ChatTemplate, TemplateEncoder
from qwen_tune.data.formats import Conversation

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}


_ENCODERS: dict[str, tuple[TemplateEncoder, TemplateEncoder]] = {}


def encoders(tok, family_dirs, family):
    """(fast path, HF path) encoders of a family, built once (hypothesis calls this per example)."""
    if family not in _ENCODERS:
        f = family_dirs[family] / "chat_template.jinja"
        tpl = ChatTemplate("checkpoint", f.read_text() if f.exists() else tok.chat_template, family)
        _ENCODERS[family] = TemplateEncoder(tok, tpl, 10**6), TemplateEncoder(tok, tpl, 10**6, fast=False)
        assert _ENCODERS[family][0].fast_path() is not None  # decided now, not after a million characters
    return _ENCODERS[family]


def same(fast, slow, convs):
    a, b = fast.encode(convs), slow.encode(convs)
    for c, x, y in zip(convs, a, b):
        assert (x.input_ids, x.labels, x.drop_reason, x.notes, x.truncated) == \
            (y.input_ids, y.labels, y.drop_reason, y.notes, y.truncated), c


# One family per vocabulary size (the template does not enter the check); test_chat_templates.py runs all nine
# families' exactness tests with the fast path on and asserts it is taken.
@pytest.mark.parametrize("family", ["qwen2-instruct", "qwen2.5-instruct", "qwen3"])
def test_every_vocabulary_takes_the_fast_path(family, family_tok, family_dirs):
    fast, slow = encoders(family_tok(family), family_dirs, family)
    assert fast.fast_path() is not None, fast.fast_reason
    assert slow.fast_path() is None and slow.fast_reason == "disabled"
    c = Conversation("c", [("user", "Hi 你好 😀"), ("assistant", "\n\n  Hello <think> e\u0301")])
    same(fast, slow, [c])


# Pieces chosen for the seams: leading newlines/spaces that merge with the header's "\n", multi-byte chars that
# BPE splits inside a character (emoji, CJK), combining marks (non-NFC text goes through HF), control tokens
# typed in data (stay text), non-special added tokens typed in data (<think>, <tool_call>: become their token).
_PIECES = ["a", "Hello", " world", "'s", "’", "\n", "\n\n", "  ", "\t", " ", "1", "42", ".", "!?", "你好", "世界",
           "こんにちは", "😀", "👍🏽", "🇫🇷", "e", "\u0301", "\u0308", "é", "\u1100\u1161", "Å", "Ω",
           "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>", "<tool_call>", "</tool_call>",
           "<|fim_prefix|>", "<|im_", "|>", "assistant\n", "<tool_response>"]
_text = st.lists(st.sampled_from(_PIECES), max_size=12).map("".join)


@st.composite
def conversations(draw, tools: bool):
    turns, extras = [], []
    for k in range(draw(st.integers(1, 3))):
        turns.append(("user", draw(_text.filter(str.strip))))
        extra = {}
        if draw(st.booleans()):
            extra["reasoning_content"] = draw(_text)
        if tools and draw(st.booleans()):
            extra["tool_calls"] = [{"type": "function", "function": {"name": "get_weather",
                                                                     "arguments": {"city": draw(_text)}}}]
        turns.append(("assistant", draw(_text)))
        extras += [{}, extra]
        if "tool_calls" in extra:
            turns.append(("tool", draw(_text)))
            extras.append({})
            turns.append(("assistant", draw(_text)))
            extras.append({})
    system = draw(st.one_of(st.none(), _text))
    return Conversation("h", turns, system, extras=extras if any(extras) else None,
                        tools=[WEATHER] if tools else None)


@pytest.mark.parametrize("family", ["qwen1.5-chat", "qwen2.5-instruct", "qwen3", "qwen3-coder"])
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(data=st.data())
def test_fast_path_equals_the_hf_path(family, data, family_tok, family_dirs):
    tok = family_tok(family)
    fast, slow = encoders(tok, family_dirs, family)
    convs = data.draw(st.lists(conversations(family != "qwen1.5-chat"), min_size=1, max_size=4))
    same(fast, slow, convs)
    msgs = convs[0].messages()[:-1] or convs[0].messages()
    assert fast.encode_prompt(msgs, convs[0].tools) == slow.encode_prompt(msgs, convs[0].tools)


def test_non_nfc_run_falls_back_and_matches(family_tok, family_dirs):
    fast, slow = encoders(family_tok("qwen3"), family_dirs, "qwen3")
    run = "assistant\nCafe\u0301"
    assert fast.fast_path().encode(run) is None  # tiktoken cannot normalize: that run goes through HF
    c = Conversation("n", [("user", "e\u0301\u0301"), ("assistant", "Cafe\u0301 \u1100\u1161")])
    same(fast, slow, [c])
    assert "Caf\u00e9" in family_tok("qwen3").decode(fast.encode([c])[0].input_ids)  # NFC, as HF does


def test_runs_keep_tiktokens_surrogate_fallback_and_skip_nothing_for_ascii(family_tok, family_dirs):
    """Runs go to tiktoken's core directly; a lone surrogate (which the core cannot take) gets the public method's
    replacement, and an ASCII run (NFC by definition, so no normalization scan) the same ids as any."""
    fast, _ = encoders(family_tok("qwen3"), family_dirs, "qwen3")
    runs = fast.fast_path()
    public = fast_bpe._load_bpe(None).encoding.encode_ordinary
    for run in ("user\nplain ascii text " * 20, "assistant\na\ud800b", "user\n你好 <think>\nx\n</think>"):
        ids = array("i", runs.encode(run)).tolist()  # the fast path's int32 bytes
        pieces = re.split("(<think>|</think>)", run)
        want = [t for piece in pieces if piece for t in
                ([family_tok("qwen3").convert_tokens_to_ids(piece)] if piece in ("<think>", "</think>")
                 else public(piece))]
        assert ids == want


def test_a_different_vocabulary_does_not_take_the_fast_path(family_dirs, tmp_path):
    src = family_dirs["qwen2.5-instruct"]
    data = json.loads((src / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    vocab["hello"], vocab["Ġworld"] = vocab["Ġworld"], vocab["hello"]  # same strings, two ids swapped
    d = tmp_path / "swapped"
    shutil.copytree(src, d)
    (d / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
    tok = PreTrainedTokenizerFast.from_pretrained(str(d))
    enc = TemplateEncoder(tok, ChatTemplate("checkpoint", tok.chat_template or
                                            (src / "chat_template.jinja").read_text(), "swapped"), 10**6)
    assert enc.fast_path() is None and "vocabulary differs from qwen.tiktoken" in enc.fast_reason
    c = Conversation("s", [("user", "hello world"), ("assistant", "hello world")])
    ids = enc.encode([c])[0].input_ids  # still exact, through the HF tokenizer
    assert ids == tok.apply_chat_template(c.messages(), tokenize=True, return_dict=False)


def test_a_different_pipeline_or_added_token_does_not_take_the_fast_path(family_dirs):
    tok = AutoTokenizer.from_pretrained(family_dirs["qwen3"])  # a private copy: it is modified
    tok.backend_tokenizer.normalizer = normalizers.NFKC()
    runs, why = fast_bpe.tiktoken_runs(tok)
    assert runs is None and "normalizer" in why
    tok.backend_tokenizer.normalizer = normalizers.NFC()
    assert fast_bpe.tiktoken_runs(tok)[0] is not None
    tok.add_tokens([AddedToken("<x>", lstrip=True, normalized=False)])
    runs, why = fast_bpe.tiktoken_runs(tok)
    assert runs is None and "<x>" in why


def test_fingerprint_is_cached_by_file_content(family_dirs, tmp_path):
    d = tmp_path / "tok"
    shutil.copytree(family_dirs["qwen2-instruct"], d)
    tok = AutoTokenizer.from_pretrained(d)
    assert fast_bpe.tiktoken_runs(tok)[0] is not None
    cache = cache_root() / fast_bpe._CACHE_FILE  # the session's (conftest: a temp dir)
    saved = cache.read_text()
    entries = json.loads(saved)
    key = fast_bpe._files_key(tok)
    assert entries.get(key) == "ok"
    try:
        # The cached verdict is what a later run reads (no re-serialization): a wrong entry under this key is
        # believed, which shows the key is the files' content -- changing a file changes the key.
        entries[key] = "not verified"
        cache.write_text(json.dumps(entries))
        assert fast_bpe.tiktoken_runs(tok)[0] is None
        with open(d / "tokenizer.json", "a") as f:  # other bytes, same model: a new key, verified again
            f.write("\n")
        assert fast_bpe._files_key(tok) != key and fast_bpe.tiktoken_runs(tok)[0] is not None
    finally:
        cache.write_text(saved)


def test_fast_path_is_decided_only_once_enough_text_is_seen(family_tok, family_dirs, monkeypatch):
    from qwen_tune.data import chat_template

    tok = family_tok("qwen3")
    tpl = ChatTemplate("checkpoint", (family_dirs["qwen3"] / "chat_template.jinja").read_text(), "qwen3")
    enc = TemplateEncoder(tok, tpl, 10**6)
    c = Conversation("l", [("user", "Hi"), ("assistant", "Hello")])
    first = enc.encode([c])[0]
    assert enc.fast_reason == "not decided yet" and enc._fast is None  # a small data check never parses the ranks
    monkeypatch.setattr(chat_template, "_FAST_PATH_MIN_CHARS", 100)
    second = enc.encode([c] * 5)[0]
    assert enc._fast is not None and enc.fast_reason == ""
    assert (first.input_ids, first.labels) == (second.input_ids, second.labels)


def _classic_one_merge_per_token(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The usual tiktoken -> merges conversion: per token, the two parts tiktoken's BPE leaves on its bytes when
    only lower ranks may merge (written here independently of fast_bpe's own final pairs)."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = [bytes([b]) for b in token]
        while True:
            pairs = [(ranks.get(parts[i] + parts[i + 1]), i) for i in range(len(parts) - 1)]
            r, i = min((p for p in pairs if p[0] is not None and p[0] < rank), default=(None, None))
            if r is None:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        assert len(parts) == 2, token
        merges.append((parts[0], parts[1]))
    return merges


@pytest.fixture(scope="module")
def one_merge_dir(family_dirs, tmp_path_factory):
    """qwen3's tokenizer with the one-merge-per-token list released Qwen2/2.5/3 tokenizer.json files have."""
    from qwen_tune.models.qwen1.tiktoken_bpe import _bytes_to_str, _load_bpe

    data = json.loads((family_dirs["qwen3"] / "tokenizer.json").read_text())
    merges = _classic_one_merge_per_token(_load_bpe(None).ranks)
    data["model"]["merges"] = [[_bytes_to_str(a), _bytes_to_str(b)] for a, b in merges]
    d = tmp_path_factory.mktemp("one_merge")
    shutil.copytree(family_dirs["qwen3"], d, dirs_exist_ok=True)
    (d / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
    return d, data


_MULTILINGUAL = ["Hello, world! It's 2024-06-01; naïve café déjà vu.", "你好，世界！今天天气很好。机器学习",
                 "こんにちは、世界。カタカナとひらがな", "안녕하세요 세계", "Привет, мир! Съешь же ещё этих булок",
                 "مرحبا بالعالم", "नमस्ते दुनिया", "Γειά σου Κόσμε", "สวัสดีชาวโลก", "😀👍🏽🇫🇷👨‍👩‍👧 emoji",
                 "def f(x):\n    return x**2  # comment\n\n\tif x:\r\n", "   lots   of    spaces\n\n\n",
                 "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa ababababababab ==== ---- ....", "ÅΩ\u00e9\u0301 Zürich Straße"]


def test_one_merge_per_token_takes_the_fast_path_and_equals_tiktoken(one_merge_dir, family_dirs):
    from qwen_tune.models.qwen1.tiktoken_bpe import _load_bpe

    d, _ = one_merge_dir
    tok = PreTrainedTokenizerFast.from_pretrained(str(d))
    assert len(tok.backend_tokenizer.model.__getstate__()) < 0.8 * len(
        AutoTokenizer.from_pretrained(family_dirs["qwen3"]).backend_tokenizer.model.__getstate__())
    runs, why = fast_bpe.tiktoken_runs(tok)
    assert runs is not None, why
    enc = _load_bpe(None).encoding
    rng_text = "".join(_MULTILINGUAL)
    for text in _MULTILINGUAL + [rng_text, rng_text[::-1]]:
        ids = tok.backend_tokenizer.encode(text, add_special_tokens=False).ids
        assert ids == enc.encode_ordinary(__import__("unicodedata").normalize("NFC", text)), text
    # every token's own bytes, the hardest pieces: HF must build each token exactly as tiktoken does
    model = tok.backend_tokenizer.model
    bpe = _load_bpe(None)
    for token_str, tid in list(bpe.byte_level_vocab.items())[::7]:
        assert [t.id for t in model.tokenize(token_str)] == [tid]


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(data=st.data())
def test_one_merge_per_token_fast_path_equals_the_hf_path(data, one_merge_dir):
    d, _ = one_merge_dir
    if "one_merge" not in _ENCODERS:
        tok = PreTrainedTokenizerFast.from_pretrained(str(d))
        tpl = ChatTemplate("checkpoint", (d / "chat_template.jinja").read_text(), "qwen3")
        _ENCODERS["one_merge"] = TemplateEncoder(tok, tpl, 10**6), TemplateEncoder(tok, tpl, 10**6, fast=False)
        assert _ENCODERS["one_merge"][0].fast_path() is not None, _ENCODERS["one_merge"][0].fast_reason
    fast, slow = _ENCODERS["one_merge"]
    same(fast, slow, data.draw(st.lists(conversations(True), min_size=1, max_size=4)))


@pytest.mark.parametrize("damage", ["missing", "swapped", "other_split_first"])
def test_merges_not_provably_tiktokens_are_refused(damage, one_merge_dir):
    from qwen_tune.models.qwen1.tiktoken_bpe import _load_bpe

    _, data = one_merge_dir
    model = json.loads(json.dumps(data["model"]))
    merges = model["merges"]  # undamaged it passes: test_one_merge_per_token_takes_the_fast_path...
    vocab = _load_bpe(None).byte_level_vocab
    i = next(i for i, (a, b) in enumerate(merges) if len(a + b) > 4)
    if damage == "missing":
        del merges[i]
    elif damage == "swapped":  # two neighbours in rank order exchanged
        merges[i], merges[i + 1] = merges[i + 1], merges[i]
    else:  # a valid split of a token listed before its final pair
        a, b = merges[i]
        t = a + b
        split = next([t[:k], t[k:]] for k in range(1, len(t)) if t[:k] in vocab and t[k:] in vocab
                     and [t[:k], t[k:]] != [a, b])
        merges.insert(i, split)
    assert "merges differ" in fast_bpe._merges_verdict(model)
