"""Hostile data files: each bad record is one located error, every other record survives, nothing crashes."""

from __future__ import annotations

import json
import time

import pytest
from conftest import run_cli

from qwen_tune.config import DataConfig, DatasetSpec
from qwen_tune.data.dataset import load_conversations, prepare_data
from qwen_tune.data.formats import DataError, read_records
from qwen_tune.data.report import DataReport, write_errors

GOOD = [{"id": f"g{i}", "conversations": [{"from": "user", "value": f"hi {i}"},
                                         {"from": "assistant", "value": f"hello {i}"}]} for i in range(3)]
DEEP = '{"id": "deep", "conversations": ' + "[" * 100_000 + "]" * 100_000 + "}"
HUGE_INT = '{"id": "int", "conversations": [{"from": "user", "value": ' + "9" * 5000 + "}]}"


def _load(path, fmt="auto"):
    report = DataReport()
    convs = load_conversations(DatasetSpec(path=str(path), format=fmt), report)
    return convs, report


def _jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("bad,reason", [(DEEP, "too_deep"), (HUGE_INT, "invalid_json")], ids=["deep", "huge-int"])
def test_deep_nesting_and_huge_integers_cost_one_record_in_jsonl_and_json_lists(tmp_path, bad, reason):
    """Before: RecursionError / ValueError tracebacks (JSONL), and the whole JSON list lost."""
    good = [json.dumps(g) for g in GOOD]
    for path in (_jsonl(tmp_path / "a.jsonl", [good[0], bad, good[1], good[2]]),
                 _jsonl(tmp_path / "a.json", ["[", good[0] + ",", bad + ",", good[1] + ",", good[2], "]"])):
        convs, report = _load(path)
        assert [c.id for c in convs] == ["g0", "g1", "g2"], path
        assert report.records == 4 and dict(report.skipped) == {reason: 1}
        (loc,) = report.locations
        assert (loc["file"], loc["index"], loc["line"]) == (str(path), 1, 2 if path.suffix == ".jsonl" else 3)


@pytest.mark.parametrize("record,fld", [
    ({"id": "a1", "instruction": None, "output": "x"}, "instruction"),
    ({"id": "a2", "instruction": "q", "output": None}, "output"),
    ({"id": "s1", "conversations": [{"from": "human", "value": None}, {"from": "gpt", "value": "x"}]},
     "conversations[0].value"),
    ({"id": "q1", "conversations": [{"from": "user", "value": "x"}, {"from": "assistant", "value": None}]},
     "conversations[1].value"),
    ({"id": "o1", "messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "x"}]},
     "messages[0].content"),
    ({"id": "o2", "messages": [{"role": "user", "content": "x"},
                               {"role": "assistant", "content": "y", "reasoning_content": 5}]},
     "messages[1].reasoning_content"),
], ids=["alpaca-instruction", "alpaca-output", "sharegpt", "qwen", "openai", "openai-reasoning"])
def test_null_where_a_string_belongs_is_located(tmp_path, tokenizer, record, fld):
    """Before: Alpaca's null instruction/output passed validation and crashed the encoder (TypeError)."""
    good = json.loads(json.dumps(record).replace("null", '"text"').replace(": 5", ': "why"'))
    good["id"] = "ok"
    path = _jsonl(tmp_path / "d.jsonl", [json.dumps(record), json.dumps(good)])
    convs, report = _load(path)
    assert len(convs) == 1 and report.skipped.total() == 1
    assert report.locations[0]["field"] == fld and report.locations[0]["id"] == record["id"]
    data = prepare_data(DataConfig(path=str(path), max_len=64), tokenizer, use_cache=False)
    assert data.reports[0].kept == 1


def test_lone_surrogate_is_refused_by_check_and_train_alike(tmp_path, tokenizer, capsys):
    """Before: `data check` accepted it and `train` crashed in the tokenizer (UnicodeEncodeError)."""
    bad = '{"id": "sur", "conversations": [{"from": "user", "value": "a\\ud800b"}, {"from": "assistant", "value": "x"}]}'
    path = _jsonl(tmp_path / "s.jsonl", [json.dumps(GOOD[0]), bad])
    assert run_cli("data", "check", str(path), "--max-len", "64") == 0
    out = capsys.readouterr().out
    assert "1 invalid" in out and "s.jsonl:2 record 1 (id='sur') field `conversations[0].value`" in out
    data = prepare_data(DataConfig(path=str(path), max_len=64), tokenizer, use_cache=False)
    assert data.reports[0].kept == 1 and dict(data.reports[0].skipped) == {"invalid_text": 1}


def test_jsonl_whose_first_record_is_an_array_keeps_the_others(tmp_path):
    """Before: the file was parsed as one JSON list ("Extra data") and every record was lost."""
    path = _jsonl(tmp_path / "a.jsonl", ["[1, 2]", *(json.dumps(g) for g in GOOD)])
    convs, report = _load(path)
    assert [c.id for c in convs] == ["g0", "g1", "g2"] and dict(report.skipped) == {"not_an_object": 1}


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_utf8_bom_is_skipped(tmp_path, suffix):
    """Before: "Unexpected UTF-8 BOM" / invalid JSON on the first record."""
    path = tmp_path / f"bom{suffix}"
    body = json.dumps(GOOD) if suffix == ".json" else "\n".join(json.dumps(g) for g in GOOD)
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    convs, report = _load(path)
    assert [c.id for c in convs] == ["g0", "g1", "g2"] and report.lost == 0


@pytest.mark.parametrize("content", ["", "  \n\n ", "[]", " [ ] "], ids=["empty", "whitespace", "list", "spaced"])
def test_empty_files_are_named(tmp_path, content, capsys):
    """Before: "<data>: cannot detect the data format" without the file's name."""
    path = tmp_path / "empty.json"
    path.write_text(content)
    with pytest.raises(DataError, match="empty.json: the (JSON list|file) is empty"):
        _load(path)
    assert run_cli("data", "check", str(path)) == 2
    assert "empty.json" in capsys.readouterr().err


def test_every_bad_record_is_listed_and_written(tmp_path, capsys):
    """Before: 3 examples per reason, the other bad records could not be found."""
    bad = [json.dumps({"id": f"b{i}", "conversations": [{"from": "robot", "value": "x"}]}) for i in range(7)]
    path = _jsonl(tmp_path / "b.jsonl", [json.dumps(GOOD[0]), *bad])
    errors = tmp_path / "data_errors.jsonl"
    assert run_cli("data", "check", str(path), "--all", "--errors", str(errors)) == 0
    out = capsys.readouterr().out
    assert all(f"(id='b{i}')" in out for i in range(7))
    rows = [json.loads(x) for x in errors.read_text().splitlines()]
    assert [(r["line"], r["id"], r["field"]) for r in rows] == [(i + 2, f"b{i}", "conversations[0].from") for i in range(7)]
    assert run_cli("data", "check", str(path)) == 0
    assert "4 more" in capsys.readouterr().out
    _, report = _load(path)
    assert write_errors(tmp_path / "again.jsonl", [report]) == 7


@pytest.mark.parametrize("name", ["./missing.json", "data/sub/x", "missing.jsonl", "/abs/x", "~/x"])
def test_missing_local_path_is_not_looked_up_on_the_hub(name):
    """Before: load_dataset tried the Hub with retries (about 30 s online) for what is clearly a path."""
    start = time.monotonic()
    with pytest.raises(DataError, match="no such data file or directory"):
        _load(name)
    assert time.monotonic() - start < 2


def test_columns_map_custom_names(tmp_path, tokenizer):
    """Before: "cannot detect the data format" for any record whose keys are not the standard names."""
    a = _jsonl(tmp_path / "a.jsonl", [json.dumps({"id": "x", "instruction_text": "q", "output_text": "a",
                                                  "sys": "be brief"})])
    b = _jsonl(tmp_path / "b.jsonl", [json.dumps({"id": "y", "dialog": [{"role": "user", "content": "q"},
                                                                        {"role": "assistant", "content": "a"}]})])
    cfg = DataConfig(columns={"prompt": "instruction_text", "response": "output_text", "system": "sys"},
                     datasets=[{"path": str(a)}, {"path": str(b), "columns": {"messages": "dialog"}}], max_len=64)
    report = DataReport()
    convs = [c for s in cfg.datasets for c in load_conversations(s, report)]
    assert [(c.id, c.system, c.turns) for c in convs] == [("x", "be brief", [("user", "q"), ("assistant", "a")]),
                                                          ("y", None, [("user", "q"), ("assistant", "a")])]
    assert prepare_data(cfg, tokenizer, use_cache=False).reports[0].kept == 2
    with pytest.raises(DataError, match="cannot detect the data format"):
        load_conversations(DatasetSpec(path=str(a)), DataReport())


def test_data_check_columns_flag(tmp_path, capsys):
    path = _jsonl(tmp_path / "c.jsonl", [json.dumps({"id": "x", "q": "hi", "a": "yo"})])
    assert run_cli("data", "check", str(path), "--columns", "prompt=q,response=a") == 0
    assert "1 kept" in capsys.readouterr().out
    assert run_cli("data", "check", str(path), "--columns", "question=q") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --columns 'question=q': names are") and "\n" not in err
