#!/bin/bash
# Train and score MedSegDiff-V2 on ISLES24 with SLURM: 2 nodes x 4 GPUs, one torchrun per node.
#   sbatch experiments/slurm_example.sh
# Edit the #SBATCH lines for your cluster and DATA_ROOT below. `medsegdiff sweep ... --launcher slurm`
# writes scripts like this one for every run of a sweep.
#SBATCH --job-name=medsegdiff-isles24-v2
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1          # one torchrun launcher per node; it starts one process per GPU
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --requeue                    # a preempted job is requeued and resumes (see --resume below)
##SBATCH --partition=gpu             # uncomment and set for your cluster
##SBATCH --account=my_account
set -euo pipefail

DATA_ROOT=${DATA_ROOT:-/path/to/isles24/train}   # the extracted ISLES24 release
RUN_DIR=${RUN_DIR:-runs/isles24_v2-slurm-${SLURM_JOB_NAME}}
GPUS_PER_NODE=${GPUS_PER_NODE:-4}
PYTHON=${PYTHON:-.venv/bin/python}

mkdir -p logs
# The first node hosts the c10d rendezvous; every node must reach it on MASTER_PORT.
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-29500}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

# Rank 0 prepares the data cache once (the other ranks wait for it), all ranks train with DDP
# (train.batch_size is the GLOBAL batch), rank 0 predicts and scores the held-out cases.
# A fixed run_dir + --resume makes a requeued job continue from its latest checkpoint.
srun "$PYTHON" -m torch.distributed.run \
    --nnodes="$SLURM_NNODES" --nproc_per_node="$GPUS_PER_NODE" \
    --rdzv_id="$SLURM_JOB_ID" --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" \
    -m medsegdiff.cli run experiments/isles24_v2.yaml \
    data.root="$DATA_ROOT" run_dir="$RUN_DIR" --resume --no-progress
