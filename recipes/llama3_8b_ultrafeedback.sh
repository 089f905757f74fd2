#!/usr/bin/env bash
# The authors' later configuration: Llama-3-8B SFT mixture, DPO on UltraFeedback from it, RTO with the DPO
# token reward (beta1 0.05, clipped at 0.05) plus a normalised sentence-level reward model that also
# initialises the critic (docs/algorithm.md, "Defaults").
#   bash recipes/llama3_8b_ultrafeedback.sh            # runs it (8 GPUs, configs/gpu8_fsdp.yaml)
#   DRY_RUN=1 bash recipes/llama3_8b_ultrafeedback.sh  # prints the stage command lines only
# The authors used an external 1B reward model; set RM to its folder to do the same, otherwise one is trained
# here from the SFT model.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/llama3_8b_uf}
SFT=${SFT:-OpenRLHF/Llama-3-8b-sft-mixture}
DATA=${DATA:-HuggingFaceH4/ultrafeedback_binarized}
RM=${RM:-$OUT/rm}
CONFIG=${CONFIG:-configs/gpu8_fsdp.yaml}
run() { if [ -n "${DRY_RUN:-}" ]; then echo "$@"; else accelerate launch --config_file "$CONFIG" "$@"; fi; }

# DPO: the authors state no DPO settings for this model; lr 5e-7 is the usual one for Llama-3-8B.
run dpo.py --sft_ckpt "$SFT" --dataset "$DATA" --dataset_split train_prefs --output_dir "$OUT/dpo" \
    --beta 0.1 --lr 5e-7 --batch_size 128 --micro_batch_size 1 --epochs 1 \
    --max_prompt_len 1024 --max_response_len 1024 --bf16 --gradient_checkpointing
if [ "$RM" = "$OUT/rm" ]; then
  run reward_model.py --sft_ckpt "$SFT" --dataset "$DATA" --dataset_split train_prefs --output_dir "$OUT/rm" \
      --lr 1e-5 --batch_size 128 --micro_batch_size 1 --epochs 1 \
      --max_prompt_len 1024 --max_response_len 1024 --bf16 --gradient_checkpointing
fi
run rto.py --sft_ckpt "$SFT" --dpo_ckpt "$OUT/dpo" --rm_ckpt "$RM" --reward_mode rto \
    --dataset "$DATA" --dataset_split train_prefs \
    --beta1 0.05 --dpo_reward_clip 0.05 --beta2 0.01 --beta3 1 --reward_clip 10 \
    --actor_lr 5e-7 --critic_lr 9e-6 --rollout_batch_size 1024 --mini_batch_size 128 --micro_batch_size 2 \
    --ppo_epochs 1 --generation_batch_size 32 --max_prompt_len 1024 --max_new_tokens 1024 \
    --packing --save_every 10 --bf16 --gradient_checkpointing --output_dir "$OUT/rto"
