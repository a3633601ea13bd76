"""One prepared GPU check: the CUDA-only tests, then a short profile, then one summary table.

    python scripts/gpu_check.py                          # on a CUDA machine: < 8 minutes
    python scripts/gpu_check.py --install-wheels wheels  # first install the wheels of scripts/collect_gpu_wheels.py
    python scripts/gpu_check.py --dry-run                # the same code paths on CPU, tiny shapes, < 1 minute

Part 1 runs `pytest -m cuda tests/gpu` (chunked loss vs full logits in bf16 / fp16 + GradScaler, liger path and
values, packed == separate through the GPU attention kernels, NF4 and GPTQ Q-LoRA steps whose loss falls, the
memory estimator vs torch.cuda.max_memory_allocated). Its result is the exit code (0 pass, 1 fail).
Part 2 runs scripts/profile.py (reference recipe vs qwen-tune, a process per cell) on random weights of real
configs, cells ordered by importance under an overall time budget; results are written as they arrive.
Everything goes to <--results-dir>/gpu_check_<timestamp>.{md,json} (+ the profile's own files and the tests' log).
See docs/gpu_check.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "scripts" / "profile.py"
OPTIONAL = ("liger_kernel", "flash_attn", "bitsandbytes", "gptqmodel", "optimum", "deepspeed")
PROVIDED = ("torch", "transformers", "peft", "accelerate", "triton")  # what the GPU machine brings

# Profile plans, most important cell first: the 1.5B model covers every method at the lengths that matter most
# (2048, then 8192 where the loss dominates memory, then 256); the 7B cells run only if the budget still allows.
CUDA_PLAN: list[dict[str, Any]] = [
    {"model": "qwen2.5-1.5b", "timeout": 150, "min_left": 60,
     "cells": [f"{m}:{s}" for s in (2048, 8192, 256) for m in ("lora", "qlora", "full", "lora_emb")]},
    {"model": "qwen2.5-7b", "timeout": 240, "min_left": 200, "cells": ["lora:2048", "qlora:2048", "lora:8192"]},
]
DRY_PLAN: list[dict[str, Any]] = [{"model": "tiny", "timeout": 300, "min_left": 0, "cells": ["lora:64", "qlora:64"]}]


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def child_env(device: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               QWEN_TUNE_CHECK_DEVICE=device, **extra)
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def run_group(cmd: list[str], env: dict[str, str], timeout: float, stdout: Any = None) -> int:
    """Run in its own process group and, past the timeout, kill the whole group: a profile cell (a grandchild)
    must not keep the GPU busy after its parent is gone. Returns 124 on timeout."""
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=stdout, stderr=subprocess.STDOUT if stdout else None,
                         start_new_session=True)
    try:
        return p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        return 124


# --------------------------------------------------------------------------- wheels


def install_wheels(folder: Path, ignore_installed: bool = False) -> int:
    """Install, from the collected wheels only (offline, no dependency resolution), the pinned packages that are
    missing here. Installed packages -- torch, transformers, peft, accelerate, triton and whatever else the
    machine has -- are never touched, whatever their version (a differing one is reported)."""
    from importlib.metadata import PackageNotFoundError, version

    req = folder / f"requirements-{sys.version_info.major}.{sys.version_info.minor}.txt"
    if not req.is_file():
        req = folder / "requirements.txt"
    if not req.is_file():
        log(f"--install-wheels {folder}: no requirements.txt (make it with scripts/collect_gpu_wheels.py)")
        return 2

    def installed(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    before = {name: installed(name) for name in PROVIDED}
    log(f"pins: {req}")
    pins = [line.strip() for line in req.read_text().splitlines() if line.strip() and not line.startswith("#")]
    missing, differ = [], []
    for pin in pins:
        name, _, want = pin.partition("==")
        have = installed(name)
        if have is None or ignore_installed:
            missing.append(pin)
        elif have != want:
            differ.append(f"{name} {have} (collected {want})")
    if differ:
        log("kept as installed: " + ", ".join(differ))
    if not missing:
        log("every collected package is already installed")
        return 0
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(folder), "--no-deps",
           *(["--ignore-installed"] if ignore_installed else []), *missing]
    log(f"installing {len(missing)} wheels: " + " ".join(cmd))
    rc = subprocess.run(cmd).returncode
    if rc != 0:
        log(f"pip install failed (exit {rc})")
        return rc
    after = {name: installed(name) for name in PROVIDED}
    if before != after:
        log(f"the install changed provided packages: {before} -> {after}")
        return 3
    subprocess.run([sys.executable, "-m", "pip", "check"])  # informational: prints unmet requirements if any
    return 0


# --------------------------------------------------------------------------- part 1: tests


def run_tests(device: str, work: Path, timeout: float, extra: list[str]) -> dict[str, Any]:
    junit, records = work / "junit.xml", work / "records.jsonl"
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", str(REPO / "tests" / "gpu"), "-q", "-rA",
           "-p", "no:cacheprovider", f"--junitxml={junit}", *extra]
    log(f"part 1: {' '.join(cmd[2:])} (device {device}, timeout {timeout:.0f}s)")
    t0 = time.monotonic()
    logfile = work / "pytest.log"
    with open(logfile, "w", encoding="utf-8") as f:  # streamed to the file: a killed run keeps its output
        rc = run_group(cmd, env=child_env(device, QWEN_TUNE_CHECK_RECORD=str(records)), timeout=timeout, stdout=f)
        if rc == 124:
            f.write(f"\n[gpu_check] pytest timed out after {timeout:.0f}s\n")
    wall = time.monotonic() - t0
    out = logfile.read_text(encoding="utf-8", errors="replace")
    print(out[-6000:], flush=True)
    cases = []
    if junit.exists():
        for tc in ET.parse(junit).getroot().iter("testcase"):
            status = "passed"
            for child in tc:
                if child.tag in ("failure", "error"):
                    status = "failed"
                elif child.tag == "skipped":
                    status = "skipped"
            reason = next((c.get("message", "") for c in tc if c.tag in ("failure", "error", "skipped")), "")
            cases.append({"test": f"{tc.get('classname', '').rsplit('.', 1)[-1]}::{tc.get('name')}",
                          "status": status, "time_s": round(float(tc.get("time", 0) or 0), 2),
                          "reason": reason[:300]})
    recs = [json.loads(line) for line in records.read_text().splitlines() if line.strip()] if records.exists() else []
    counts = {s: sum(c["status"] == s for c in cases) for s in ("passed", "failed", "skipped")}
    ok = rc == 0 and counts["passed"] > 0
    log(f"part 1 {'PASSED' if ok else 'FAILED'} in {wall:.0f}s: {counts} (pytest exit {rc})")
    return {"ok": ok, "exit": rc, "wall_s": round(wall, 1), "counts": counts, "cases": cases, "records": recs}


# --------------------------------------------------------------------------- part 2: profile


def run_profile(device: str, plan: list[dict[str, Any]], work: Path, results_dir: Path, stamp: str,
                deadline: float, steps: int, grad_accum: int, keep_scratch: bool = False) -> list[dict[str, Any]]:
    runs = []
    for entry in plan:
        left = deadline - time.monotonic()
        name = f"gpu_check_{stamp}_profile_{entry['model']}"
        if left < entry["min_left"] or left < 20:
            log(f"part 2: {entry['model']} skipped, {left:.0f}s of the budget left")
            runs.append({"model": entry["model"], "skipped": f"budget ({left:.0f}s left)", "results": []})
            continue
        scratch = work / f"profile_{entry['model']}"
        cmd = [sys.executable, str(PROFILE), "--model", entry["model"], "--device", device,
               "--cells", ",".join(entry["cells"]), "--steps", str(steps), "--grad-accum", str(grad_accum),
               "--timeout", str(entry["timeout"]), "--budget", str(int(left - 10)),
               "--min-cell-s", str(min(30, entry["timeout"])), "--work", str(scratch),
               "--results-dir", str(results_dir), "--name", name]
        if importlib.util.find_spec("deepspeed") is None:  # no wheel on PyPI (sdist only): full runs without it
            cmd += ["--full-deepspeed", "none"]
        log(f"part 2: {' '.join(cmd[1:])}")
        t0 = time.monotonic()
        # The profile enforces its own budget per cell; this outer limit only catches a hang while building.
        rc = run_group(cmd, env=child_env(device), timeout=max(left, 30))
        data = results_dir / f"{name}.json"
        res = json.loads(data.read_text()) if data.exists() else {}
        runs.append({"model": entry["model"], "exit": rc, "wall_s": round(time.monotonic() - t0, 1),
                     "files": [str(results_dir / f"{name}.{ext}") for ext in ("json", "md")],
                     "machine": res.get("machine"), "peak_tflops": res.get("peak_tflops"),
                     "config": res.get("config"), "results": res.get("results", [])})
        if not keep_scratch:  # random-weight checkpoints are big (7B: 30 GB in fp32); a dry run's are tiny
            shutil.rmtree(scratch, ignore_errors=True)
    return runs


# --------------------------------------------------------------------------- summary


def _mfu(r: dict[str, Any], run: dict[str, Any], flops_per_token: Any) -> str:
    if not run.get("peak_tflops") or "tokens_per_s" not in r or not run.get("config"):
        return "-"
    return f"{100 * r['tokens_per_s'] * flops_per_token(run['config'], r['seq'], r['method']) / (run['peak_tflops'] * 1e12):.1f}%"


def summary_markdown(info: dict[str, Any], tests: dict[str, Any] | None, runs: list[dict[str, Any]],
                     wall: float) -> str:
    spec = importlib.util.spec_from_file_location("qwen_tune_profile_script", PROFILE)
    prof = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prof)  # type: ignore[union-attr]
    lines = [f"# GPU check {info['stamp']}\n", f"Machine: {json.dumps({k: v for k, v in info.items() if k != 'stamp'})}\n",
             f"Total wall time: {wall:.0f}s\n"]
    if tests is not None:
        c = tests["counts"]
        lines += [f"## Part 1: `pytest -m cuda tests/gpu`: {'PASS' if tests['ok'] else 'FAIL'} "
                  f"({c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped, {tests['wall_s']:.0f}s)\n",
                  "| test | status | s | note |", "|---|---|---:|---|"]
        for case in tests["cases"]:
            lines.append(f"| {case['test']} | {case['status']} | {case['time_s']} | "
                         f"{case['reason'].splitlines()[0][:120] if case['reason'] else ''} |")
        est = [r for r in tests["records"] if r["kind"] == "estimate_vs_cuda_peak"]
        if est:
            lines += ["", "Estimator vs measured (torch.cuda.max_memory_allocated):", "",
                      "| method | loss | seq | measured GiB | estimate GiB (state peak) | estimate/measured |",
                      "|---|---|---:|---:|---:|---:|"]
            lines += [f"| {r['method']} | {r['loss']} | {r['seq']} | {r['measured_gib']:.2f} | "
                      f"{r['estimate_state_peak_gib']:.2f} | {r['ratio']:.2f} |" for r in est]
        lines.append("")
    lines += ["## Part 2: profile (reference recipe vs qwen-tune)\n",
              "| model | method | seq | side | peak GiB | s/it | tokens/s | MFU | note |",
              "|---|---|---:|---|---:|---:|---:|---:|---|"]
    for run in runs:
        if run.get("skipped"):
            lines.append(f"| {run['model']} | - | - | - | - | - | - | - | skipped: {run['skipped']} |")
            continue
        if run.get("exit"):
            lines.append(f"| {run['model']} | - | - | - | - | - | - | - | profile.py exit {run['exit']} (see its "
                         "output above) |")
        for r in run["results"]:
            if "error" in r:
                lines.append(f"| {run['model']} | {r['method']} | {r['seq']} | {r['side']} | - | - | - | - | "
                             f"{r['error']} |")
                continue
            lines.append(f"| {run['model']} | {r['method']} | {r['seq']} | {r['side']} | {prof.fmt_mem(r)} | "
                         f"{r['s_per_it']:.3f} | {r['tokens_per_s']:.0f} | {_mfu(r, run, prof.flops_per_token)} | |")
    for run in runs:
        if run["results"]:
            seqs = sorted({r["seq"] for r in run["results"]})
            methods = [m for m in prof.METHODS if any(r["method"] == m for r in run["results"])]
            lines += ["", f"{run['model']} in the layout of Qwen's published A100 table (batch 1, gradient "
                          "accumulation as above, gradient checkpointing):", ""]
            lines += prof.published_layout(run["results"], run["model"], seqs, methods)
    return "\n".join(lines) + "\n"


def machine_info(device: str, stamp: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"stamp": stamp, "device": device, "python": platform.python_version(),
                            "torch": torch.__version__, "cuda": torch.version.cuda}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    from importlib.metadata import PackageNotFoundError, version

    for name in ("transformers", "peft", "accelerate", "triton", *OPTIONAL):
        try:
            info[name] = version(name.replace("_", "-"))
        except PackageNotFoundError:
            info[name] = None
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: the same code paths in < 1 minute")
    ap.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda, or cpu with --dry-run")
    ap.add_argument("--budget", type=float, default=None,
                    help="overall seconds (default 450 on CUDA, 300 dry); the profile gets what the tests leave")
    ap.add_argument("--tests-timeout", type=float, default=None, help="seconds for part 1 (default 200; dry 90)")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--skip-profile", action="store_true")
    ap.add_argument("--profile-models", default=None,
                    help="comma-separated subset of the CUDA plan's models, in order (default: "
                         + ",".join(e["model"] for e in CUDA_PLAN) + "; the 7B runs only with the time the 1.5B "
                         "cells leave)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per profile cell (default 2; the "
                                                           "first is warm-up)")
    ap.add_argument("--grad-accum", type=int, default=None, help="profile gradient accumulation (default 8, as "
                                                                 "the published table; dry 2)")
    ap.add_argument("--results-dir", default=None, help="default bench/results (dry run: the scratch directory)")
    ap.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    ap.add_argument("--install-wheels", default=None, metavar="DIR",
                    help="first install the missing pinned packages from DIR only (scripts/collect_gpu_wheels.py)")
    ap.add_argument("--ignore-installed", action="store_true", help=argparse.SUPPRESS)  # collect --verify
    ap.add_argument("--pytest-args", default="", help="extra pytest arguments, e.g. '-k loss'")
    args = ap.parse_args(argv)

    start = time.monotonic()
    if args.install_wheels:
        rc = install_wheels(Path(args.install_wheels), args.ignore_installed)
        if rc or (args.skip_tests and args.skip_profile):  # install only
            return rc
    device = args.device or ("cpu" if args.dry_run else "cuda")
    dry = args.dry_run or device == "cpu"
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        log("no CUDA device visible: run with --dry-run to exercise the check on CPU")
        return 2
    budget = args.budget or (300.0 if dry else 450.0)
    deadline = start + budget
    stamp = time.strftime("%Y%m%d_%H%M%S")
    work = Path(args.work or tempfile.mkdtemp(prefix="qwen_tune_gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    results_dir = Path(args.results_dir) if args.results_dir else (work / "results" if dry else REPO / "bench" / "results")
    results_dir.mkdir(parents=True, exist_ok=True)
    info = machine_info(device, stamp)
    log(f"device {info.get('gpu', device)}; budget {budget:.0f}s; scratch {work}; results {results_dir}")
    log("optional packages: " + ", ".join(f"{k}={info[k]}" for k in OPTIONAL))

    tests = None
    if not args.skip_tests:
        timeout = args.tests_timeout or (90.0 if dry else 200.0)
        tests = run_tests(device, work, min(timeout, max(deadline - time.monotonic(), 10)), args.pytest_args.split())
    runs: list[dict[str, Any]] = []
    if not args.skip_profile:
        plan = DRY_PLAN if dry else CUDA_PLAN
        if args.profile_models and not dry:
            wanted = [m.strip() for m in args.profile_models.split(",") if m.strip()]
            plan = [e for m in wanted for e in CUDA_PLAN if e["model"] == m]
            if len(plan) != len(wanted):
                ap.error(f"--profile-models {args.profile_models}: choose from "
                         + ", ".join(e["model"] for e in CUDA_PLAN))
        runs = run_profile(device, plan, work, results_dir, stamp, deadline - 5,
                           args.steps or 2, args.grad_accum or (2 if dry else 8), keep_scratch=dry)
    wall = time.monotonic() - start
    md = summary_markdown(info, tests, runs, wall)
    out = results_dir / f"gpu_check_{stamp}"
    out.with_suffix(".md").write_text(md)
    out.with_suffix(".json").write_text(json.dumps({"machine": info, "wall_s": round(wall, 1), "tests": tests,
                                                    "profile": runs}, indent=2))
    if tests is not None:
        shutil.copy(work / "pytest.log", results_dir / f"gpu_check_{stamp}_pytest.log")
    print("\n" + md, flush=True)
    log(f"done in {wall:.0f}s; summary {out}.md / .json")
    if tests is None:
        return 0
    return 0 if tests["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
