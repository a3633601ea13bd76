#!/usr/bin/env bash
# Q-LoRA with DeepSpeed ZeRO-2 on one or more nodes (the reference's finetune_qlora_ds.sh).
#
#   bash scripts/finetune_qlora_ds.sh -m /path/to/model -d /path/to/data.json [key.sub=value ...]
#
# Recipe: recipes/qlora_ds.yaml. Options and environment (GPUS_PER_NODE, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT,
# HOSTFILE, ...): see scripts/_launch.sh or run with --help. Multi-node: docs/distributed.md.
RECIPE=qlora_ds
MODE=multi
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"
launch "$@"
