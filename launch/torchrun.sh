#!/usr/bin/env bash
# torchrun on one node with one process per GPU (or NPROC processes on the CPU, gloo), e.g.
#   launch/torchrun.sh --config configs/celeba64.yaml
#   NPROC=2 launch/torchrun.sh --run.device=cpu --train.steps=100
# Everything after the script name goes to distgan.train; NPROC overrides the process count.
set -euo pipefail
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")
fi
# Restarted worker groups (--max-restarts) must not share the rendezvous store with the agent: they could read
# the previous group's addresses from it and fail to connect (pytorch/pytorch#135712).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
exec torchrun --standalone --nproc_per_node "$NPROC" -m distgan.train "$@"
