"""Mixing, splitting and streaming of recipe datasets (qwen_tune/data/dataset.py)."""

from __future__ import annotations

import json

import pytest

from conftest import EXAMPLES
from qwen_tune.config import DataConfig
from qwen_tune.data.dataset import prepare_data


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    recs = json.loads((EXAMPLES / "example.json").read_text())
    root = tmp_path_factory.mktemp("mix")
    (root / "a.json").write_text(json.dumps(recs[:12], ensure_ascii=False))
    (root / "b.json").write_text(json.dumps(recs[12:20], ensure_ascii=False))
    return root


def test_eval_split_holds_out_unique_records_before_weighting(files, tokenizer):
    cfg = DataConfig(datasets=[{"path": str(files / "a.json"), "weight": 3},
                               {"path": str(files / "b.json"), "weight": 0.5}],
                     eval_split_ratio=0.25, max_len=256)
    data = prepare_data(cfg, tokenizer, seed=3, use_cache=False)
    eval_ids, train_ids = set(data.eval["id"]), set(data.train["id"])
    assert len(eval_ids) == len(data.eval) == 5  # floor(20 unique records x 0.25)
    assert not eval_ids & train_ids
    train_tokens = {tuple(x) for x in data.train["input_ids"]}
    assert not any(tuple(x) in train_tokens for x in data.eval["input_ids"])
    # The weights apply to what is left: every remaining a.json record 3 times, half of b.json's.
    a_ids = {r["id"] for r in json.loads((files / "a.json").read_text())}
    held_a = len(eval_ids & a_ids)
    assert len(data.train) == 3 * (12 - held_a) + round(0.5 * (8 - (5 - held_a)))


def test_streaming_tokenizes_eval_files_and_refuses_weights(files, tokenizer):
    from qwen_tune.config import ConfigError

    cfg = DataConfig(datasets=[{"path": str(files / "a.json")}], eval_datasets=[{"path": str(files / "b.json")}],
                     streaming=True, max_len=256)
    data = prepare_data(cfg, tokenizer, use_cache=False)
    assert len(list(data.train)) == 12
    assert data.eval is not None and len(data.eval) == 8
    weighted = DataConfig(datasets=[{"path": str(files / "a.json"), "weight": 2}], streaming=True)
    with pytest.raises(ConfigError, match=r"a\.json \(weight 2\)") as e:
        prepare_data(weighted, tokenizer, use_cache=False)
    assert len(str(e.value).splitlines()) == 1
    with pytest.raises(ConfigError, match="eval_split_ratio"):
        prepare_data(DataConfig(datasets=[{"path": str(files / "a.json")}], eval_split_ratio=0.1, streaming=True),
                     tokenizer, use_cache=False)
