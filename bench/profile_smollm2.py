"""Where an rto.py iteration's time goes on SmolLM2-135M, op by op (not a test).

    python bench/profile_smollm2.py [--flags "..."] [--rows 12]

The run of bench_smollm2.py (the same model, prompts and sizes, rto.py's defaults unless --flags says otherwise),
2 iterations in this process; the second iteration's rollout, frozen pass and update each run under torch.profiler, and
each phase's table lists the ops by their own CPU time (self time: a matmul's time is in aten::mm or aten::addmm,
not in the linear layer that called it), with each op's share of the phase.
"""

import argparse
import os
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import bench_smollm2  # noqa: E402

import rto  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--flags", default="", help="rto.py flags (default: rto.py's defaults)")
    p.add_argument("--rows", type=int, default=12, help="ops per phase")
    p.add_argument(
        "--work", default="/tmp/bench_smollm2", help="where the converted model and the run go"
    )
    a = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    torch.set_num_threads(2)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    lm, rm = bench_smollm2.checkpoints(work)
    tables, calls = {}, {}

    def profiled(name, step):  # the phase's second call (iteration 2) under the profiler
        def run(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            if calls[name] != 2:
                return step(*args, **kwargs)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                out = step(*args, **kwargs)
            events = prof.key_averages()
            total = sum(e.self_cpu_time_total for e in events)
            rows = sorted(events, key=lambda e: -e.self_cpu_time_total)[: a.rows]
            tables[name] = [
                (e.key, e.count, e.self_cpu_time_total / 1e6, e.self_cpu_time_total / total)
                for e in rows
            ] + [("all ops", sum(e.count for e in events), total / 1e6, 1.0)]
            return out

        return run

    rto.rollout = profiled("rollout", rto.rollout)
    rto.frozen_pass = profiled("frozen pass", rto.frozen_pass)
    rto.ppo_update = profiled("update", rto.ppo_update)
    argv = [
        "--sft_ckpt",
        lm,
        "--dpo_ckpt",
        lm,
        "--rm_ckpt",
        rm,
        "--dataset",
        bench_smollm2.PROMPTS,
        "--num_iterations",
        2,
        *bench_smollm2.RUN,
        *a.flags.split(),
        "--output_dir",
        work / "run_profile",
        "--overwrite",
    ]
    rto.main(list(map(str, argv)))
    for name, rows in tables.items():
        print(f"\n{name} (iteration 2), ops by their own CPU time:")
        print(f"  {'op':<44} {'calls':>7} {'seconds':>8} {'share':>6}")
        for key, count, seconds, share in rows:
            print(f"  {key[:44]:<44} {count:>7} {seconds:>8.2f} {share:>6.1%}")


if __name__ == "__main__":
    main()
