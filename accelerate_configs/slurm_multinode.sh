#!/usr/bin/env bash
# SLURM: N nodes x 8 GPUs, one `accelerate launch` per node (srun starts one task per node).
#   sbatch --nodes=2 accelerate_configs/slurm_multinode.sh configs/dino_vit_small16.yaml data.path=/data/imagenet/train
#SBATCH --job-name=selfdistill
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=80
#SBATCH --time=72:00:00
set -euo pipefail
RECIPE=${1:?usage: sbatch --nodes=N slurm_multinode.sh RECIPE.yaml [overrides...]}
shift
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero2.json}
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
HEAD_IP=$(srun --nodes=1 --ntasks=1 -w "$HEAD_NODE" hostname --ip-address | awk '{print $1}')
srun bash -c "accelerate launch \
  --use_deepspeed --deepspeed_config_file $DS_CONFIG --deepspeed_multinode_launcher standard \
  --num_machines $SLURM_NNODES --num_processes $((SLURM_NNODES * GPUS_PER_NODE)) \
  --machine_rank \$SLURM_NODEID --main_process_ip $HEAD_IP --main_process_port 29500 --rdzv_backend c10d \
  run_pretrain.py --config $RECIPE $* --resume auto"
