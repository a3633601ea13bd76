"""Collect, as pinned wheels in one folder, what scripts/gpu_check.py needs beyond what the GPU machine brings.

The GPU machine has torch, transformers, peft, accelerate and triton (and therefore their own dependencies) but no
network. This collects qwen-tune's own wheel and every other package the check imports -- qwen-tune's
dependencies, the optional liger-kernel and bitsandbytes, pytest and hypothesis -- with their dependencies,
pinned to the versions installed here (packages not installed here: the newest release that fits), for the GPU
machine's Python version and Linux x86_64:

    python scripts/collect_gpu_wheels.py                              # -> wheels/, for this Python
    python scripts/collect_gpu_wheels.py --python-version 3.10,3.12   # unsure which Python: several
    python scripts/gpu_check.py --install-wheels wheels               # on the GPU machine: offline, --no-deps

The install step uses only the folder (`pip install --no-index --find-links wheels --no-deps -r
wheels/requirements.txt`), so torch and the other provided packages are never touched.
"""

from __future__ import annotations

import argparse
import email.parser
import re
import subprocess
import sys
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
PROVIDED = ("torch", "transformers", "peft", "accelerate", "triton")
EXTRAS = ("liger", "nf4")  # optional backends the check exercises when present
TEST_TOOLS = ("pytest", "hypothesis")
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64", "manylinux_2_34_x86_64",
             "linux_x86_64")


def marker_env(python_version: str, extra: str = "") -> dict[str, str]:
    return {"python_version": python_version, "python_full_version": python_version + ".0", "extra": extra,
            "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
            "implementation_name": "cpython", "platform_python_implementation": "CPython"}


def applies(req: Requirement, python_version: str, extras: tuple[str, ...] = ("",)) -> bool:
    return req.marker is None or any(req.marker.evaluate(marker_env(python_version, e)) for e in extras)


def local_requires(name: str) -> list[str] | None:
    try:
        return metadata.requires(name) or []
    except metadata.PackageNotFoundError:
        return None


def local_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def closure(roots: list[Requirement], python_version: str, stop: set[str]) -> dict[str, Requirement]:
    """Requirement closure through the locally installed metadata; names in `stop` are not followed."""
    seen: dict[str, Requirement] = {}
    todo = list(roots)
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in stop or name in seen:
            continue
        seen[name] = req
        for dep in local_requires(req.name) or []:
            dep_req = Requirement(dep)
            if applies(dep_req, python_version, tuple(req.extras) or ("",)):
                todo.append(dep_req)
    return seen


def wheel_requires(path: Path) -> list[str]:
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        msg = email.parser.Parser().parsestr(z.read(meta).decode())
    return msg.get_all("Requires-Dist") or []


def wheel_name_version(path: Path) -> tuple[str, str]:
    name, version = path.name.split("-")[:2]
    return canonicalize_name(name), version


def download(spec: str, dest: Path, python_version: str) -> Path | None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(dest),
           "--python-version", python_version, "--implementation", "cp", *sum((["--platform", p] for p in PLATFORMS), []),
           spec]
    before = set(dest.glob("*.whl"))
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        print(f"  FAILED {spec} (python {python_version}): {p.stderr.strip().splitlines()[-1] if p.stderr else ''}")
        return None
    new = set(dest.glob("*.whl")) - before
    name = canonicalize_name(Requirement(spec).name)
    found = [w for w in (new or dest.glob("*.whl")) if wheel_name_version(w)[0] == name]
    m = re.search(r"(?:Saved|File was already downloaded) (\S+\.whl)", p.stdout)
    if m:
        return Path(m.group(1))
    return found[-1] if found else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dest", default=str(REPO / "wheels"), help="output folder (default wheels/, git-ignored)")
    ap.add_argument("--python-version", default=f"{sys.version_info.major}.{sys.version_info.minor}",
                    help="the GPU machine's Python, comma-separated for several (default: this one)")
    ap.add_argument("--no-optional", action="store_true", help="skip liger-kernel and bitsandbytes")
    args = ap.parse_args(argv)
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    roots = [Requirement(r) for r in project["dependencies"]]
    if not args.no_optional:
        for extra in EXTRAS:
            roots += [Requirement(r) for r in project["optional-dependencies"][extra]]
    dev = {canonicalize_name(Requirement(r).name): Requirement(r) for r in project["optional-dependencies"]["dev"]}
    roots += [dev.get(t, Requirement(t)) for t in TEST_TOOLS]

    print(f"building qwen-tune's wheel into {dest}")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(dest),
                    str(REPO)], check=True, capture_output=True)
    pins: dict[str, str] = {"qwen-tune": project["version"]}
    failed: list[str] = []
    for py in args.python_version.split(","):
        py = py.strip()
        provided = set(closure([Requirement(p) for p in PROVIDED], py, set()))
        todo = closure(roots, py, provided)
        print(f"python {py}: {len(todo)} packages beyond {', '.join(PROVIDED)} and their dependencies")
        done: set[str] = set()
        while todo:
            name, req = todo.popitem()
            if name in done or name in provided:
                continue
            done.add(name)
            version = local_version(req.name)
            spec = f"{name}=={version}" if version else str(Requirement(f"{name}{req.specifier}"))
            wheel = download(spec, dest, py)
            if wheel is None:
                failed.append(f"{spec} (python {py})")
                continue
            pins[name] = wheel_name_version(wheel)[1]
            if version is None:  # not installed here: follow the wheel's own requirements
                for dep in wheel_requires(wheel):
                    dep_req = Requirement(dep)
                    dn = canonicalize_name(dep_req.name)
                    if applies(dep_req, py) and dn not in provided and dn not in done:
                        todo.update(closure([dep_req], py, provided))
    lines = [f"{n}=={v}" for n, v in sorted(pins.items())]
    (dest / "requirements.txt").write_text("\n".join(lines) + "\n")
    print(f"{len(lines)} pinned packages -> {dest / 'requirements.txt'}")
    if failed:
        print("no wheel for: " + ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
