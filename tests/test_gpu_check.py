"""scripts/gpu_check.py --dry-run: the GPU check's own code (pytest -m cuda over tests/gpu on CPU, the budgeted
profile, the summary) runs end to end on CPU, so the prepared script cannot rot before a GPU is available.

Its part 2 is scripts/profile.py itself (a process per cell, both sides training through run_training), so this
one run also checks what the profile reports and that each side trained the recipe it claims."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    results = tmp_path / "results"
    cmd = [sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--dry-run", "--work", str(tmp_path / "work"),
           "--results-dir", str(results), "--budget", "1000", "--tests-timeout", "600"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, cwd=REPO)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-3000:]

    [summary] = results.glob("gpu_check_*[0-9].json")
    data = json.loads(summary.read_text())
    tests = data["tests"]
    assert tests["ok"] and tests["counts"]["failed"] == 0
    ran = {c["test"].split("[")[0] for c in tests["cases"] if c["status"] == "passed"}
    # Every GPU test module's logic ran on CPU (liger / flash-attn ones skip where those are not installed).
    for name in ("test_chunked_loss_matches_full_logits_under_autocast", "test_packed_sdpa_with_the_trainers_float_mask",
                 "test_packed_loss_and_gradients_match_separate", "test_gptq_qlora_loss_falls",
                 "test_estimate_matches_cuda_peak"):
        assert any(t.endswith("::" + name) for t in ran), (name, sorted(ran))
    assert {r["kind"] for r in tests["records"]} >= {"loss_vs_full_logits", "packed_vs_separate", "qlora_loss"}

    [run] = data["profile"]
    cells = {(r["method"], r["side"]) for r in run["results"] if "error" not in r}
    assert cells == {(m, s) for m in ("lora", "qlora") for s in ("reference", "qwen-tune")}, run["results"]
    md = summary.with_suffix(".md").read_text()
    assert "Part 1" in md and "PASS" in md and "| tiny | qlora | 64 |" in md
    assert "| tiny | Q-LoRA | qwen-tune | 1 | 1 |" in md  # the published table's layout
    assert (results / f"{summary.stem}_profile_tiny.md").exists()

    # The profile's own numbers: every cell trained its steps (2 accumulated micro-batches of 64 tokens each).
    for r in run["results"]:
        assert r["steps"] == 2 and len(r["step_times_s"]) == 2 and r["s_per_it"] > 0 and r["peak_rss_gib"] > 0, r
        assert r["tokens_per_s"] == 64 * 2 / r["s_per_it"]
    # Each side ran the recipe it claims: the reference pads to the length with the full-logits loss.
    scratch = tmp_path / "work" / "profile_tiny"
    for method in ("lora", "qlora"):
        ref = yaml.safe_load((scratch / f"run_{method}_64_reference" / "qwen_tune_recipe.yaml").read_text())
        ours = yaml.safe_load((scratch / f"run_{method}_64_qwen-tune" / "qwen_tune_recipe.yaml").read_text())
        assert (ref["training"]["loss"], ref["data"]["packing"], ref["data"]["pad_to_multiple_of"]) == ("plain", False, 64)
        assert (ours["training"]["loss"], ours["data"]["packing"]) == ("chunked", True)
        assert ref["method"] == ours["method"] == method
        assert ref["training"]["grad_accum"] == ours["training"]["grad_accum"] == 2
    report = json.loads((scratch / "run_lora_64_qwen-tune" / "data_report.json").read_text())
    assert report[0]["truncated"] == 4  # every sample was cut to exactly 64 tokens
