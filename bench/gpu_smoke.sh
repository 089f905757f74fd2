#!/usr/bin/env bash
# GPU smoke check: the whole pipeline on ONE NVIDIA GPU in a few minutes, nothing fetched from any hub.
#
#   bash bench/gpu_smoke.sh                  # on a machine with one NVIDIA GPU
#   SMOKE_CPU=1 bash bench/gpu_smoke.sh      # the same steps on CPU with a small model (checks the script itself)
#
# What it runs, with the 8B recipe's flags (--bf16 --gradient_checkpointing --packing) under FSDP2 through an
# Accelerate config with 1 process and fsdp_cpu_ram_efficient_loading: true (as configs/gpu8_fsdp.yaml):
#   a randomly initialised Llama of about 1.0B parameters built from a config (TinyLlama's shapes, the built-in
#   task's tokenizer) -> sft.py -> dpo.py -> reward_model.py on the built-in task -> rto.py for 2 iterations with
#   --save_every 1 -> rto.py --resume for a third. Then it prints, per RTO iteration, each phase's seconds and peak
#   device memory (torch.cuda.max_memory_allocated, logged by rto.py as memory_<phase>_gb) and generate's tokens/s.
#
# Needs torch with CUDA, transformers and accelerate (requirements.txt; datasets is not needed: the built-in task
# is generated in code). Where a machine has older versions and no registry, carry wheels: on a machine with pip
# access, in the repository root,
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl transformers==5.25.0 accelerate==1.16.0 \
#       tokenizers safetensors huggingface-hub
# bring the folder along, and this script installs .whl/*.whl into /tmp/site first (PYTHONPATH), without touching
# the machine's packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
W=${SMOKE_DIR:-/tmp/rto_gpu_smoke}
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
"$PY" - <<'EOF'
import importlib, os, sys
need = {"torch": "2.4", "transformers": "4.56", "accelerate": "1.0", "tqdm": "4.66"}
for name, low in need.items():
    try:
        version = importlib.import_module(name).__version__
    except ImportError:
        sys.exit(f"error: {name} is not installed (>= {low} needed); see the top of bench/gpu_smoke.sh for carrying wheels")
    print(f"{name} {version}")
import torch
if not os.environ.get("SMOKE_CPU") and not torch.cuda.is_available():
    sys.exit("error: no CUDA device visible to torch; run on a GPU machine, or with SMOKE_CPU=1 to check the script")
print("device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
EOF
rm -rf "$W" && mkdir -p "$W"
if [ -n "${SMOKE_CPU:-}" ]; then
  export ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=2
  SIZE="hidden=128, layers=2, ffn=256, heads=4, kv=4"; MIXED=no; BF16=""
else
  SIZE="hidden=2048, layers=22, ffn=5632, heads=32, kv=4"; MIXED=bf16; BF16="--bf16"
fi
cat > "$W/accelerate.yaml" <<EOF
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_machines: 1
num_processes: 1
machine_rank: 0
main_process_port: 0
mixed_precision: '$MIXED'
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_reshard_after_forward: true
  fsdp_state_dict_type: SHARDED_STATE_DICT
  fsdp_cpu_ram_efficient_loading: true
  fsdp_sync_module_states: true
  fsdp_offload_params: false
EOF
"$PY" - "$W/base" <<EOF
import sys
import torch
from transformers import LlamaConfig, LlamaForCausalLM
import common, data
hidden, layers, ffn, heads, kv = (int(x.split("=")[1]) for x in "$SIZE".split(", "))
tok = data.build_tiny_tokenizer(common.TOY)
config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                     num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=512,
                     tie_word_embeddings=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                     bos_token_id=None)
torch.manual_seed(0)
model = LlamaForCausalLM(config)
model.save_pretrained(sys.argv[1]); tok.save_pretrained(sys.argv[1])
print(f"base model: {sum(p.numel() for p in model.parameters()) / 1e9:.3f}B parameters, random, built from a config")
EOF
launch() { local t0=$SECONDS; "$PY" -m accelerate.commands.launch --config_file "$W/accelerate.yaml" "$@" \
  > "$W/$1.log" 2>&1 || { tail -40 "$W/$1.log"; echo "error: $1 failed (log: $W/$1.log)"; exit 1; }
  echo "$1: $((SECONDS - t0)) s"; }
FLAGS="$BF16 --gradient_checkpointing"
launch sft.py --model_name_or_path "$W/base" --max_steps 20 --eval_steps 20 --oracle_prompts 32 $FLAGS --output_dir "$W/sft"
launch dpo.py --sft_ckpt "$W/sft" --max_steps 10 --eval_steps 10 $FLAGS --output_dir "$W/dpo"
launch reward_model.py --sft_ckpt "$W/sft" --max_steps 10 --eval_steps 10 $FLAGS --output_dir "$W/rm"
RTO=(rto.py --sft_ckpt "$W/sft" --dpo_ckpt "$W/dpo" --rm_ckpt "$W/rm" --eval_num_prompts 32 --sample_every 0
     $FLAGS --packing --save_every 1 --output_dir "$W/rto")
launch "${RTO[@]}" --num_iterations 2
mv "$W/rto.py.log" "$W/rto_first.log"
launch "${RTO[@]}" --num_iterations 3 --resume
grep -q "resumed from" "$W/rto.py.log" || { echo "error: the third iteration did not resume"; exit 1; }
"$PY" - "$W/rto/metrics.jsonl" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if '"phase"' not in line]
assert [r["step"] for r in rows] == [1, 2, 3], [r["step"] for r in rows]
for r in rows:
    tokens = r["response_length"] * 64  # the built-in task's --rollout_batch_size
    phases = ", ".join(f"{p} {r[f'time_{p}']:.2f} s" + (f" / {r[f'memory_{p}_gb']:.2f} GB" if f"memory_{p}_gb" in r
                                                        else "") for p in ("generate", "frozen_pass", "update"))
    print(f"iteration {r['step']}: {phases}; generate {tokens / r['time_generate']:.0f} tokens/s; "
          f"kl {r['kl_per_token']:.4f}, reward {r['reward_total']:.3f}")
print("gpu smoke check: passed")
EOF
