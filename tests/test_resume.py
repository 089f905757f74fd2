"""Resume: kill -9 a training stage mid-way, rerun with --resume, end with the metrics of an uninterrupted run.

sft.py, dpo.py and rto.py (with an adaptive KL coefficient, which its checkpoint carries). reward_model.py resumes
through the same common.py code (save_state, load_state, train_batches) and is left out to keep the suite short.
FSDP2's sharded resumable state is resumed in test_distributed.py. The run that is killed is a
process of its own (the kill is the behaviour); the uninterrupted run and the resumed one run in this process
(conftest.run_main), with the killed process given this process's thread count so that the numbers can agree to
the bit. --resume without a checkpoint is in test_bad_input.py."""

import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import toy_task
from conftest import ROOT, iteration_metrics, read_metrics, rto_cmd, run_main

STAGES = {
    "sft.py": ["--max_steps", 40, "--eval_steps", 20, "--oracle_prompts", 8, "--logging_steps", 5],
    # 480 of the task's pairs in a file, 3 epochs of about 15 batches: the run is killed in the second epoch and
    # resumes part-way through it (and the reference pass before training is short)
    "dpo.py": [
        "--max_steps",
        40,
        "--eval_steps",
        20,
        "--logging_steps",
        5,
        "--epochs",
        3,
        "--lr",
        3e-4,
        "--max_prompt_len",
        24,
        "--max_response_len",
        24,
    ],
}


def kill_after_checkpoint(cmd, checkpoint):
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    while not (checkpoint / "state.json").exists() and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.parametrize("stage", list(STAGES))
def test_kill_and_resume_gives_the_uninterrupted_run(stage, pipeline, tmp_path):
    args = [*STAGES[stage], "--save_every", 10, "--save_total_limit", 2]
    if stage == "dpo.py":
        pairs = tmp_path / "pairs.jsonl"
        pairs.write_text(
            "".join(json.dumps(r) + "\n" for r in toy_task.preference_data("train", 480, seed=1))
        )
        args += ["--sft_ckpt", pipeline["sft"], "--dataset", pairs]
    run_main(stage, *args, "--output_dir", tmp_path / "clean")
    out = tmp_path / "killed"
    kill_after_checkpoint(
        [sys.executable, str(ROOT / stage), *map(str, args), "--output_dir", str(out)],
        out / "checkpoint-20",
    )
    assert (out / "checkpoint-20" / "state.json").exists()
    assert not (out / "config.json").exists()  # the killed run never looked complete
    run_main(stage, *args, "--output_dir", out, "--resume")
    assert read_metrics(out) == read_metrics(tmp_path / "clean")
    # the checkpoint and the resumed steps lie past the first epoch, the run within 3
    if stage == "dpo.py":
        per_epoch = math.ceil(
            json.loads((out / "args.json").read_text())["derived"]["train_pairs"] / 32
        )
        assert per_epoch < 20 and 40 <= 3 * per_epoch, per_epoch
    # --save_total_limit 2: only the two newest checkpoints are kept
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-20", "checkpoint-30"]


def test_rto_resumes_after_a_kill_to_the_uninterrupted_run(pipeline, tmp_path):
    """kill -9 after the checkpoint of iteration 2, rerun with --resume: the same metrics as one clean run. With
    an adaptive KL coefficient, which the checkpoint must carry; its updates follow the controller by hand."""
    common_args = (
        "--num_iterations",
        4,
        "--save_every",
        2,
        "--eval_num_prompts",
        8,
        "--rollout_batch_size",
        32,
        "--kl_target",
        0.05,
        "--kl_horizon",
        100,
    )
    # in this process, and the killed
    run_main("rto.py", *rto_cmd(pipeline, tmp_path / "clean", *common_args))
    # one with this process's thread count: the numbers can then agree to the bit
    out = tmp_path / "killed"
    kill_after_checkpoint(
        [sys.executable, str(ROOT / "rto.py"), *map(str, rto_cmd(pipeline, out, *common_args))],
        out / "checkpoint-2",
    )
    state = out / "checkpoint-2" / "state.json"
    assert json.loads(state.read_text())["step"] == 2 and not (out / "checkpoint-4").exists()
    run_main("rto.py", *rto_cmd(pipeline, out, *common_args, "--resume"))
    clean, resumed = iteration_metrics(tmp_path / "clean"), iteration_metrics(out)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert resumed == clean
    # per-response KL feeds the controller (6 decimals as logged)
    for prev, cur in itertools.pairwise(clean):
        error = max(-0.2, min(0.2, prev["kl_per_response"] / 0.05 - 1))
        assert cur["beta2"] == pytest.approx(prev["beta2"] * (1 + error * 32 / 100), abs=2e-6)
    assert len({r["beta2"] for r in clean}) == 4
