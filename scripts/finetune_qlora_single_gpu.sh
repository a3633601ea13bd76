#!/usr/bin/env bash
# Q-LoRA on one GPU: GPTQ Int4 checkpoint or NF4 on load (the reference's finetune_qlora_single_gpu.sh).
#
#   bash scripts/finetune_qlora_single_gpu.sh -m /path/to/model -d /path/to/data.json [key.sub=value ...]
#
# Recipe: recipes/qlora.yaml. Options and environment (GPUS_PER_NODE, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT,
# HOSTFILE, ...): see scripts/_launch.sh or run with --help. Multi-node: docs/distributed.md.
RECIPE=qlora
MODE=single
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"
launch "$@"
