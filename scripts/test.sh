#!/usr/bin/env bash
# Install, check the formatting and lint (ruff), then run the whole test suite
# (about 7 min on 2 CPU cores, plus the install).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/ruff format --check .   # one formatter for all the code (ruff.toml)
.venv/bin/ruff check .
.venv/bin/python -m pytest -q tests "$@"
