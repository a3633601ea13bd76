"""scripts/gpu_check.py --dry-run: the GPU check's own code (pytest -m cuda over tests/gpu on CPU, the budgeted
profile, the summary) runs end to end on CPU, so the prepared script cannot rot before a GPU is available."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

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
