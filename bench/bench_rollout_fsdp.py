"""Rollout time under FSDP2 on 2 CPU processes against the same generation unsharded on one process (not a test).

    python bench/bench_rollout_fsdp.py [--before /tmp/old]     # an older checkout of the project, to compare

A random Llama of 21M parameters (hidden 512, 8 layers, the built-in task's tokenizer), prepared by Accelerate as
a trained policy is; 32 of the task's prompts x --max_new_tokens 24 per rollout, through the checkout's own
rto.rollout: on 2 processes under configs/cpu_fsdp.yaml (1 thread each, 16 prompts each) and on one process with
2 threads (all 32 prompts, unsharded). Seconds per rollout: the median of 3 after a warm-up, timed between
barriers. The goal: FSDP2 <= 1.3 x one process.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import inspect, json, os, statistics, sys, time
from types import SimpleNamespace
sys.path.insert(0, {root!r})
os.chdir({root!r})
import torch
import common, rto, toy_task
try:
    import data
except ImportError:  # an older checkout: the data helpers were in common.py
    data = common
from transformers import LlamaForCausalLM
args = SimpleNamespace(report_to="none", trust_remote_code=False, seed=0, output_dir={out!r}, bf16=False,
                       collective_timeout=600)
acc = common.setup(args)
tok = data.build_tiny_tokenizer("toy")
torch.manual_seed(0)
model = LlamaForCausalLM(common.tiny_config(tok, 512, 8))
model, _ = acc.prepare(model, torch.optim.Adam(model.parameters()))
prompts = toy_task.prompts("train", 32)
local = len(prompts) // acc.num_processes
mine = prompts[acc.process_index * local:(acc.process_index + 1) * local]
gen = SimpleNamespace(max_new_tokens={tokens}, generation_batch_size=64, temperature=1.0, top_p=1.0)
seeded = "seeds" in inspect.signature(rto.rollout).parameters
times = []
for r in range(4):
    torch.manual_seed(r)
    acc.wait_for_everyone()
    t = time.perf_counter()
    ro = rto.rollout(acc, model, tok, mine, [r * 100 + i for i in range(len(mine))], gen) if seeded else \\
        rto.rollout(acc, model, tok, mine, gen)
    acc.wait_for_everyone()
    times.append(time.perf_counter() - t)
if acc.is_main_process:
    with open({out!r} + "/result.json", "w") as f:
        json.dump({{"seconds": statistics.median(times[1:]), "processes": acc.num_processes}}, f)
common.finish(acc)
"""


def measure(root, sharded, tokens):
    with tempfile.TemporaryDirectory() as out:
        (Path(out) / "probe.py").write_text(PROBE.format(root=str(root), out=out, tokens=tokens))
        if sharded:
            cmd = [
                sys.executable,
                "-m",
                "accelerate.commands.launch",
                "--config_file",
                str(ROOT / "configs" / "cpu_fsdp.yaml"),
                f"{out}/probe.py",
            ]
            env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
        else:
            cmd, env = [sys.executable, f"{out}/probe.py"], {**os.environ, "OMP_NUM_THREADS": "2"}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        result = Path(out) / "result.json"
        if not result.exists():
            sys.exit(f"error: the rollout in {root} failed:\n{proc.stderr[-3000:]}")
        return json.loads(result.read_text())


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--before", help="an older checkout of the project to compare with")
    p.add_argument("--max_new_tokens", type=int, default=24)
    a = p.parse_args()
    for name, root in ([("before", a.before)] if a.before else []) + [("this checkout", ROOT)]:
        one = measure(root, False, a.max_new_tokens)
        two = measure(root, True, a.max_new_tokens)
        assert (one["processes"], two["processes"]) == (1, 2), (one, two)
        print(
            f"{name:>14}: 1 process (2 threads) {one['seconds']:.2f} s, FSDP2 on 2 processes (1 thread each) "
            f"{two['seconds']:.2f} s = {two['seconds'] / one['seconds']:.2f} x   ({root})",
            flush=True,
        )


if __name__ == "__main__":
    main()
