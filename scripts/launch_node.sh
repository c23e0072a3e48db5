#!/usr/bin/env bash
# Uptrain on one node with all its GPUs (or NUM_GPUS of them).
#
#   scripts/launch_node.sh configs/llama2-7b-gqa8.yaml [--section.key=value ...] [--dry-run] [--resume]
#
# ACCELERATE_CONFIG picks the strategy (default FSDP2): configs/accelerate/{ddp,fsdp2}.yaml.
# On a machine without GPUs, NUM_GPUS=2 runs the same FSDP2 code over gloo (a rehearsal).
# Ctrl-C / SIGTERM: every worker finishes its step and saves a checkpoint within STOP_GRACE_SECONDS.
set -euo pipefail
if [[ $# -lt 1 ]]; then
    echo "usage: $0 CONFIG.yaml [--section.key=value ...] [--dry-run] [--resume [CHECKPOINT]]" >&2
    exit 2
fi
cd "$(dirname "$0")/.."
NUM_GPUS=${NUM_GPUS:-$(nvidia-smi --list-gpus 2>/dev/null | wc -l)}
if [[ "$NUM_GPUS" -lt 1 ]]; then
    echo "no GPU found; set NUM_GPUS (processes to start), or run 'uptrain train $1' for the local device" >&2
    exit 1
fi
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${STOP_GRACE_SECONDS:-480}
exec accelerate launch \
    --config_file "${ACCELERATE_CONFIG:-configs/accelerate/fsdp2.yaml}" \
    --num_machines 1 --num_processes "$NUM_GPUS" \
    -m uptrain_gqa train "$@"
