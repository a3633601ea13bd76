#!/usr/bin/env bash
# Install qwen-tune's Q-LoRA extras without ever replacing the installed torch.
#
#   bash scripts/install_qlora.sh            # bitsandbytes (NF4) + optimum + gptqmodel (GPTQ Int4 kernels)
#   bash scripts/install_qlora.sh --nf4-only # bitsandbytes only
#
# Works on CPU machines (torch +cpu) and GPU machines (torch +cuXXX) alike: the torch that is installed is pinned
# for the whole install, and gptqmodel -- whose published requirements pin a newer (CUDA) torch -- is installed
# with --no-deps after its runtime dependencies (the `qlora` extra of pyproject.toml). gptqmodel is a pure-Python
# package: its CPU kernels are JIT-compiled with the system C++ compiler on first use (about 90 s, then cached),
# its CUDA kernels come from its own wheels/JIT on GPU machines.
#
# Environment: PYTHON (default: python), GPTQMODEL_SPEC (default: gptqmodel==7.7.0), QWEN_TUNE_EDITABLE=0 to install
# the extra's dependencies without reinstalling qwen-tune itself in editable mode.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python}
GPTQMODEL_SPEC=${GPTQMODEL_SPEC:-gptqmodel==7.7.0}
extra=qlora
[[ "${1:-}" == "--nf4-only" ]] && extra=nf4

if ! before=$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null); then
    echo "install_qlora.sh: torch is not installed in $PY; install the torch build for this machine first" >&2
    exit 1
fi
# Fast path (CI runs this every time): every requirement of the extra, and gptqmodel, already satisfied.
if [[ "${QWEN_TUNE_FORCE_INSTALL:-0}" != "1" ]] && "$PY" - "$extra" "$GPTQMODEL_SPEC" <<'PYEOF'
import sys
from importlib.metadata import PackageNotFoundError, version
try:
    import tomllib
    from packaging.requirements import Requirement
except ImportError:
    sys.exit(1)
extra, gptqmodel = sys.argv[1], sys.argv[2]
reqs = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"][extra]
reqs = reqs + ([gptqmodel] if extra == "qlora" else []) + ["qwen-tune"]
for line in reqs:
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate():
        continue
    try:
        if not req.specifier.contains(version(req.name), prereleases=True):
            sys.exit(1)
    except PackageNotFoundError:
        sys.exit(1)
PYEOF
then
    echo "install_qlora.sh: the ${extra} extra is already installed (QWEN_TUNE_FORCE_INSTALL=1 reinstalls)"
    exit 0
fi
pin=$(mktemp)
trap 'rm -f "$pin"' EXIT
echo "torch==${before}" >"$pin"   # a constraint, not a requirement: pip keeps exactly this torch or fails

if [[ "${QWEN_TUNE_EDITABLE:-1}" == "1" ]]; then
    "$PY" -m pip install -c "$pin" -e ".[${extra}]"
else
    # Only the extra's dependencies, read from pyproject.toml.
    mapfile -t deps < <("$PY" - "$extra" <<'PYEOF'
import sys, tomllib
extras = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]
print("\n".join(extras[sys.argv[1]]))
PYEOF
)
    "$PY" -m pip install -c "$pin" "${deps[@]}"
fi
if [[ "$extra" == qlora ]]; then
    "$PY" -m pip install --no-deps "$GPTQMODEL_SPEC"
fi

after=$("$PY" -c 'import torch; print(torch.__version__)')
if [[ "$after" != "$before" ]]; then
    echo "install_qlora.sh: torch changed from $before to $after -- reinstall torch $before" >&2
    exit 1
fi
"$PY" - "$extra" <<'PYEOF'
import importlib, sys
mods = ["bitsandbytes"] + (["optimum", "gptqmodel"] if sys.argv[1] == "qlora" else [])
for m in mods:
    importlib.import_module(m)
print("install_qlora.sh: ok (" + ", ".join(mods) + "); torch unchanged")
PYEOF
