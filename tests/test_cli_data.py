"""`qwen-tune data check|tokenize|preview` on the bundled example files."""

from __future__ import annotations

import json

from conftest import EXAMPLES, run_cli
from test_template import reference_preprocess


def test_tokenize_writes_reference_labels_in_input_order(tmp_path, tokenizer):
    out = tmp_path / "tok.jsonl"
    assert run_cli("data", "tokenize", "--data", str(EXAMPLES / "example.json"), "--max-len", "256",
                   "--out", str(out)) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    records = json.loads((EXAMPLES / "example.json").read_text())
    by_id = {r["id"]: r for r in records}
    assert [r["id"] for r in rows] == [r["id"] for r in records if r["id"] in {x["id"] for x in rows}]
    assert len(rows) >= len(records) - 5  # only samples cut down to prompt-only are dropped
    for row in rows:
        conv = by_id[row["id"]]["conversations"]
        if conv[0]["from"] == "system":
            ids, labels = reference_preprocess(tokenizer, conv[1:], 256, system_message=conv[0]["value"])
        else:
            ids, labels = reference_preprocess(tokenizer, conv, 256)
        assert row["input_ids"] == ids and row["labels"] == labels, row["id"]
        assert set(row) == {"id", "input_ids", "labels"}


def test_tokenize_with_checkpoint_tokenizer_dir(tmp_path):
    from qwen_tune.data.tokenizer import export_qwen2_tokenizer

    tok_dir = tmp_path / "qwen2_tok"
    export_qwen2_tokenizer(tok_dir)
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    data = str(EXAMPLES / "sharegpt.json")
    assert run_cli("data", "tokenize", "--data", data, "--max-len", "512", "--out", str(a)) == 0
    assert run_cli("data", "tokenize", "--data", data, "--max-len", "512", "--model", str(tok_dir),
                   "--template", "chatml", "--out", str(b)) == 0
    assert a.read_text() == b.read_text() and a.read_text().count("\n") == 8
    # By default the dir's own chat template (a Qwen2 ChatML one) is used: same ids, assistant_only labels.
    c = tmp_path / "c.jsonl"
    assert run_cli("data", "tokenize", "--data", data, "--max-len", "512", "--model", str(tok_dir),
                   "--out", str(c)) == 0
    ref, tpl = ([json.loads(x) for x in f.read_text().splitlines()] for f in (a, c))
    assert [r["input_ids"] for r in ref] == [r["input_ids"] for r in tpl]
    assert all(r["labels"][0] == -100 for r in tpl) and all(r["labels"][0] != -100 for r in ref)


def test_check_reports_histogram_truncation_and_bad_records(capsys):
    assert run_cli("data", "check", str(EXAMPLES / "example.json"), str(EXAMPLES / "bad_records.jsonl"),
                   "--max-len", "512") == 0
    out = capsys.readouterr().out
    assert "format qwen" in out and "p50" in out and "p99" in out
    assert "over max_len:" in out and "tail-truncated" in out
    assert "6 invalid" in out and "bad_records.jsonl:5" in out and "conversations[1].from" in out


def test_check_strict_fails_on_first_bad_record(capsys):
    assert run_cli("data", "check", str(EXAMPLES / "bad_records.jsonl"), "--strict") == 2
    err = capsys.readouterr().err
    assert "bad_records.jsonl:2" in err and "invalid JSON" in err and "Traceback" not in err


def test_preview_shows_trained_spans(capsys):
    assert run_cli("data", "preview", str(EXAMPLES / "openai_messages.jsonl"), "-n", "1") == 0
    out = capsys.readouterr().out.replace("\u27e6", "").replace("\u27e7", "")  # the not-a-tty span marks
    assert "<|im_start|>system" in out and "<|im_start|>assistant" in out and "trained" in out


def test_preview_piped_marks_trained_spans_in_plain_text(tmp_path, capsys):
    # capsys is not a tty: what `qwen-tune data preview ... | less` or `> file` gets.
    answer = ("The answer is [bold]not markup[/bold], and this sentence is long enough to be wrapped by rich " * 3).strip()
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"id": "[data]", "conversations": [{"from": "user", "value": "Question [q]?"},
                                                                 {"from": "assistant", "value": answer}]}) + "\n")
    assert run_cli("data", "preview", str(f)) == 0
    out = capsys.readouterr().out
    assert "id=[data]" in out and "[bold]not markup[/bold]" in out and "\x1b[" not in out
    # ChatML reference masking: the assistant's answer and its <|im_end|> are trained, the prompt is not.
    # Reference masking trains the answer, <|im_end|>, the "\n" after it and each <|im_start|>; never the prompt.
    assert f"\u27e6{answer}<|im_end|>\n\u27e7" in out
    assert "\u27e7user\nQuestion [q]?\u27e6<|im_end|>" in out
    assert max(len(line) for line in out.splitlines()) > len(answer)  # one line, not wrapped at 80 columns
