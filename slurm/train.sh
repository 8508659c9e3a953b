#!/usr/bin/env bash
# Train distgan on a Slurm allocation: one task per node, each starting the node's processes with torchrun
# (LAUNCHER=accelerate: accelerate launch), which meet by c10d rendezvous on the allocation's first host.
#
#   sbatch slurm/train.sh CONFIG [--section.key=value ...]
#   sbatch --nodes=4 --gpus-per-node=8 slurm/train.sh configs/celeba64.yaml --data.path=/data/celeba64
#   NPROC_PER_NODE=2 sbatch --cpus-per-task=2 slurm/train.sh configs/digits32.yaml     # CPU partition, gloo
#
# Resources are sbatch flags; the lines below are defaults that flags override. Processes per node: the GPUs
# Slurm gave the node, else 1 (CPU); NPROC_PER_NODE overrides both. The job runs in the submit directory with the
# submit environment (sbatch's default --export=ALL), so activate the venv and set WANDB_* before sbatch.
#
# Preemption and time limits: Slurm sends USR1 to this shell 180 s before the end (--signal=B:USR1@180); the trap
# requeues the job; Slurm then stops the tasks with SIGTERM, on which every rank stops at the next step, rank 0
# writes a checkpoint and they exit 75. The requeued job (same job id, SLURM_RESTART_COUNT=1, ...) runs this
# script again and resumes from that checkpoint: same run directory, same W&B run. The log is appended to.
#
#SBATCH --job-name=distgan
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --output=%x-%j.out
#SBATCH --signal=B:USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
set -euo pipefail

if [[ $# -lt 1 || $1 == -* ]]; then
    echo "usage: sbatch [sbatch options] slurm/train.sh CONFIG [--section.key=value ...]" >&2
    exit 2
fi
config=$1
shift
if [[ ! -f $config ]]; then
    echo "distgan: error: config file not found: $config (paths are relative to $(pwd))" >&2
    exit 2
fi
: "${SLURM_JOB_ID:?run this script with sbatch (or inside an allocation: salloc, then bash slurm/train.sh)}"

python=${PYTHON:-python}
gpus_on_node=${SLURM_GPUS_ON_NODE:-0}
nproc=${NPROC_PER_NODE:-$((gpus_on_node > 0 ? gpus_on_node : 1))}
nnodes=${SLURM_NNODES:-1}
# The head (node 0) by its hostname, which every node must resolve; MASTER_ADDR overrides it with an address.
head=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
port=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}  # per job, so jobs sharing a node do not collide

# Threads per process: the task's CPUs shared among the node's processes (torch would take every core each).
cpus=${SLURM_CPUS_PER_TASK:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((cpus / nproc > 0 ? cpus / nproc : 1))}
# torchrun restarts: workers must not reuse the store address of the group that died (pytorch/pytorch#135712).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
# NCCL: warnings only. IFNAME (e.g. ib0) names the interface the nodes share where the default one is not it:
# gloo and NCCL use it, and torchrun tells the other nodes this node's address on it instead of its hostname.
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
local_addr=""
if [[ -n ${IFNAME:-} ]]; then
    export GLOO_SOCKET_IFNAME=$IFNAME NCCL_SOCKET_IFNAME=$IFNAME
    local_addr=" --local_addr \$(ip -4 -o addr show dev $IFNAME | awk '{split(\$4, a, \"/\"); print a[1]; exit}')"
fi

if [[ ${LAUNCHER:-torchrun} == accelerate ]]; then
    # accelerate needs each node's rank: $SLURM_NODEID is expanded inside the task, on its node.
    multi=$([[ $((nproc * nnodes)) -gt 1 ]] && echo --multi_gpu || true)
    launch="$python -m accelerate.commands.launch $multi --num_machines $nnodes --num_processes $((nproc * nnodes))"
    launch+=" --machine_rank \$SLURM_NODEID --main_process_ip $head --main_process_port $port"
    launch+=" --rdzv_backend c10d --same_network --module distgan.train"
else
    # Node 0 hosts the rendezvous (is_host: torchrun's own guess fails where the head's name is not one the node
    # knows itself by); $SLURM_NODEID and the address are expanded inside the task, on its node.
    launch="$python -m torch.distributed.run --nnodes $nnodes --nproc_per_node $nproc --rdzv_backend c10d"
    launch+=" --rdzv_endpoint $head:$port --rdzv_id $SLURM_JOB_ID --max-restarts ${MAX_RESTARTS:-0}"
    launch+=" --rdzv_conf is_host=\$((SLURM_NODEID == 0 ? 1 : 0))$local_addr -m distgan.train"
fi
args=$(printf ' %q' "--config=$config" "$@")

echo "distgan: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $nnodes node(s) x $nproc process(es)," \
    "head $head:$port, ${LAUNCHER:-torchrun}, $OMP_NUM_THREADS thread(s) per process"

# A run stopped by a signal exits 75, and a config error 2, which torchrun reports as 1: node 0's processes write
# their code into this file (on the batch host, which is node 0), and the job exits with it.
DISTGAN_EXIT_FILE=$(mktemp "${TMPDIR:-/tmp}/distgan-exit.XXXXXX")
export DISTGAN_EXIT_FILE
trap 'rm -f "$DISTGAN_EXIT_FILE" "$DISTGAN_EXIT_FILE".*' EXIT # .PID: a rank's part, if it was stopped writing
trap 'echo "distgan: USR1: time is nearly up, requeueing job $SLURM_JOB_ID"; scontrol requeue "$SLURM_JOB_ID"' USR1
srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c "exec $launch$args" &
srun_pid=$!
status=0
while true; do
    wait "$srun_pid" || status=$?
    kill -0 "$srun_pid" 2>/dev/null || break # a trapped signal interrupted the wait: the tasks still run
    status=0
done
code=$(cat "$DISTGAN_EXIT_FILE" 2>/dev/null || true)
if [[ $status -ne 0 && ($code == 2 || $code == 75) ]]; then
    status=$code
fi
exit "$status"
