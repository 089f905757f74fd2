#!/usr/bin/env bash
# The paper's first configuration: Pythia-2.8B on HH-RLHF (helpful), RTO with the DPO token reward and the KL
# penalty only (beta3 = 0), the paper's hyperparameters (docs/algorithm.md, "Defaults").
#   bash recipes/pythia28b_hh.sh            # runs it (8 GPUs, configs/gpu8_fsdp.yaml)
#   DRY_RUN=1 bash recipes/pythia28b_hh.sh  # prints the stage command lines only
# The paper used the helpful subset: point DATA at a local copy of helpful-base (train.jsonl.gz) to match it;
# the default is the whole hub dataset.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/pythia28b_hh}
DATA=${DATA:-Anthropic/hh-rlhf}
CONFIG=${CONFIG:-configs/gpu8_fsdp.yaml}
run() { if [ -n "${DRY_RUN:-}" ]; then echo "$@"; else accelerate launch --config_file "$CONFIG" "$@"; fi; }

run sft.py --model_name_or_path EleutherAI/pythia-2.8b --dataset "$DATA" --output_dir "$OUT/sft" \
    --lr 1e-5 --batch_size 32 --epochs 1 --max_prompt_len 256 --max_response_len 256 --bf16
run dpo.py --sft_ckpt "$OUT/sft" --dataset "$DATA" --output_dir "$OUT/dpo" \
    --beta 0.1 --lr 5e-6 --batch_size 32 --epochs 1 --max_prompt_len 256 --max_response_len 256 --bf16
run reward_model.py --sft_ckpt "$OUT/sft" --dataset "$DATA" --output_dir "$OUT/rm" \
    --lr 1e-5 --batch_size 128 --epochs 1 --max_prompt_len 256 --max_response_len 256 --bf16
# RTO as in the paper's first version; PPO and DPPO with their own KL coefficient (0.05) for the comparison
run rto.py --sft_ckpt "$OUT/sft" --dpo_ckpt "$OUT/dpo" --rm_ckpt "$OUT/rm" --reward_mode rto --dataset "$DATA" \
    --beta1 0.1 --dpo_reward_clip 0 --beta2 0.03 --beta3 0 --actor_lr 5e-6 --critic_lr 9e-6 \
    --rollout_batch_size 256 --mini_batch_size 16 --ppo_epochs 2 --max_prompt_len 256 --max_new_tokens 256 \
    --save_every 20 --bf16 --gradient_checkpointing --output_dir "$OUT/rto"
run rto.py --sft_ckpt "$OUT/sft" --rm_ckpt "$OUT/rm" --reward_mode ppo --dataset "$DATA" \
    --beta2 0.05 --beta3 1 --actor_lr 5e-6 --critic_lr 9e-6 \
    --rollout_batch_size 256 --mini_batch_size 16 --ppo_epochs 2 --max_prompt_len 256 --max_new_tokens 256 \
    --save_every 20 --bf16 --gradient_checkpointing --output_dir "$OUT/ppo"
run rto.py --sft_ckpt "$OUT/sft" --dpo_ckpt "$OUT/dpo" --rm_ckpt "$OUT/rm" --reward_mode dppo --dataset "$DATA" \
    --beta1 0.1 --beta2 0.05 --actor_lr 5e-6 --critic_lr 9e-6 \
    --rollout_batch_size 256 --mini_batch_size 16 --ppo_epochs 2 --max_prompt_len 256 --max_new_tokens 256 \
    --save_every 20 --bf16 --gradient_checkpointing --output_dir "$OUT/dppo"
