#!/usr/bin/env bash
# Make a DeepSpeed checkpoint resumable with a different number of processes (DeepSpeed "universal checkpoint").
#
#   bash scripts/ds_to_universal.sh OUTPUT_DIR/checkpoint-N DS_CONFIG
#
# ZeRO checkpoints hold one optimizer shard per process and only load into the same data-parallel world size.
# This converts checkpoint-N/global_stepN into checkpoint-N/global_stepN_universal (+ latest_universal), writes
# checkpoint-N/ds_config_universal.json (DS_CONFIG with "checkpoint": {"load_universal": true}) and prints the
# overrides to resume with. Keep the global batch (batch_size x grad_accum x processes) unchanged when resuming,
# so the lr schedule and the position in the data stay those of the original run. See docs/distributed.md.
set -euo pipefail
if [[ $# -ne 2 || ! -f $1/latest || ! -f $2 ]]; then
    sed -n '2,/^set -euo/s/^# \{0,1\}//p' "$0"
    echo "usage: bash $0 CHECKPOINT_DIR DS_CONFIG  (CHECKPOINT_DIR holds DeepSpeed's 'latest' file)" >&2
    exit 2
fi
ckpt=${1%/}
tag=$(cat "$ckpt/latest")
PY=${PYTHON:-python}
"$PY" -m deepspeed.checkpoint.ds_to_universal --input_folder "$ckpt/$tag" --output_folder "$ckpt/${tag}_universal" \
    --inject_missing_state
"$PY" - "$2" "$ckpt/ds_config_universal.json" <<'PYEOF'
import json, sys
cfg = json.load(open(sys.argv[1]))
cfg.setdefault("checkpoint", {})["load_universal"] = True
json.dump(cfg, open(sys.argv[2], "w"), indent=2)
PYEOF
echo "resume with:  deepspeed=$ckpt/ds_config_universal.json output.resume_from_checkpoint=$ckpt"
