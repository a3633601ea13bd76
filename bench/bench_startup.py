"""CLI start-up: wall time of light commands, against importing torch + transformers (what every command paid
before the imports moved into the commands) and, optionally, another checkout of qwen-tune (`--ref /work/main`).

    python bench/bench_startup.py                 # this checkout; ~1 min
    python bench/bench_startup.py --ref ../main   # before/after columns, interleaved runs

Each command runs in a fresh interpreter, `--repeats` times, interleaved across checkouts. The box may be shared:
the table reports the best of N (the run least disturbed by other load) and the median, and the load average at
start and end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, machine_info, machine_line, table, write_results  # noqa: E402

DATA = ROOT / "qwen_tune" / "data_examples" / "sharegpt.json"


def commands(out: str) -> dict[str, list[str]]:
    cli = [sys.executable, "-m", "qwen_tune.cli.main"]
    return {
        "python -c pass": [sys.executable, "-c", "pass"],
        "baseline: import torch, transformers": [sys.executable, "-c",
                                                 "import torch, transformers; transformers.AutoConfig"],
        "qwen-tune --version": cli + ["--version"],
        "qwen-tune --help": cli + ["--help"],
        "qwen-tune recipes": cli + ["recipes"],
        "qwen-tune data tokenize (8 samples)": cli + ["data", "tokenize", "--data", str(DATA), "--out", out],
    }


def wall(cmd: list[str], checkout: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    t = time.perf_counter()
    subprocess.run(cmd, env=env, cwd=checkout, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref", type=Path, default=None, help="another qwen-tune checkout to compare with (before)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    checkouts = {"this": ROOT} | ({"ref": args.ref.resolve()} if args.ref else {})
    info = machine_info()  # load average before the runs
    out = str(Path(tempfile.mkdtemp()) / "tok.jsonl")
    cmds = commands(out)
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.repeats):
        for name, cmd in cmds.items():
            for label, path in checkouts.items():
                times.setdefault((name, label), []).append(wall(cmd, path))
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    best = {k: min(v) * 1000 for k, v in times.items()}
    base = best[("baseline: import torch, transformers", "this")]
    headers = ["command"] + (["before (ref) best ms"] if args.ref else []) + ["best ms", "median ms", "x baseline"] + \
        (["after/before"] if args.ref else [])
    rows = []
    for name in cmds:
        row = [name] + ([f"{best[(name, 'ref')]:.0f}"] if args.ref else []) + [
            f"{best[(name, 'this')]:.0f}", f"{med[(name, 'this')]:.0f}", f"{best[(name, 'this')] / base:.2f}"]
        if args.ref:
            row.append(f"{best[(name, 'this')] / best[(name, 'ref')]:.2f}")
        rows.append(row)
    load_end = [round(x, 2) for x in os.getloadavg()]
    text, md = table(headers, rows)
    head = f"{machine_line(info)}; load avg at end {load_end}; best of {args.repeats} runs"
    print(head)
    print(text)
    write_results("startup", {"machine": info, "loadavg_at_end": load_end, "repeats": args.repeats,
                              "best_ms": {f"{n} [{c}]": v for (n, c), v in best.items()},
                              "median_ms": {f"{n} [{c}]": v for (n, c), v in med.items()}},
                  head + "\n\n" + md)


if __name__ == "__main__":
    main()
