"""Fuzzers (hypothesis, fixed seed, bounded budget) over every data format and every recipe field.

Data: files (JSON list and JSONL) mixing valid records of each format (Qwen, ShareGPT, OpenAI, Alpaca, tool calls,
reasoning) with malformed ones go through what `train` runs (prepare_data) and what `data check` runs (the CLI).
Nothing may raise but a one-line DataError; every malformed record is located (file, line, record, id, field);
read = kept + invalid + dropped; and the valid records come out with the ids and labels they get when encoded alone.
Recipes: hostile values and unknown keys for every field, as CLI overrides and in YAML files, give one short line
naming the key or the override. Budget: QWEN_TUNE_FUZZ_EXAMPLES examples per fuzzer (default below).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwen_tune.config import ConfigError, DataConfig, Recipe, _all_keys, load_recipe
from qwen_tune.data.chat_template import make_encoder
from qwen_tune.data.dataset import load_conversations, prepare_data
from qwen_tune.data.formats import DataError
from qwen_tune.data.report import DataReport

# Each data example runs the whole train and `data check` paths (a few seconds on 2 cores); a recipe one is cheap.
N = int(os.environ.get("QWEN_TUNE_FUZZ_EXAMPLES", "6"))
FUZZ = settings(max_examples=N, derandomize=True, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))
FUZZ_RECIPES = settings(FUZZ, max_examples=N * 8)
MAX_LEN = 256
COUNTS = {"files": 0, "records": 0, "malformed": 0, "failures": 0, "recipes": 0, "recipe_errors": 0}

# Text pieces: control-token strings must stay plain text, multi-byte characters must survive.
PIECES = ["a", "b c", "\n", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>", "é", "中文", "🙂", "\\",
          '"', "{}"]
text = st.lists(st.sampled_from(PIECES), min_size=1, max_size=4).map("".join)

# data format -> spec format
FORMATS = {"qwen": "qwen", "sharegpt": "sharegpt", "openai": "openai", "alpaca": "alpaca",
           "openai_tools": "openai", "openai_reasoning": "openai", "sharegpt_tools": "sharegpt"}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


@st.composite
def valid_record(draw, fmt: str, rid: str) -> tuple[dict, str]:
    """A valid record and the path of its first user text (the field malformed variants break)."""
    t = lambda: draw(text)  # noqa: E731
    sys = draw(st.booleans())
    if fmt in ("qwen", "sharegpt"):
        u, a = ("user", "assistant") if fmt == "qwen" else ("human", "gpt")
        turns = [{"from": u, "value": t()}, {"from": a, "value": t()}] * draw(st.integers(1, 2))
        return {"id": rid, "conversations": turns, **({"system": t()} if sys else {})}, "conversations[0].value"
    if fmt == "sharegpt_tools":
        call = json.dumps({"name": "get_weather", "arguments": {"city": t()}})
        turns = [{"from": "human", "value": t()}, {"from": "function_call", "value": call},
                 {"from": "observation", "value": t()}, {"from": "gpt", "value": t()}]
        return {"id": rid, "conversations": turns, "tools": json.dumps(TOOLS)}, "conversations[0].value"
    if fmt == "alpaca":
        rec = {"id": rid, "instruction": t(), "input": draw(st.sampled_from(["", None, "ctx"])), "output": t()}
        if sys:
            rec["system"] = t()
        if draw(st.booleans()):
            rec["history"] = [[t(), t()]]
        return rec, "instruction"
    msgs = [{"role": "system", "content": t()}] if sys else []
    msgs.append({"role": "user", "content": t()})
    rec: dict = {"id": rid, "messages": msgs}
    if fmt == "openai_tools":
        args = draw(st.sampled_from([{"city": "x"}, json.dumps({"city": "y"})]))
        msgs += [{"role": "assistant", "content": None, "tool_calls": [
                     {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": args}}]},
                 {"role": "tool", "tool_call_id": "c1", "content": t()}]
        rec["tools"] = TOOLS
    msgs.append({"role": "assistant", "content": t(),
                 **({"reasoning_content": t()} if fmt == "openai_reasoning" else {})})
    return rec, f"messages[{int(sys)}].content"


def _set(rec: dict, where: str, value) -> None:
    node: object = rec
    parts = where.replace("]", "").replace("[", ".").split(".")
    for p in parts[:-1]:
        node = node[int(p)] if p.isdigit() else node[p]  # type: ignore[index]
    node[parts[-1]] = value  # type: ignore[index]


# kind -> (reason, located field, whether the id can be read, whether the text still parses as a JSON list item)
MALFORMED = ["truncated", "deep", "huge_int", "not_utf8", "array", "scalar", "null_text", "wrong_type", "surrogate",
             "missing_key", "unknown_role", "empty_turns", "bad_tools", "deep_tools"]
SYNTAX_BREAKING = {"truncated", "not_utf8"}  # in a JSON list these break the file, so only JSONL gets them


def malformed_line(kind: str, rec: dict, fmt: str, where: str, draw) -> tuple[bytes, str | None, bool]:
    """(raw line, located field or None, whether the id is readable)."""
    key = {"alpaca": "instruction"}.get(fmt, "messages" if fmt.startswith("openai") else "conversations")
    if kind == "truncated":
        return json.dumps(rec).encode()[: draw(st.integers(1, 20))], None, False
    if kind == "deep":
        return ('{"id": "%s", "x": ' % rec["id"] + "[" * 50_000 + "]" * 50_000 + "}").encode(), None, False
    if kind == "huge_int":
        return json.dumps(rec).replace('"id":', '"n": ' + "7" * 5000 + ', "id":', 1).encode(), None, False
    if kind == "not_utf8":
        return json.dumps(rec).encode().replace(b'"id"', b'"\xff\xfeid"', 1), None, False
    if kind == "array":
        return json.dumps([rec]).encode(), None, False
    if kind == "scalar":
        return draw(st.sampled_from([b"42", b"null", b'"text"', b"true"])), None, False
    if kind == "null_text":
        _set(rec, where, None)
        return json.dumps(rec).encode(), where, True
    if kind == "wrong_type":
        _set(rec, where, draw(st.sampled_from([5, 1.5, ["x"], {"a": 1}, True])))
        return json.dumps(rec).encode(), where, True
    if kind == "surrogate":
        return json.dumps(rec).replace(json.dumps(_get(rec, where)), '"x\\udc80y"', 1).encode(), where, True
    if kind == "missing_key":
        rec.pop("output" if fmt == "alpaca" else key)
        return json.dumps(rec).encode(), "output" if fmt == "alpaca" else key, True
    if kind == "unknown_role" and fmt != "alpaca":
        first = rec[key][0]
        first["from" if "from" in first else "role"] = "robot"
        return json.dumps(rec).encode(), f"{key}[0].{'from' if 'from' in first else 'role'}", True
    if kind == "empty_turns" and fmt != "alpaca":
        rec[key] = []
        rec.pop("system", None)
        return json.dumps(rec).encode(), key, True
    if kind in ("bad_tools", "deep_tools") and fmt != "alpaca":
        rec["tools"] = 5 if kind == "bad_tools" else "[" * 50_000 + "]" * 50_000
        return json.dumps(rec).encode(), "tools", True
    rec["history"] = "not a list"  # alpaca stand-in for the turn-level kinds
    rec.pop("system", None)
    return json.dumps(rec).encode(), "history", True


def _get(rec: dict, where: str):
    node: object = rec
    for p in where.replace("]", "").replace("[", ".").split("."):
        node = node[int(p)] if p.isdigit() else node[p]  # type: ignore[index]
    return node


@st.composite
def data_file(draw) -> dict:
    fmt = draw(st.sampled_from(sorted(FORMATS)))
    layout = draw(st.sampled_from(["jsonl", "json"]))
    kinds = draw(st.lists(st.sampled_from(["valid"] + MALFORMED), min_size=6, max_size=20))
    kinds = [k for k in kinds if not (layout == "json" and k in SYNTAX_BREAKING)] + ["valid"]
    draw(st.randoms()).shuffle(kinds)
    rows = []
    for i, kind in enumerate(kinds):
        rid = f"{'v' if kind == 'valid' else 'm'}{i}"
        rec, where = draw(valid_record(fmt, rid))
        if kind == "valid":
            rows.append({"kind": kind, "raw": json.dumps(rec, ensure_ascii=draw(st.booleans())).encode(), "id": rid})
        else:
            raw, fld, has_id = malformed_line(kind, rec, fmt, where, draw)
            rows.append({"kind": kind, "raw": raw, "id": rid if has_id else None, "field": fld})
    return {"fmt": fmt, "layout": layout, "rows": rows, "bom": draw(st.booleans())}


def _write(path: Path, rows: list[dict], layout: str, bom: bool) -> None:
    raws = [r["raw"] for r in rows]
    body = b"[\n" + b",\n".join(raws) + b"\n]\n" if layout == "json" else b"\n".join(raws) + b"\n"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + body)


def _line(layout: str, index: int) -> int:
    return index + 2 if layout == "json" else index + 1


@pytest.fixture(scope="module")
def encoders(tokenizer, family_dirs):
    """Qwen-1's ChatML on its tiktoken tokenizer, and Qwen3's chat template (tools, reasoning) on its fast one."""
    from qwen_tune.data.tokenizer import load_tokenizer

    qwen3 = family_dirs["qwen3"]
    return {"chatml": (tokenizer, [], "chatml"), "qwen3": (load_tokenizer(str(qwen3)), ["--model", str(qwen3)], "auto")}


@given(case=data_file(), which=st.sampled_from(["chatml", "qwen3"]))
@FUZZ
def test_fuzz_data_files(case, which, tmp_path_factory, encoders, capsys):
    tmp = tmp_path_factory.mktemp("fuzz")
    fmt, layout, rows = FORMATS[case["fmt"]], case["layout"], case["rows"]
    if "tools" in case["fmt"] or "reasoning" in case["fmt"]:
        which = "qwen3"  # ChatML has no tool or reasoning format (such samples are dropped, counted)
    tokenizer, model_args, template = encoders[which]
    path = tmp / f"mixed.{layout}"
    _write(path, rows, layout, case["bom"])
    clean = tmp / f"clean.{layout}"
    _write(clean, [r for r in rows if r["kind"] == "valid"], layout, False)
    COUNTS["files"] += 1
    COUNTS["records"] += len(rows)
    COUNTS["malformed"] += sum(r["kind"] != "valid" for r in rows)
    COUNTS["failures"] += 1  # taken back below when every assertion held
    cfg = dict(max_len=MAX_LEN, template=template, num_proc=1)

    # The train path: validation, then datasets.map tokenization.
    data = prepare_data(DataConfig(datasets=[{"path": str(path), "format": fmt}], **cfg), tokenizer, use_cache=False)
    report = data.reports[0]
    assert report.records == len(rows)
    assert report.records == report.kept + sum(report.skipped.values()) + sum(report.dropped.values())
    invalid = {loc["index"]: loc for loc in report.locations if loc["kind"] == "invalid"}
    for i, row in enumerate(rows):
        if row["kind"] == "valid":
            assert i not in invalid, (row, invalid.get(i))
            continue
        loc = invalid[i]  # every malformed record located: file, line, record index, id, field
        assert (loc["file"], loc["line"]) == (str(path), _line(layout, i)), (row["kind"], loc)
        assert loc["id"] == row["id"] or (row["id"] is None and loc["id"] is None), (row["kind"], loc)
        if row["field"] is not None:
            assert loc["field"] == row["field"], (row["kind"], loc)
    assert len(invalid) == sum(r["kind"] != "valid" for r in rows)

    # Every valid record kept, with the ids and labels it gets when encoded alone.
    ref_report = DataReport()
    encoder = make_encoder(tokenizer, MAX_LEN, template=template)
    ref = [s for s in encoder.encode(load_conversations(
        DataConfig(datasets=[{"path": str(clean), "format": fmt}], **cfg).datasets[0], ref_report))
        if not s.drop_reason]
    assert ref_report.lost == 0
    got = data.train
    assert [(s.id, s.input_ids, s.labels) for s in ref] == list(zip(got["id"], got["input_ids"], got["labels"]))

    # The `data check` path: exit 0, no traceback, the same locations in --errors.
    errors = tmp / "data_errors.jsonl"
    rc = run_cli("data", "check", str(path), "--format", fmt, "--template", template, "--max-len", str(MAX_LEN),
                 "--errors", str(errors), *model_args)
    out = capsys.readouterr()
    assert rc == 0 and "Traceback" not in out.out + out.err, out.err
    checked = [json.loads(x) for x in errors.read_text().splitlines()]
    assert sorted(r["index"] for r in checked if r["kind"] == "invalid") == sorted(invalid)
    COUNTS["failures"] -= 1


# ------------------------------------------------------------------------------------------------ recipes

def _leaf_keys() -> list[str]:
    sections = {k for k in _all_keys(Recipe) if any(o.startswith(k + ".") for o in _all_keys(Recipe))}
    return sorted(set(_all_keys(Recipe)) - sections) + ["data.path", "data.eval_path"]


LEAVES = _leaf_keys()
HOSTILE = st.one_of(
    st.sampled_from([None, True, -1, 0, -1e30, 1e300, float("nan"), "", "x" * 5000, [], {}, [[[[[]]]]],
                     {"a": {"b": 1}}, "\x00", "../../etc/passwd", "~", 2**70, "1e-3"]),
    st.integers(-10**6, 10**6), st.floats(allow_nan=False), st.text(max_size=30),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))


def _check_line(msg: str, key: str, override: str | None) -> None:
    assert "\n" not in msg and len(msg) <= 300 and "Traceback" not in msg, msg
    if override is not None:
        assert msg.startswith(f"override {override[:20]}"), msg
    else:
        assert key in msg or key.rpartition(".")[0] in msg, msg


def _base(tmp: Path) -> dict:
    data = yaml.safe_load((ROOT / "qwen_tune" / "recipes" / "tiny.yaml").read_text())
    data["output"]["dir"] = str(tmp / "out")
    return data


@given(key=st.sampled_from(LEAVES), value=HOSTILE, unknown=st.booleans(), via=st.sampled_from(["override", "yaml"]))
@FUZZ_RECIPES
def test_fuzz_recipe_fields(key, value, unknown, via, tmp_path_factory, capsys):
    tmp = tmp_path_factory.mktemp("recipe")
    if unknown:
        key = key + "_x"
    COUNTS["recipes"] += 1
    base = _base(tmp)
    path = tmp / "r.yaml"
    if via == "override":
        path.write_text(yaml.safe_dump(base))
        override = f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
        args = [override]
    else:
        node = base
        for p in key.split(".")[:-1]:
            node = node.setdefault(p, {}) if isinstance(node.get(p), dict) or p not in node else node
        node[key.split(".")[-1]] = value
        path.write_text(yaml.safe_dump(base))
        override, args = None, []
    try:
        load_recipe(str(path), args)
    except ConfigError as e:
        COUNTS["recipe_errors"] += 1
        _check_line(str(e), key, override)
        assert run_cli("train", "--recipe", str(path), *args) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and len(err) <= 310, err
        return
    assert not unknown, f"unknown key {key} accepted"


def test_fuzz_counts_are_reported():
    """Runs last in this file: the counts of the fuzzers above, for the record (and -s)."""
    print(f"\nfuzz counts: {COUNTS}")
    assert COUNTS["failures"] == 0
