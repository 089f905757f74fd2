#!/usr/bin/env bash
# Install, then run the whole pipeline on the built-in task into results/ (see scripts/pipeline.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
OUT=${OUT:-results} PY=.venv/bin/python bash scripts/pipeline.sh
