#!/usr/bin/env bash
# RTO at 8B on one 80 GB GPU (docs/lora.md): recipes/llama3_8b_ultrafeedback.sh with LoRA adapters (rank 16, every
# linear layer) in every trained stage. DPO and the reward model train adapters on the frozen SFT model; rto.py
# holds two bf16 bases: the SFT model (policy adapter; the reference with the adapter off; the DPO adapter as a
# second adapter) and the reward model (critic adapter + value head; the reward model with the adapter off).
# Computed peak: 49.6 GB in the rollout (python bench/scale_8b.py --lora_rank 16 --generation_batch_size 64).
# The learning rates are the usual LoRA ones (about 10x the full-model rates); they are not tuned here.
#   bash recipes/llama3_8b_lora_1gpu.sh            # runs it (one GPU)
#   DRY_RUN=1 bash recipes/llama3_8b_lora_1gpu.sh  # prints the stage command lines only
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/llama3_8b_lora}
SFT=${SFT:-OpenRLHF/Llama-3-8b-sft-mixture}
DATA=${DATA:-HuggingFaceH4/ultrafeedback_binarized}
RM=${RM:-$OUT/rm}
run() { if [ -n "${DRY_RUN:-}" ]; then echo "$@"; else python "$@"; fi; }
LORA="--lora_rank 16 --lora_alpha 32 --lora_target_modules all-linear"

# shellcheck disable=SC2086  # $LORA is several flags
run dpo.py --sft_ckpt "$SFT" --dataset "$DATA" --dataset_split train_prefs --output_dir "$OUT/dpo" $LORA \
    --beta 0.1 --lr 5e-6 --batch_size 128 --micro_batch_size 1 --epochs 1 \
    --max_prompt_len 1024 --max_response_len 1024 --bf16 --gradient_checkpointing
if [ "$RM" = "$OUT/rm" ]; then
  # shellcheck disable=SC2086
  run reward_model.py --sft_ckpt "$SFT" --dataset "$DATA" --dataset_split train_prefs --output_dir "$OUT/rm" $LORA \
      --lr 1e-4 --batch_size 128 --micro_batch_size 1 --epochs 1 \
      --max_prompt_len 1024 --max_response_len 1024 --bf16 --gradient_checkpointing
fi
# shellcheck disable=SC2086
run rto.py --sft_ckpt "$SFT" --dpo_ckpt "$OUT/dpo" --rm_ckpt "$RM" --reward_mode rto $LORA --merge_lora \
    --dataset "$DATA" --dataset_split train_prefs \
    --beta1 0.05 --dpo_reward_clip 0.05 --beta2 0.01 --beta3 1 --reward_clip 10 \
    --actor_lr 5e-6 --critic_lr 9e-5 --rollout_batch_size 512 --mini_batch_size 64 --micro_batch_size 2 \
    --ppo_epochs 1 --generation_batch_size 64 --max_prompt_len 1024 --max_new_tokens 1024 \
    --packing --save_every 10 --bf16 --gradient_checkpointing --output_dir "$OUT/rto"
