#!/usr/bin/env bash
# Install, then run the whole test suite (about 7 min on 2 CPU cores, plus the install).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/python -m pytest -q tests "$@"
