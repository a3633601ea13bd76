"""One virtual environment per peer toolkit under bench/.venvs/<peer>, torch pinned to the machine's CPU build.

    python bench/peers_install.py                 # all peers
    python bench/peers_install.py --only torchtune

Every pip call gets ``-c bench/.venvs/constraints.txt`` (torch==2.13.0): an unpinned resolve would pull a
multi-GB CUDA torch. Each install's log goes to bench/.venvs/<peer>.install.log and its outcome (ok, or the
exact failing step and the last lines of pip's output) to bench/.venvs/<peer>.install.json, which
bench_peers.py copies into its results.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENVS = HERE / ".venvs"
TORCH = "2.13.0"

# What each peer needs beyond its own package, and why.
PEERS: dict[str, dict] = {
    "llamafactory": {
        "pip": ["llamafactory==0.9.5"],
        # torchvision/torchaudio: multimodal only; the CPU wheels matching torch 2.13 are not all on disk, and
        # LLaMA-Factory imports torchaudio unconditionally in its mm plugin -> removed, and a stub for text-only use.
        "remove": ["torchvision", "torchaudio"],
        "stub": ["torchaudio"],
        "module": "llamafactory",
    },
    "torchtune": {
        # torchtune 0.6.1 imports torchao's quantization APIs that later torchao releases renamed.
        "pip": ["torchtune==0.6.1", "torchao==0.13.0"],
        "module": "torchtune",
    },
    "axolotl": {
        # axolotl > 0.19 requires Python 3.12; 0.19 is the last release for 3.11.
        "pip": ["axolotl==0.19.0"],
        "module": "axolotl",
    },
}


def venv_python(peer: str) -> Path:
    return VENVS / peer / "bin" / "python"


def _run(cmd: list[str], log) -> int:
    log.write(f"\n$ {' '.join(map(str, cmd))}\n")
    log.flush()
    return subprocess.run([str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT).returncode


def _stub(site: Path, name: str) -> None:
    d = site / name
    d.mkdir(exist_ok=True)
    (d / "__init__.py").write_text(f'"""Stub: {name} is not installed (text-only benchmark)."""\n__version__ = "0.0.0"\n')


def install(peer: str, python: str = sys.executable) -> dict:
    spec = PEERS[peer]
    VENVS.mkdir(parents=True, exist_ok=True)
    constraints = VENVS / "constraints.txt"
    constraints.write_text(f"torch=={TORCH}\n")
    logpath = VENVS / f"{peer}.install.log"
    t0 = time.time()
    out: dict = {"peer": peer, "python": python, "pip": spec["pip"], "ok": False}
    with logpath.open("w") as log:
        vdir = VENVS / peer
        if vdir.exists():
            shutil.rmtree(vdir)
        steps = [[python, "-m", "venv", vdir],
                 [venv_python(peer), "-m", "pip", "install", "-q", "-c", constraints, f"torch=={TORCH}", *spec["pip"]]]
        if spec.get("remove"):
            steps.append([venv_python(peer), "-m", "pip", "uninstall", "-y", *spec["remove"]])
        for cmd in steps:
            rc = _run(cmd, log)
            if rc:
                out["failed_step"] = " ".join(map(str, cmd))
                break
        else:
            if spec.get("stub"):
                site = Path(subprocess.check_output([venv_python(peer), "-c", "import site; print(site.getsitepackages()[0])"],
                                                    text=True).strip())
                for name in spec["stub"]:
                    _stub(site, name)
            rc = _run([venv_python(peer), "-c", f"import {spec['module']}, torch; print(torch.__version__)"], log)
            out["ok"] = rc == 0
            if rc:
                out["failed_step"] = f"import {spec['module']}"
    out["seconds"] = round(time.time() - t0, 1)
    if not out["ok"]:
        out["log_tail"] = logpath.read_text(errors="replace").splitlines()[-25:]
    else:
        out["versions"] = versions(peer)
    (VENVS / f"{peer}.install.json").write_text(json.dumps(out, indent=2) + "\n")
    return out


def versions(peer: str) -> dict:
    code = ("import importlib.metadata as m, json, sys; out = {}\n"
            "for p in ['" + PEERS[peer]["pip"][0].split("==")[0] + "', 'torch', 'transformers', 'peft', 'accelerate', 'trl', 'torchao', 'datasets']:\n"
            "    try: out[p] = m.version(p)\n"
            "    except m.PackageNotFoundError: pass\n"
            "out['python'] = sys.version.split()[0]; print(json.dumps(out))")
    r = subprocess.run([venv_python(peer), "-c", code], capture_output=True, text=True)
    return json.loads(r.stdout) if r.returncode == 0 else {"error": r.stderr[-500:]}


def install_status(peer: str) -> dict | None:
    p = VENVS / f"{peer}.install.json"
    return json.loads(p.read_text()) if p.exists() else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", choices=list(PEERS), default=list(PEERS))
    ap.add_argument("--python", default=sys.executable, help="interpreter the venvs are made from")
    args = ap.parse_args(argv)
    for peer in args.only:
        r = install(peer, args.python)
        print(f"{peer}: {'ok' if r['ok'] else 'FAILED at ' + r.get('failed_step', '?')} ({r['seconds']} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
