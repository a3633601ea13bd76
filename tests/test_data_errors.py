"""Every bad record gets a located error and is counted; nothing is lost silently."""

from __future__ import annotations

import json

import pytest

from qwen_tune.config import DataConfig, DatasetSpec
from qwen_tune.data.dataset import load_conversations, prepare_data
from qwen_tune.data.formats import DataError, detect_format, read_records, to_conversation
from qwen_tune.data.report import DataReport

GOOD = {"id": "ok", "conversations": [{"from": "user", "value": "hi"}, {"from": "assistant", "value": "hello"}]}
BAD_LINES = [
    ('{"id": "j1", "conversations": [', "invalid_json", None),
    (json.dumps({"id": "m1", "convs": []}), "missing_field", "conversations"),
    (json.dumps({"id": "r1", "conversations": [{"from": "robot", "value": "x"}]}), "unknown_role", "conversations[0].from"),
    (json.dumps({"id": "v1", "conversations": [{"from": "user", "value": 3},
                                               {"from": "assistant", "value": "x"}]}), "non_string_value",
     "conversations[0].value"),
    (json.dumps({"id": "e1", "conversations": []}), "empty_conversation", "conversations"),
    (json.dumps({"id": "n1", "conversations": [{"from": "user", "value": "only me"}]}), "no_assistant_turn",
     "conversations"),
]


@pytest.fixture
def bad_file(tmp_path):
    lines = []
    for text, _, _ in BAD_LINES:
        lines += [json.dumps(GOOD), text]
    raw = ("\n".join(lines) + "\n").encode() + b'{"id": "u1", "conversations": "\xff\xfe"}\n'
    path = tmp_path / "bad.jsonl"
    path.write_bytes(raw)
    return path


def test_each_bad_record_is_located(bad_file):
    errors = {}
    for rec in read_records(bad_file):
        try:
            to_conversation(rec, "qwen")
        except DataError as e:
            errors[e.reason] = e
    assert set(errors) == {r for _, r, _ in BAD_LINES} | {"not_utf8"}
    for text, reason, field in BAD_LINES:
        e = errors[reason]
        assert e.file == str(bad_file) and e.field == field
        assert str(bad_file) in str(e) and f"record {e.index}" in str(e)
        if reason != "invalid_json":
            assert e.record_id == json.loads(text)["id"]
    # Line numbers point at the offending line (good and bad lines alternate, 1-based).
    assert errors["invalid_json"].line == 2 and "column" in errors["invalid_json"].detail
    assert errors["not_utf8"].line == 2 * len(BAD_LINES) + 1


def test_skip_mode_counts_and_strict_mode_raises(bad_file):
    report = DataReport()
    convs = load_conversations(DatasetSpec(path=str(bad_file), format="qwen"), report)
    assert len(convs) == len(BAD_LINES)  # the interleaved good records
    assert report.records == 2 * len(BAD_LINES) + 1
    assert sum(report.skipped.values()) == len(BAD_LINES) + 1
    assert all(n == 1 for n in report.skipped.values())
    text = str(report)
    assert "unknown role" in text and str(bad_file) in text
    with pytest.raises(DataError) as ei:
        load_conversations(DatasetSpec(path=str(bad_file), format="qwen"), DataReport(), strict=True)
    assert ei.value.reason == "invalid_json"


def test_invalid_json_list_names_line_and_column(tmp_path):
    p = tmp_path / "broken.json"
    p.write_text('[\n  {"id": 1, "conversations": []},\n  {"id": 2,, }\n]')
    with pytest.raises(DataError) as ei:
        list(read_records(p))
    assert ei.value.line == 3 and "column" in str(ei.value) and str(p) in str(ei.value)


def test_non_utf8_json_list(tmp_path):
    p = tmp_path / "latin1.json"
    p.write_bytes('[{"id": "x", "conversations": [{"from": "user", "value": "caf\xe9"}]}]'.encode("latin-1"))
    with pytest.raises(DataError) as ei:
        list(read_records(p))
    assert ei.value.reason == "not_utf8"


def test_format_detection_and_other_formats(tmp_path):
    assert detect_format({"conversations": [{"from": "human", "value": "x"}]}) == "sharegpt"
    assert detect_format({"conversations": [{"from": "user", "value": "x"}]}) == "qwen"
    assert detect_format({"messages": []}) == "openai"
    assert detect_format({"instruction": "a", "output": "b"}) == "alpaca"
    p = tmp_path / "mixed.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q"},
                      {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]},
    ]))
    report = DataReport()
    convs = load_conversations(DatasetSpec(path=str(p)), report)
    assert convs[0].system == "Be brief." and convs[0].turns == [("user", "q"), ("assistant", "a")]
    assert convs[1].system is None
    a = tmp_path / "alpaca.json"
    a.write_text(json.dumps([{"instruction": "Add", "input": "1 and 2", "output": "3"}]))
    conv = load_conversations(DatasetSpec(path=str(a)), DataReport())[0]
    assert conv.turns == [("user", "Add\n\n1 and 2"), ("assistant", "3")]


def test_prepare_data_counts_truncation_and_drops(tmp_path, tokenizer):
    recs = [
        {"id": "short", "conversations": [{"from": "user", "value": "hi"}, {"from": "assistant", "value": "yo"}]},
        {"id": "long_answer", "conversations": [{"from": "user", "value": "q"},
                                                {"from": "assistant", "value": "word " * 300}]},
        {"id": "long_prompt", "conversations": [{"from": "user", "value": "blah " * 300},
                                                {"from": "assistant", "value": "a"}]},
        {"id": "bad", "conversations": [{"from": "robot", "value": "?"}]},
    ]
    p = tmp_path / "d.json"
    p.write_text(json.dumps(recs))
    cfg = DataConfig(datasets=[DatasetSpec(path=str(p))], max_len=64, cache_dir=str(tmp_path / "cache"))
    data = prepare_data(cfg, tokenizer)
    r = data.reports[0]
    assert r.records == 4 and r.kept == 2 and r.truncated == 2
    assert r.skipped == {"unknown_role": 1} and r.dropped == {"no_assistant_label_after_truncation": 1}
    assert data.train["id"] == ["short", "long_answer"]
    assert max(data.train["length"]) == 64
    # A second run with identical inputs reuses the cache, counts included.
    again = prepare_data(cfg, tokenizer)
    assert again.from_cache and again.train["input_ids"] == data.train["input_ids"]
    assert again.reports[0].to_dict() == r.to_dict()
    # Changing the max length changes the cache key.
    cfg2 = cfg.model_copy(update={"max_len": 128})
    assert not prepare_data(cfg2, tokenizer).from_cache


def test_mixing_weights_and_eval_split(tmp_path, tokenizer):
    def write(name, n):
        p = tmp_path / name
        p.write_text(json.dumps([{"id": f"{name}-{i}", "conversations": [
            {"from": "user", "value": f"q{i}"}, {"from": "assistant", "value": f"a{i}"}]} for i in range(n)]))
        return str(p)

    cfg = DataConfig(datasets=[DatasetSpec(path=write("a.json", 10), weight=2.0),
                               DatasetSpec(path=write("b.json", 10), weight=0.5)],
                     eval_split_ratio=0.2, cache_dir=str(tmp_path / "c"))
    data = prepare_data(cfg, tokenizer)
    eval_ids, train_ids = set(data.eval["id"]), list(data.train["id"])
    # 20% of the 20 unique records are held out before weighting; the weights apply to the rest.
    assert len(data.eval) == len(eval_ids) == 4 and not eval_ids & set(train_ids)
    held_a = sum(i.startswith("a.json") for i in eval_ids)
    assert sum(i.startswith("a.json") for i in train_ids) == 2 * (10 - held_a)
    assert len(train_ids) == 2 * (10 - held_a) + round(0.5 * (10 - (4 - held_a)))


def test_hf_save_to_disk_dataset_and_streaming_mode(tmp_path, tokenizer):
    import datasets

    rows = [{"id": f"r{i}", "conversations": [{"from": "user", "value": f"q{i}"},
                                              {"from": "assistant", "value": f"a{i}"}]} for i in range(6)]
    rows.append({"id": "bad", "conversations": [{"from": "user", "value": "no answer"}]})
    disk = tmp_path / "hf_ds"
    datasets.Dataset.from_list(rows).save_to_disk(str(disk))
    cfg = DataConfig(datasets=[DatasetSpec(path=str(disk))], cache_dir=str(tmp_path / "c"))
    data = prepare_data(cfg, tokenizer)
    assert len(data.train) == 6 and data.reports[0].skipped == {"no_assistant_turn": 1}
    # Streaming: the same samples, encoded lazily.
    jsonl = tmp_path / "s.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    stream = prepare_data(DataConfig(datasets=[DatasetSpec(path=str(jsonl))], streaming=True), tokenizer)
    streamed = list(stream.train)
    assert [s["id"] for s in streamed] == [f"r{i}" for i in range(6)]
    assert [s["input_ids"] for s in streamed] == list(data.train["input_ids"])
