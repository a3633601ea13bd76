#!/usr/bin/env bash
# Install qwen-tune and its training stack. One script for CI (CPU set) and docker/Dockerfile (GPU set), so the
# image installs exactly what CI installs and tests, plus the GPU-only extras.
#
#   bash scripts/install.sh          # CPU set: qwen-tune[deepspeed,dev] + Q-LoRA extras on the installed torch
#   bash scripts/install.sh --gpu    # GPU set: qwen-tune[deepspeed,nf4,liger] + flash-attn + gptqmodel (Q-LoRA)
#
# The installed torch is never replaced: it is pinned as a pip constraint for every step and checked at the end.
# Only when no torch is installed at all, TORCH_SPEC is installed from TORCH_INDEX_URL (the Dockerfile's case).
#
# Environment:
#   PYTHON            interpreter to install into (default: python)
#   EDITABLE=1        pip install -e . (default); 0 = a regular (wheel) install: recipes, DeepSpeed configs and the
#                     example data ship inside the package either way
#   EXTRAS            qwen-tune extras (default: deepspeed,dev for CPU; deepspeed,nf4,liger for --gpu)
#   TORCH_SPEC        torch to install if none is (default: torch==2.13.0)
#   TORCH_INDEX_URL   where from (default: https://download.pytorch.org/whl/cpu, or .../cu128 with --gpu)
#   FLASH_ATTN_SPEC   (--gpu) default: flash-attn; needs the CUDA toolkit (nvcc) when no wheel matches
#   DS_PREBUILD       1 (CPU default): JIT-compile DeepSpeed's CPU ops (shm comm, fused Adam) now rather than in the
#                     first training run (~1-5 min once, cached in ~/.cache/torch_extensions); 0 (--gpu default): skip,
#                     CUDA ops compile on first use on the GPU machine
set -euo pipefail
cd "$(dirname "$0")/.."

GPU=0
case "${1:-}" in
    --gpu) GPU=1 ;;
    --cpu | "") ;;
    -h | --help) sed -n '2,/^set -euo/s/^# \{0,1\}//p' "$0" ; exit 0 ;;
    *) echo "install.sh: unknown option $1 (--cpu or --gpu)" >&2; exit 2 ;;
esac

PY=${PYTHON:-python}
PIP=("$PY" -m pip install --no-input)
if [[ $GPU == 1 ]]; then
    EXTRAS=${EXTRAS:-deepspeed,nf4,liger}
    DS_PREBUILD=${DS_PREBUILD:-0}
    TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cu128}
else
    EXTRAS=${EXTRAS:-deepspeed,dev}
    TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}
fi

# 1. torch: keep the installed build (CPU or CUDA); install one only where there is none.
if ! before=$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null); then
    echo "install.sh: no torch in $PY; installing ${TORCH_SPEC:-torch==2.13.0} from $TORCH_INDEX_URL"
    "${PIP[@]}" "${TORCH_SPEC:-torch==2.13.0}" --index-url "$TORCH_INDEX_URL"
    before=$("$PY" -c 'import torch; print(torch.__version__)')
fi
pin=$(mktemp)
trap 'rm -f "$pin"' EXIT
echo "torch==${before}" >"$pin"

# 2. qwen-tune with its extras.
if [[ ${EDITABLE:-1} == 1 ]]; then
    "${PIP[@]}" -c "$pin" -e ".[${EXTRAS}]"
else
    "${PIP[@]}" -c "$pin" ".[${EXTRAS}]"
fi

# 3. GPU-only pieces.
if [[ $GPU == 1 ]]; then
    "${PIP[@]}" -c "$pin" ninja packaging
    # flash-attn builds against the installed torch: no build isolation, or pip would fetch another torch.
    "${PIP[@]}" -c "$pin" --no-build-isolation "${FLASH_ATTN_SPEC:-flash-attn}"
fi
# Q-LoRA on both: bitsandbytes, optimum and gptqmodel (with --no-deps, torch pinned), so CI tests what the image has.
QWEN_TUNE_EDITABLE=${EDITABLE:-1} PYTHON="$PY" bash scripts/install_qlora.sh

# 4. DeepSpeed's JIT ops, compiled once here instead of inside the first (timed, multi-process) training run.
if [[ ${DS_PREBUILD:-1} == 1 ]]; then
    "$PY" - <<'PYEOF'
from deepspeed.accelerator import get_accelerator
acc = get_accelerator()
names = ["FusedAdamBuilder"] + (["ShareMemCommBuilder"] if acc.device_name() == "cpu" else [])
for name in names:
    builder = acc.create_op_builder(name)
    if builder is None or not builder.is_compatible():
        print(f"install.sh: DeepSpeed op {name}: not available here, skipped")
        continue
    builder.load()
    print(f"install.sh: DeepSpeed op {builder.absolute_name()} ready")
PYEOF
fi

# 5. Checks: torch untouched, everything importable.
after=$("$PY" -c 'import torch; print(torch.__version__)')
if [[ $after != "$before" ]]; then
    echo "install.sh: torch changed from $before to $after -- reinstall torch $before" >&2
    exit 1
fi
# From / : the installed qwen_tune (a wheel with EDITABLE=0), not the checkout's folder, with its bundled recipes.
pyabs=$("$PY" -c 'import sys; print(sys.executable)')
(cd / && "$pyabs" - "$GPU" <<'PYEOF'
import importlib, importlib.util, sys
mods = ["qwen_tune", "transformers", "peft", "trl", "accelerate", "deepspeed"]
for m in mods:
    importlib.import_module(m)
from qwen_tune.config import DS_CONFIGS_DIR, list_recipes
if not list_recipes() or not (DS_CONFIGS_DIR / "zero3.json").is_file():
    sys.exit(f"install.sh: the installed qwen_tune ({importlib.import_module('qwen_tune').__file__}) has no bundled "
             "recipes / DeepSpeed configs")
# CUDA-only packages may not import where no GPU driver is visible (a `docker build`): check they are installed.
gpu_mods = ["flash_attn", "bitsandbytes", "optimum", "gptqmodel", "liger_kernel"] if sys.argv[1] == "1" else []
missing = [m for m in gpu_mods if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"install.sh: not installed: {', '.join(missing)}")
import torch
print(f"install.sh: ok ({', '.join(mods + gpu_mods)}); torch {torch.__version__} unchanged, "
      f"CUDA available: {torch.cuda.is_available()}")
PYEOF
)
