#!/usr/bin/env bash
# Install, then run the whole pipeline on the built-in task: SFT -> DPO -> reward model -> RTO.
# About 2 minutes on 2 CPU cores. Everything lands in runs/ (rerunning replaces it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
py=.venv/bin/python
$py toy_task.py
$py sft.py --output_dir runs/sft --overwrite
$py dpo.py --sft_ckpt runs/sft --output_dir runs/dpo --overwrite
$py reward_model.py --sft_ckpt runs/sft --output_dir runs/rm --overwrite
$py rto.py --sft_ckpt runs/sft --dpo_ckpt runs/dpo --rm_ckpt runs/rm --output_dir runs/rto --overwrite
