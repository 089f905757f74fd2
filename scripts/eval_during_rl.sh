#!/usr/bin/env bash
# Evaluation during RL on toy-long: RTO and PPO (reproduce.py's tuned settings for seed 100) train on the learned
# rewards while the oracle judges 200 held-out prompts every 4 iterations (--eval_every 4, --keep_best). Then
# evaluate.py draws the curves (eval_score against the iteration and against the KL) and judges the kept best
# policies against the last ones on 400 test prompts of another draw (--seed 1).
#   OUT=results/eval_during_rl bash scripts/eval_during_rl.sh       # docs/results.md, "Evaluation during RL"
# A step whose output folder is complete is skipped, so an interrupted run picks up where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-results/eval_during_rl}
TASK="--dataset toy-long --seed 0"
done_() { [ -f "$1/config.json" ]; }
done_ $OUT/sft || $PY sft.py $TASK --output_dir $OUT/sft --overwrite
done_ $OUT/dpo || $PY dpo.py $TASK --sft_ckpt $OUT/sft --output_dir $OUT/dpo --overwrite
done_ $OUT/rm || $PY reward_model.py $TASK --sft_ckpt $OUT/sft --output_dir $OUT/rm --overwrite
RL="$TASK --sft_ckpt $OUT/sft --dpo_ckpt $OUT/dpo --rm_ckpt $OUT/rm --eval_every 4 --keep_best --sample_every 0"
done_ $OUT/rto || $PY rto.py $RL --reward_mode rto --actor_lr 1e-4 --beta2 0.05 --output_dir $OUT/rto --overwrite
done_ $OUT/ppo || $PY rto.py $RL --reward_mode ppo --actor_lr 1e-4 --beta2 0.1 --output_dir $OUT/ppo --overwrite
$PY evaluate.py --models sft=$OUT/sft rto_best=$OUT/rto/best rto_last=$OUT/rto ppo_best=$OUT/ppo/best \
    ppo_last=$OUT/ppo --judge oracle --dataset toy-long --num_prompts 400 --seed 1 --curves $OUT/rto $OUT/ppo \
    --output_dir $OUT/eval --overwrite
for m in rto ppo; do
  echo "$m: best $(cat $OUT/$m/best/best.json)"
  grep '"phase": "eval"' $OUT/$m/metrics.jsonl
done
