"""How the estimator compares with the Qwen-1 README table (run: ``python -m qwen_tune.estimate.calibration``)."""

from __future__ import annotations

from typing import Any

from .estimator import GB, estimate_memory
from .tables import QWEN1_PUBLISHED, reference_recipe


def reference_comparison() -> list[dict[str, Any]]:
    """Every row of the Qwen-1 README table next to `estimate_memory(..., reference=True)` (sum over GPUs)."""
    out = []
    for (model, method, _), row in QWEN1_PUBLISHED.items():
        for seq, published in row.items():
            recipe, n, cfg = reference_recipe(model, method, seq)
            est = estimate_memory(recipe, gpus=n, model_config=cfg, reference=True)
            total = est.total * n / GB
            out.append({"model": model, "method": method, "gpus": n, "seq": seq, "published": published,
                        "estimate": round(total, 1), "error_pct": round(100 * (total - published) / published, 1)})
    return out


if __name__ == "__main__":  # calibration report: python -m qwen_tune.estimate.calibration
    rows = reference_comparison()
    for r in rows:
        flag = "" if abs(r["error_pct"]) <= 15 else "   outside 15%"
        print(f"{r['model']:10s} {r['method']:15s} {r['gpus']} {r['seq']:5d} {r['published']:7.1f} "
              f"{r['estimate']:7.1f} {r['error_pct']:+6.1f}%{flag}")
    errs = [abs(r["error_pct"]) for r in rows]
    print(f"rows {len(rows)}, within 15%: {sum(e <= 15 for e in errs)}, mean |error| {sum(errs) / len(errs):.1f}%, "
          f"max {max(errs):.1f}%")
