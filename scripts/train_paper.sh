#!/usr/bin/env bash
# The paper's recipe (configs/experiment/paper_llama2_13b.yaml) with torchrun: one node of 8 GPUs by default;
# for several nodes run the same command on each with NNODES, NODE_RANK and MASTER_ADDR set.
# Extra arguments are Hydra overrides, e.g.  scripts/train_paper.sh head.layers=[30] trainer.epochs=1
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${NPROC:-8}
NNODES=${NNODES:-1}
if [ "$NNODES" -gt 1 ]; then
  : "${MASTER_ADDR:?set MASTER_ADDR to node 0's address}"
  exec .venv/bin/torchrun --nnodes="$NNODES" --node_rank="${NODE_RANK:?set NODE_RANK}" \
    --nproc_per_node="$NPROC" --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}" \
    -m ppd_train +experiment=paper_llama2_13b "$@"
fi
exec .venv/bin/torchrun --standalone --nproc_per_node="$NPROC" -m ppd_train +experiment=paper_llama2_13b "$@"
