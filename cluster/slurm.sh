#!/usr/bin/env bash
# Run the pipeline on a SLURM allocation: a Ray head on the first node, a Ray worker on every
# other node, then `dvc repro` (or the command given) on the head with RAY_ADDRESS pointing at it.
#
#   sbatch cluster/slurm.sh                                  # whole pipeline, cluster=remote
#   sbatch --nodes 4 cluster/slurm.sh bash -c \
#     'python -m pipeline compose cluster=remote cluster.num_workers=16 && python -m stages.train lm'
#   (a command given runs on params.yaml as it is: compose cluster=remote first, as above, to train
#   on the allocation's GPUs)
#   squeue --me; tail -f slurm-<jobid>.out                   # watch it
#
# Expects the project installed in the environment named by PIPELINE_VENV (default: ./.venv,
# `make setup`) on a file system every node sees; checkpoints go to cluster.storage_path, which
# must be shared too (configs/cluster/remote.yaml). The shards are read where the project holds them
# (cluster.shards_uri=null: that folder is shared).
#SBATCH --job-name=pipeline
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=16
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%j.out
set -euo pipefail

cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
# shellcheck disable=SC1091
source "${PIPELINE_VENV:-.venv}/bin/activate"

mapfile -t nodes < <(scontrol show hostnames "${SLURM_JOB_NODELIST:?run this through sbatch}")
head_node=${nodes[0]}
head_ip=$(srun --nodes=1 --ntasks=1 -w "$head_node" hostname --ip-address | awk '{print $1}')
port=${RAY_PORT:-6379}
export RAY_ADDRESS="$head_ip:$port"
# Token authentication: one token for the allocation, in a file only this user can read.
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH="$HOME/.ray/slurm-$SLURM_JOB_ID.token"
mkdir -p "$HOME/.ray" && (umask 077 && python -c 'import secrets; print(secrets.token_hex(32))' > "$RAY_AUTH_TOKEN_PATH")
trap 'rm -f "$RAY_AUTH_TOKEN_PATH"' EXIT

gpus=${SLURM_GPUS_PER_NODE:-0}
gpus=${gpus##*:}  # a typed request (--gpus-per-node=a100:4) reads "a100:4": the count is after the colon
cpus=${SLURM_CPUS_PER_TASK:-1}
echo "Ray head on $head_node ($RAY_ADDRESS); ${#nodes[@]} nodes, $gpus GPUs and $cpus CPUs each"
# The dashboard stays on the head's loopback: reach it with `ssh -L 8265:127.0.0.1:8265 $head_node`.
srun --nodes=1 --ntasks=1 --cpus-per-task="$cpus" -w "$head_node" \
  ray start --head --node-ip-address="$head_ip" --port="$port" --dashboard-host=127.0.0.1 \
  --num-cpus="$cpus" --num-gpus="$gpus" --block &
sleep 20
for node in "${nodes[@]:1}"; do
  srun --nodes=1 --ntasks=1 --cpus-per-task="$cpus" -w "$node" \
    ray start --address="$RAY_ADDRESS" --num-cpus="$cpus" --num-gpus="$gpus" --block &
done
sleep 10
ray status

if [ "$#" -gt 0 ]; then
  if [ "$gpus" -gt 0 ] && [[ "$*" != *"pipeline compose"* ]] && python -c 'import sys, yaml; sys.exit(bool(yaml.safe_load(open("params.yaml"))["cluster"]["use_gpu"]))' 2>/dev/null; then
    echo "note: params.yaml has cluster.use_gpu false, so this runs on CPUs though each node has $gpus GPUs;" \
         "compose cluster=remote first (see the top of cluster/slurm.sh)" >&2
  fi
  "$@"
else
  # one worker per GPU; on an allocation without GPUs one CPU worker per node (cluster=remote asks for GPUs)
  if [ "$gpus" -gt 0 ]; then
    # each worker takes its share of the node's CPUs (remote.yaml's 4 each may be more than the node has)
    python -m pipeline compose cluster=remote "cluster.num_workers=$(( ${#nodes[@]} * gpus ))" \
      "cluster.cpus_per_worker=$(( cpus / gpus > 0 ? cpus / gpus : 1 ))" cluster.shards_uri=null
  else
    python -m pipeline compose cluster=remote "cluster.num_workers=${#nodes[@]}" cluster.use_gpu=false \
      "cluster.cpus_per_worker=$cpus" cluster.shards_uri=null
  fi
  dvc repro
fi
