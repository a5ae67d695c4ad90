#!/usr/bin/env bash
# Multi-node launch with torchrun's rendezvous: run this same command on every node.
#
#   NNODES=4 NODE_RANK=<0..3> MASTER_ADDR=<node 0's address> GPUS_PER_NODE=8 \
#     bash scripts/launch/torchrun.sh sft experiment=internvl3_38b_sft data.meta_path=/data/meta.json
#
# The first argument is the vlmtune job (sft | mpo); the rest are Hydra overrides, identical on every node.
# All ranks write to one train.output_dir (it must be on a filesystem every node sees); only rank 0 logs
# metrics and writes shared files, each rank writes its own checkpoint shard.
set -euo pipefail
JOB=${1:?usage: torchrun.sh sft|mpo [hydra overrides]}
shift
exec torchrun \
    --nnodes="${NNODES:-1}" \
    --node_rank="${NODE_RANK:-0}" \
    --nproc_per_node="${GPUS_PER_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l || echo 1)}" \
    --rdzv_backend=c10d \
    --rdzv_endpoint="${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29500}" \
    --rdzv_id="${RDZV_ID:-vlmtune}" \
    --no-python vlmtune "$JOB" "$@"
