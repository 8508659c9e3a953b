#!/usr/bin/env bash
# torchrun with one process per GPU (or NPROC processes on the CPU, gloo), on one node or on each of NNODES, e.g.
#   launch/torchrun.sh --config configs/celeba64.yaml
#   NPROC=2 launch/torchrun.sh --run.device=cpu --train.steps=100
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 launch/torchrun.sh --config configs/celeba64.yaml   # on node 0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 launch/torchrun.sh --config configs/celeba64.yaml   # on node 1
# Everything after the script name goes to distgan.train. Environment:
#   NPROC        processes on this node (default: its GPUs, else 1)
#   NNODES       nodes of the run (default 1: a standalone run)
#   NODE_RANK    this node, 0 .. NNODES-1; node 0 hosts the rendezvous
#   MASTER_ADDR  node 0's address, as the other nodes reach it; MASTER_PORT its port (default 29400)
#   IFNAME       the network interface the nodes share (e.g. ib0, eth1): gloo and NCCL use it, and this node
#                tells the others its address on it (otherwise it gives its hostname, which they must resolve)
#   RDZV_ID      a name the nodes of one run share (default distgan)
set -euo pipefail
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")
fi
# Restarted worker groups (--max-restarts) must not share the rendezvous store with the agent: they could read
# the previous group's addresses from it and fail to connect (pytorch/pytorch#135712).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1

nodes=(--standalone)
if [[ ${NNODES:-1} -gt 1 ]]; then
  : "${NODE_RANK:?set NODE_RANK (0 .. NNODES-1) on every node}"
  : "${MASTER_ADDR:?set MASTER_ADDR to the address of node 0, on every node}"
  # is_host: node 0 hosts the rendezvous store. torchrun guesses it by matching MASTER_ADDR against this
  # machine's names, which fails where the address is not one it knows itself by (containers, namespaces).
  nodes=(--nnodes "$NNODES" --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:${MASTER_PORT:-29400}"
    --rdzv_id "${RDZV_ID:-distgan}" --rdzv_conf "is_host=$((NODE_RANK == 0 ? 1 : 0))")
  if [[ -n ${IFNAME:-} ]]; then
    export GLOO_SOCKET_IFNAME=$IFNAME NCCL_SOCKET_IFNAME=$IFNAME
    address=$(ip -4 -o addr show dev "$IFNAME" | awk '{split($4, a, "/"); print a[1]; exit}')
    if [[ -z $address ]]; then
      echo "distgan: error: IFNAME=$IFNAME has no IPv4 address on this node" >&2
      exit 2
    fi
    nodes+=(--local_addr "$address")
  fi
fi
# torchrun reports any failed worker as exit 1, so a wrapper could not tell a run stopped by a signal (its workers
# exit 75 after writing a checkpoint; a wrapper re-runs on 75) or a config error (2) from a crash: the workers write
# their code into DISTGAN_EXIT_FILE, and this script exits with it. SIGTERM and SIGINT to this script go on to
# torchrun.
DISTGAN_EXIT_FILE=$(mktemp "${TMPDIR:-/tmp}/distgan-exit.XXXXXX")
export DISTGAN_EXIT_FILE
trap 'rm -f "$DISTGAN_EXIT_FILE" "$DISTGAN_EXIT_FILE".*' EXIT # .PID: a rank's part, if it was stopped writing
trap 'kill -TERM "$torchrun_pid" 2>/dev/null || true' TERM INT
# torchrun, its own messages (its workers write to the terminal themselves) passed on until a worker writes its
# code: then the workers have said why in a line (which setting is wrong; where the checkpoint is), and torchrun's
# report of failed workers or of the signal (a traceback, a table) is left out. A crash keeps it.
python -c '
import os, sys

said = False

def workers_said_why():
    global said
    try:
        with open(os.environ["DISTGAN_EXIT_FILE"]) as f:
            said = said or f.read().strip() in ("2", "75")  # once said, for good
    except OSError:
        pass
    return said

class Messages:
    def write(self, text):
        return len(text) if workers_said_why() else sys.__stderr__.write(text)

    def __getattr__(self, name):
        return getattr(sys.__stderr__, name)

sys.stderr, sys.argv[0] = Messages(), "torchrun"
from torch.distributed.run import main
main()
' "${nodes[@]}" --nproc_per_node "$NPROC" -m distgan.train "$@" &
torchrun_pid=$!
status=0
while true; do
  wait "$torchrun_pid" || status=$?
  kill -0 "$torchrun_pid" 2>/dev/null || break # a trapped signal interrupted the wait: torchrun still runs
  status=0
done
code=$(cat "$DISTGAN_EXIT_FILE" 2>/dev/null || true)
if [[ $status -ne 0 && ($code == 2 || $code == 75) ]]; then
  status=$code
fi
exit "$status"
