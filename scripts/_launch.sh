# Shared by scripts/finetune_*.sh (sourced, not run): the reference Qwen scripts' options and environment,
# turned into one `qwen-tune train --recipe ... model.path=$MODEL data.path=$DATA` launch.
#
# The sourcing script sets RECIPE (a bundled recipe name) and MODE (multi: torchrun/deepspeed across GPUS_PER_NODE x
# NNODES processes; single: one process on one GPU), then calls `launch "$@"`.
#
# Options:      -m/--model PATH   -d/--data PATH   --deepspeed DS_CONFIG_JSON   -h/--help
#               anything else is passed through as recipe overrides (key.sub=value), e.g. training.lr=1e-5,
#               or as Qwen's finetune.py flags (--model_max_length 512 --lora_r 8 ...), mapped by `qwen-tune train`
# Environment:  GPUS_PER_NODE (default: all visible GPUs), NNODES=1, NODE_RANK=0, MASTER_ADDR=localhost,
#               MASTER_PORT=6001, HOSTFILE (launch every node from here with the deepspeed launcher),
#               LAUNCHER=torchrun|deepspeed (default: deepspeed when HOSTFILE is set, else torchrun),
#               MODEL, DATA (same as -m/-d), PYTHON=python, DRY_RUN=1 (print the command, run nothing)

set -euo pipefail

usage() {
    echo "Usage: bash $0 [-m MODEL_PATH] [-d DATA_PATH] [--deepspeed DS_CONFIG] [key.sub=value ...]"
    echo "Recipe: recipes/${RECIPE}.yaml ($MODE)"
    sed -n '/^# Options/,/^$/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
}

launch() {
    local py=${PYTHON:-python}
    local model=${MODEL:-} data=${DATA:-} ds_config=""
    local -a overrides=()
    while [[ $# -gt 0 ]]; do
        case $1 in
            -m | --model) model=$2; shift ;;
            -d | --data) data=$2; shift ;;
            --deepspeed) ds_config=$2; shift ;;
            --model=* | --data=* | --deepspeed=*)
                local k=${1%%=*} v=${1#*=}
                case $k in --model) model=$v ;; --data) data=$v ;; --deepspeed) ds_config=$v ;; esac ;;
            -h | --help) usage; return 0 ;;
            --) shift; overrides+=("$@"); break ;;
            -*) overrides+=("$1") ;;  # a finetune.py flag: qwen-tune maps it (or names the closest known one)
            *) overrides+=("$1") ;;
        esac
        shift
    done
    # Overrides come first from the options, so explicit key=value arguments after them still win.
    local -a train=(-m qwen_tune.cli.main train --recipe "$RECIPE")
    [[ -n $model ]] && train+=("model.path=$model")
    [[ -n $data ]] && train+=("data.path=$data")
    [[ -n $ds_config ]] && train+=("deepspeed=$ds_config")
    local o flags=0
    for o in "${overrides[@]+"${overrides[@]}"}"; do [[ $o == --* ]] && flags=1; done
    if [[ $flags == 1 ]]; then
        # Checked here, so an unknown flag is one line (with the closest known one) before any launcher starts.
        "$py" -c 'import sys
from qwen_tune.config import ConfigError
from qwen_tune.cli.finetune_args import convert
try:
    convert(sys.argv[2:])
except ConfigError as e:
    sys.exit(f"{sys.argv[1]}: {e}")' "$0" "${overrides[@]}" || return 2
        train+=(--)
    fi
    train+=("${overrides[@]+"${overrides[@]}"}")

    export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
    local -a cmd
    if [[ $MODE == single ]]; then
        export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
        if [[ -n $ds_config ]]; then  # DeepSpeed wants a process group even for one process
            cmd=("$py" -m torch.distributed.run --standalone --nproc_per_node 1 "${train[@]}")
        else
            cmd=("$py" "${train[@]}")
        fi
    else
        local gpus=${GPUS_PER_NODE:-$("$py" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)}
        [[ $gpus -ge 1 ]] || gpus=1
        local nnodes=${NNODES:-1} node_rank=${NODE_RANK:-0} addr=${MASTER_ADDR:-localhost} port=${MASTER_PORT:-6001}
        local launcher=${LAUNCHER:-$([[ -n ${HOSTFILE:-} ]] && echo deepspeed || echo torchrun)}
        if [[ $launcher == deepspeed ]]; then
            # --module/--no_local_rank: run `python -m qwen_tune.cli.main` without a --local_rank argument.
            cmd=(deepspeed --master_addr "$addr" --master_port "$port")
            if [[ -n ${HOSTFILE:-} ]]; then
                cmd+=(--hostfile "$HOSTFILE")  # the deepspeed launcher starts every node (ssh/pdsh) from here
            else
                cmd+=(--num_gpus "$gpus" --num_nodes "$nnodes")
            fi
            cmd+=(--no_local_rank --module "${train[@]:1}")
        elif [[ $launcher == torchrun ]]; then
            cmd=("$py" -m torch.distributed.run --nproc_per_node "$gpus" --nnodes "$nnodes" --node_rank "$node_rank"
                 --master_addr "$addr" --master_port "$port" "${train[@]}")
        else
            echo "$0: LAUNCHER must be torchrun or deepspeed, got $launcher" >&2
            return 2
        fi
    fi
    echo "+ ${cmd[*]}" >&2
    [[ ${DRY_RUN:-0} == 1 ]] && return 0
    exec "${cmd[@]}"
}
