#!/bin/bash
# Batch mode: one allocation holds the scheduler (rank 0), the client (rank 1) and the GPU
# workers (the other ranks). Edit the partition, account, node/GPU counts and the venv path.
# Four worker processes per GPU with two cores each: one process alone cannot decode frames fast
# enough to keep a GPU busy; each worker picks GPU (rank mod GPUs on the node).
#SBATCH --job-name=aurora-nightly
#SBATCH --partition=gpu
#SBATCH --account=CHANGE_ME
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=16
#SBATCH --gres=gpu:4
#SBATCH --cpus-per-task=2
#SBATCH --time=02:00:00
#SBATCH --output=aurora-%j.log
# Submit from the repository root (the job starts there); arguments after the workflow go to
# launch.py, e.g. `sbatch workflows/slurm/job.sh workflows/nightly.yaml --set out=/scratch/x`.
# Options given to sbatch override the #SBATCH lines above.
set -euo pipefail
WORKFLOW=${1:-workflows/nightly.yaml}
source "${AURORA_VENV:-$HOME/aurora-pipeline/.venv}/bin/activate"
srun python workflows/slurm/launch.py --runner "$WORKFLOW" "${@:2}"
