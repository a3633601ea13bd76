"""`qwen-tune estimate` before downloading: published Qwen2.5 / Qwen3 configs by name."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli
from qwen_tune.estimate import MODEL_PRESETS, ModelShape, preset_key

# Parameter counts on each model card (huggingface.co/Qwen), in billions: the presets must reproduce them.
PUBLISHED_PARAMS = {"qwen2.5-0.5b": 0.49, "qwen2.5-1.5b": 1.54, "qwen2.5-3b": 3.09, "qwen2.5-7b": 7.61,
                    "qwen2.5-14b": 14.7, "qwen2.5-32b": 32.5, "qwen2.5-72b": 72.7, "qwen3-0.6b": 0.6,
                    "qwen3-1.7b": 1.7, "qwen3-4b": 4.0, "qwen3-8b": 8.2, "qwen3-14b": 14.8, "qwen3-32b": 32.8,
                    "qwen3-30b-a3b": 30.5, "qwen3-235b-a22b": 235.0}


@pytest.mark.parametrize("key", sorted(PUBLISHED_PARAMS))
def test_presets_match_the_published_parameter_counts(key):
    assert ModelShape.from_config(MODEL_PRESETS[key]).total_params / 1e9 == pytest.approx(PUBLISHED_PARAMS[key],
                                                                                            rel=0.02)


def test_hub_names_map_to_presets():
    assert preset_key("Qwen/Qwen2.5-7B-Instruct") == "qwen2.5-7b"
    assert preset_key("/models/Qwen2.5-7B-Instruct") == "qwen2.5-7b"
    assert preset_key("Qwen/Qwen3-30B-A3B-Instruct-2507") == "qwen3-30b-a3b"
    assert preset_key("Qwen/Qwen-1_8B-Chat") == "qwen-1.8b"
    assert preset_key("Qwen/Qwen2.5-8B") is None


def test_readme_qwen25_7b_estimate_line_works(capsys):
    # README: qwen-tune estimate --recipe lora model.path=/models/Qwen2.5-7B-Instruct (not downloaded yet)
    assert run_cli("estimate", "--recipe", "lora", "model.path=/models/Qwen2.5-7B-Instruct", "--json") == 0
    by_path = json.loads(capsys.readouterr().out)
    assert run_cli("estimate", "--recipe", "lora", "model.path=Qwen/Qwen2.5-7B-Instruct", "--json") == 0
    by_hub = json.loads(capsys.readouterr().out)
    assert run_cli("estimate", "--recipe", "lora", "--model", "qwen2.5-7b-instruct", "--json") == 0
    by_flag = json.loads(capsys.readouterr().out)
    assert by_path["total"] == by_hub["total"] == by_flag["total"]
    assert by_path["params_total"] == pytest.approx(7.62e9, rel=0.01)
    assert any("qwen2.5-7b" in n for n in by_path["notes"])
    assert run_cli("estimate", "--recipe", "lora", "--model", "qwen3-235b-a22b") == 0
    assert "GB" in capsys.readouterr().out


def test_unknown_model_name_lists_the_presets(capsys):
    assert run_cli("estimate", "--recipe", "lora", "--model", "Qwen/Qwen9-7B") == 2
    err = capsys.readouterr().err
    assert "qwen2.5-7b" in err and "qwen3-30b-a3b" in err and "Traceback" not in err
