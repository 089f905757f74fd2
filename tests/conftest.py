"""Make the repository root importable (`import common`, `import sft`) however pytest is started."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


import json
import os
import subprocess

import pytest


def run_stage(script, *args, check=True, env=None):
    """Run a stage as a user would; returns the CompletedProcess (stdout+stderr as text)."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), **(env or {})}
    proc = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def read_metrics(folder):
    with open(Path(folder) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory):
    """SFT -> DPO -> reward model on the built-in task with the default settings, once per test session.
    RTO_TEST_PIPELINE=<dir> reuses the three folders in <dir> instead (while working on later stages)."""
    if os.environ.get("RTO_TEST_PIPELINE"):
        return {name: Path(os.environ["RTO_TEST_PIPELINE"]) / name for name in ("sft", "dpo", "rm")}
    root = tmp_path_factory.mktemp("pipeline")
    run_stage("sft.py", "--output_dir", root / "sft")
    run_stage("dpo.py", "--sft_ckpt", root / "sft", "--output_dir", root / "dpo")
    run_stage("reward_model.py", "--sft_ckpt", root / "sft", "--output_dir", root / "rm")
    return {name: root / name for name in ("sft", "dpo", "rm")}
