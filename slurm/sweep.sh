#!/usr/bin/env bash
# Submit one slurm/train.sh job per value of one config key: a grid sweep, one run directory and one W&B run
# per value, grouped in W&B under the sweep's name. Every job keeps train.sh's preemption and requeue handling.
#
#   slurm/sweep.sh NAME CONFIG KEY VALUE [VALUE ...] [-- SBATCH_OPTIONS... [-- OVERRIDES...]]
#   slurm/sweep.sh lr configs/digits32.yaml optim.lr_g 1e-4 2e-4 4e-4
#   slurm/sweep.sh lr configs/celeba64.yaml optim.lr_g 1e-4 2e-4 -- --gpus-per-node=8 -- --train.steps=20000
#
# Runs go to runs/NAME/KEY=VALUE (relative to this directory); W&B group NAME. Prints one job id per value.
set -euo pipefail

if [[ $# -lt 4 ]]; then
    echo "usage: slurm/sweep.sh NAME CONFIG KEY VALUE [VALUE ...] [-- SBATCH_OPTIONS... [-- OVERRIDES...]]" >&2
    exit 2
fi
name=$1 config=$2 key=$3
shift 3
values=()
while [[ $# -gt 0 && $1 != -- ]]; do
    values+=("$1")
    shift
done
sbatch_options=()
overrides=()
if [[ $# -gt 0 ]]; then
    shift # the first --
    while [[ $# -gt 0 && $1 != -- ]]; do
        sbatch_options+=("$1")
        shift
    done
    [[ $# -gt 0 ]] && shift # the second --
    overrides=("$@")
fi
if [[ ${#values[@]} -eq 0 ]]; then
    echo "distgan: error: no values given for $key" >&2
    exit 2
fi
script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

for value in "${values[@]}"; do
    sbatch --parsable --job-name="$name" "${sbatch_options[@]}" "$script_dir/train.sh" "$config" \
        "--$key=$value" "--run.dir=runs/$name/$key=$value" "--log.group=$name" "--log.name=$name-$key=$value" \
        "${overrides[@]}"
done
