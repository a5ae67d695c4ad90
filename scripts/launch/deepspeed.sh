#!/usr/bin/env bash
# Multi-node launch with DeepSpeed's launcher and a hostfile (it starts the ranks on every host over ssh):
#
#   HOSTFILE=hostfile bash scripts/launch/deepspeed.sh sft experiment=internvl3_38b_sft data.meta_path=/data/meta.json
#
# hostfile, one line per node:   node-1 slots=8
# Run from node 0, with this repository and environment at the same path on every node.
set -euo pipefail
JOB=${1:?usage: deepspeed.sh sft|mpo [hydra overrides]}
shift
exec deepspeed --hostfile "${HOSTFILE:-hostfile}" \
    --master_addr "${MASTER_ADDR:-$(hostname)}" --master_port "${MASTER_PORT:-29500}" \
    --module vlmtune.train.commands."$JOB" "$@"
