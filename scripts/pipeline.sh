#!/usr/bin/env bash
# The whole pipeline on the built-in task: SFT -> DPO -> reward model -> rto.py as RTO, PPO and DPPO (same budget
# and seed) -> evaluate.py with the oracle judge, the training curves and the token-reward page.
#   OUT=results PY=python bash scripts/pipeline.sh      # what scripts/demo.sh runs (146 s on 2 CPU cores)
#   QUICK=1 ...                                         # a few steps per stage (the smoke test)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-results}
SEED=${SEED:-0}
if [ -n "${QUICK:-}" ]; then
  TRAIN="--max_steps 3 --eval_steps 3"; RL="--num_iterations 1 --eval_num_prompts 8"; EVAL="--num_prompts 16"
else
  TRAIN=""; RL=""; EVAL="--num_prompts 400"
fi
$PY toy_task.py
$PY sft.py --seed $SEED --output_dir $OUT/sft --overwrite $TRAIN
$PY dpo.py --seed $SEED --sft_ckpt $OUT/sft --output_dir $OUT/dpo --overwrite $TRAIN
$PY reward_model.py --seed $SEED --sft_ckpt $OUT/sft --output_dir $OUT/rm --overwrite $TRAIN
for mode in rto ppo dppo; do
  $PY rto.py --reward_mode $mode --seed $SEED --sft_ckpt $OUT/sft --dpo_ckpt $OUT/dpo --rm_ckpt $OUT/rm \
      --output_dir $OUT/$mode --overwrite --sample_every 0 $RL
done
$PY evaluate.py --models sft=$OUT/sft dpo=$OUT/dpo ppo=$OUT/ppo dppo=$OUT/dppo rto=$OUT/rto --judge oracle \
    --seed $SEED --curves $OUT/rto $OUT/ppo $OUT/dppo --show_token_rewards 3 --token_reward_dpo $OUT/dpo,$OUT/sft \
    --output_dir $OUT/eval --overwrite $EVAL
echo "done: $OUT/eval/winrates.md, $OUT/eval/curves.png (or .csv), $OUT/eval/token_rewards.html"
