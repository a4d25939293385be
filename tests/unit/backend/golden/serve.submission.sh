#!/bin/bash

# Parameters
#SBATCH --account=proj-42
#SBATCH --comment=scepsy:scepsy-demo
#SBATCH --constraint='h100&ib'
#SBATCH --cpus-per-task=32
#SBATCH --error=/scratch/u/sessions/demo/logs/submitit/%j/%j_0_log.err
#SBATCH --gres=gpu:h100:4
#SBATCH --job-name=scepsy-demo
#SBATCH --no-requeue
#SBATCH --nodelist=node1,node2
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --open-mode=append
#SBATCH --output=/scratch/u/sessions/demo/logs/submitit/%j/%j_0_log.out
#SBATCH --partition=gpu
#SBATCH --qos=high
#SBATCH --signal=USR1@120
#SBATCH --switches=1@0:30:00
#SBATCH --time=240

# setup
umask 077
export PYTHONUNBUFFERED=1
export HF_HOME='/scratch/u/hf cache'
export SCEPSY_NOTE='it'"'"'s $(not) run'
cd '/scratch/u/my project'

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output /scratch/u/sessions/demo/logs/submitit/%j/%j_%t_log.out --error /scratch/u/sessions/demo/logs/submitit/%j/%j_%t_log.err --kill-on-bad-exit=1 /opt/venv/bin/python -u -m submitit.core._submit /scratch/u/sessions/demo/logs/submitit/%j
