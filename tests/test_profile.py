"""scripts/profile.py end to end on CPU: both sides of every cell train through run_training and get reported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_profile_smoke_on_cpu(tmp_path):
    cmd = [sys.executable, str(REPO / "scripts" / "profile.py"), "--model", "tiny", "--device", "cpu",
           "--methods", "lora_emb,qlora", "--seqs", "64", "--steps", "2", "--grad-accum", "2",
           "--work", str(tmp_path / "work"), "--results-dir", str(tmp_path / "results"), "--name", "smoke"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]

    results = json.loads((tmp_path / "results" / "smoke.json").read_text())["results"]
    assert {(r["method"], r["side"]) for r in results} == {
        (m, s) for m in ("lora_emb", "qlora") for s in ("reference", "qwen-tune")}
    for r in results:
        assert "error" not in r, r
        assert r["steps"] == 2 and len(r["step_times_s"]) == 2 and r["s_per_it"] > 0 and r["peak_rss_gib"] > 0
        assert r["tokens_per_s"] == 64 * 2 / r["s_per_it"]

    table = (tmp_path / "results" / "smoke.md").read_text()
    assert "| lora_emb | 64 |" in table and "| qlora | 64 |" in table

    # Each side ran the recipe it claims: the reference pads to the length with the full-logits loss.
    for method in ("lora_emb", "qlora"):
        ref = yaml.safe_load((tmp_path / "work" / f"run_{method}_64_reference" / "qwen_tune_recipe.yaml").read_text())
        ours = yaml.safe_load((tmp_path / "work" / f"run_{method}_64_qwen-tune" / "qwen_tune_recipe.yaml").read_text())
        assert (ref["training"]["loss"], ref["data"]["packing"], ref["data"]["pad_to_multiple_of"]) == ("plain", False, 64)
        assert (ours["training"]["loss"], ours["data"]["packing"]) == ("chunked", True)
        assert ref["method"] == ours["method"] == ("qlora" if method == "qlora" else "lora")
    base = json.loads((tmp_path / "work" / "run_lora_emb_64_qwen-tune" / "data_report.json").read_text())
    assert base[0]["truncated"] == 4  # every sample was cut to exactly 64 tokens
