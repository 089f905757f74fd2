#!/usr/bin/env bash
# Install, check the formatting and lint (ruff), then run the whole test suite
# (about 5 min on 2 CPU cores in two pytest-xdist workers, plus the install; extra arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/ruff format --check .   # one formatter for all the code (ruff.toml)
.venv/bin/ruff check .
# tmp_path_retention_policy=failed: a passing test's temporary folder (SmolLM2 checkpoints among them) is
# deleted, so that repeated runs do not fill the disk.
.venv/bin/python -m pytest -q -n 2 --dist loadfile -o tmp_path_retention_policy=failed tests "$@"
