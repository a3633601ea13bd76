#!/usr/bin/env bash
# LoRA on one GPU (the reference's finetune_lora_single_gpu.sh).
#
#   bash scripts/finetune_lora_single_gpu.sh -m /path/to/model -d /path/to/data.json [key.sub=value ...]
#
# Recipe: recipes/lora.yaml. Options and environment (GPUS_PER_NODE, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT,
# HOSTFILE, ...): see scripts/_launch.sh or run with --help. Multi-node: docs/distributed.md.
RECIPE=lora
MODE=single
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"
launch "$@"
