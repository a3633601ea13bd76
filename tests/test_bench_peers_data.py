"""bench/bench_peers.py feeds every toolkit the same conversations in its own format: each format must read back
to the same messages and the same token count, and that count must be what qwen-tune's own encoder trains on
(it is the numerator of every toolkit's real tokens/s). No peer toolkit is needed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def peers_data():
    sys.path.insert(0, str(BENCH))
    try:
        import peers_data

        yield peers_data
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from qwen_tune.models.qwen1.convert_tokenizer import export_qwen2_tokenizer

    d = tmp_path_factory.mktemp("qwen2_tok")
    export_qwen2_tokenizer(d)  # the ChatML chat template the benchmark checkpoint ships
    return AutoTokenizer.from_pretrained(d)


def test_every_format_reads_back_to_the_same_tokens(peers_data, tokenizer, chat_tokenizer):
    from make_data import generate

    from qwen_tune.data.formats import RawRecord, to_conversation
    from qwen_tune.data.template import ChatMLEncoder

    records = generate(6, 3, tokenizer)  # multi-turn, multilingual, code: bench/make_data.py's own mix
    records.append({"id": "edge", "conversations": [{"from": "user", "value": "  spaces \n\n and 🚀 "},
                                                    {"from": "assistant", "value": "<b>x</b>\t"}]})
    want = [peers_data.to_messages(r) for r in records]
    content = peers_data.formats(records)
    assert set(content) == {"openai", "openai_jsonl", "sharegpt"}
    counts = {}
    for fmt, c in content.items():
        c = json.loads(json.dumps(c, ensure_ascii=False))  # as written to and read from disk
        assert peers_data.messages_of(fmt, c) == want, fmt
        counts[fmt] = peers_data.chatml_lengths(chat_tokenizer, peers_data.messages_of(fmt, c))
    assert counts["openai"] == counts["openai_jsonl"] == counts["sharegpt"]

    # qwen-tune reads the OpenAI file with the checkpoint's template: the same tokens, one sample per record.
    convs = [to_conversation(RawRecord("bench", i, r), "openai") for i, r in enumerate(content["openai"])]
    ours = ChatMLEncoder(tokenizer, 1 << 20).encode(convs)
    assert [len(s.input_ids) for s in ours] == counts["openai"]
    # ... and the Qwen `conversations` originals (default system prompt) encode to the same lengths.
    orig = [to_conversation(RawRecord("bench", i, r), "qwen") for i, r in enumerate(records)]
    assert [len(s.input_ids) for s in ChatMLEncoder(tokenizer, 1 << 20).encode(orig)] == counts["openai"]
