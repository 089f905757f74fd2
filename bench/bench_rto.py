"""Benchmark of one rto.py iteration (not a test): seconds per phase, generated tokens/s, peak memory, and the
overhead ratio = iteration time / (the same generate call + the same frozen forward passes + the same
training passes, each timed alone in the same run). Target: <= 1.2.

    python bench/bench_rto.py                       # tiny (hidden 128, 4 layers) and hidden 512 x 8 layers
    python bench/bench_rto.py --scaling             # also: iteration time against max_new_tokens and batch size

Random models with the built-in task's tokenizer; timings are medians of --repeats runs after one warm-up.
Run it on a quiet machine: other load on 2 cores makes any of this many times slower.
"""

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification  # noqa: E402

import common  # noqa: E402
import data  # noqa: E402
import rto  # noqa: E402
import speed  # noqa: E402
import toy_task  # noqa: E402


def build(hidden, layers):
    tok = data.build_tiny_tokenizer(common.TOY)
    cfg = common.tiny_config(tok, hidden, layers)
    torch.manual_seed(0)

    def lm():
        return common.disable_dropout(LlamaForCausalLM(cfg))

    def scorer():
        return common.disable_dropout(
            LlamaForSequenceClassification(LlamaConfig(**{**cfg.to_dict(), "num_labels": 1}))
        )

    models = {
        "policy": lm(),
        "critic": scorer(),
        "ref": common.frozen(lm()),
        "dpo": common.frozen(lm()),
        "rm": common.frozen(scorer()),
    }
    models["rm"].config.reward_mean, models["rm"].config.reward_std = 0.0, 1.0
    return tok, models


def args_for(rollout, new_tokens):
    a = common.parse_args(
        rto.Args,
        [
            "--sft_ckpt",
            "x",
            "--dpo_ckpt",
            "x",
            "--rm_ckpt",
            "x",
            "--output_dir",
            "x",
            "--rollout_batch_size",
            str(rollout),
            "--mini_batch_size",
            "16",
            "--max_new_tokens",
            str(new_tokens),
            "--generation_batch_size",
            str(rollout),
        ],
        rto.DEFAULTS,
    )
    return rto.validate(a)


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def one_iteration(acc, tok, models, opts, scheds, args, sizes, prompts, seed):
    """rto.py's loop body, phase by phase, as main() runs it."""
    torch.manual_seed(seed)
    ro, t_gen = timed(
        lambda: rto.rollout(acc, models["policy"], tok, prompts, [seed] * len(prompts), args)
    )
    t0 = time.perf_counter()
    ro = rto.frozen_pass(acc, ro, models, args)
    ro["rewards"] = rto.token_rewards(ro, args, args.beta2)
    ro["advantages"], ro["returns"] = rto.gae(
        ro["rewards"], ro["values"], ro["response_mask"], 1.0, 0.95
    )
    ro["advantages"] = rto.whiten(acc, ro["advantages"], ro["response_mask"])
    t_score = time.perf_counter() - t0
    _, t_update = timed(lambda: rto.ppo_update(acc, ro, models, opts, scheds, args, sizes))
    return ro, {"generate": t_gen, "frozen_pass": t_score, "update": t_update}


def alone(tok, models, opts, args, sizes, prompts, ro, seed):
    """The same work without rto.py around it: one generate call, bare forward passes, bare train steps."""
    policy = models["policy"]
    ids, mask = common.left_pad([data.encode_prompt(tok, p) for p in prompts], tok.pad_token_id)
    torch.manual_seed(seed)
    with torch.no_grad():
        _, t_gen = timed(
            lambda: policy.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=True,
                top_k=0,
                max_new_tokens=args.max_new_tokens,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
        )
    pos = speed.position_ids(ro["attention_mask"])
    B = ro["input_ids"].shape[0]

    def forwards():
        with torch.no_grad():
            for i in range(0, B, sizes["micro"]):
                x, m, p = (
                    ro["input_ids"][i : i + sizes["micro"]],
                    ro["attention_mask"][i : i + sizes["micro"]],
                    pos[i : i + sizes["micro"]],
                )
                for name in ("policy", "ref", "dpo", "critic", "rm"):
                    models[name](input_ids=x, attention_mask=m, position_ids=p)

    _, t_fwd = timed(forwards)

    def train():
        for _ in range(args.ppo_epochs):
            for i in range(0, B, sizes["micro"]):
                x, m, p = (
                    ro["input_ids"][i : i + sizes["micro"]],
                    ro["attention_mask"][i : i + sizes["micro"]],
                    pos[i : i + sizes["micro"]],
                )
                loss = (
                    policy(input_ids=x, attention_mask=m, position_ids=p).logits.float().mean()
                    + models["critic"](input_ids=x, attention_mask=m, position_ids=p).logits.mean()
                )
                loss.backward()
                for o in opts:
                    o.step()
                    o.zero_grad()

    _, t_train = timed(train)
    return {"generate": t_gen, "frozen_pass": t_fwd, "update": t_train}


def bench(hidden, layers, rollout=64, new_tokens=24, repeats=3):
    acc = Accelerator(cpu=True)
    tok, models = build(hidden, layers)
    args = args_for(rollout, new_tokens)
    sizes = rto.batch_sizes(args, 1)
    acc.gradient_accumulation_steps = sizes["accum"]
    opts = [torch.optim.Adam(models[m].parameters(), lr=1e-6) for m in ("policy", "critic")]
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0) for o in opts]
    models["policy"], models["critic"], *opts = acc.prepare(
        models["policy"], models["critic"], *opts
    )
    scheds = acc.prepare(*scheds)
    prompts = toy_task.prompts("train", rollout)
    rows = []
    for r in range(repeats + 1):  # the first is a warm-up
        ro, full = one_iteration(acc, tok, models, opts, scheds, args, sizes, prompts, seed=r)
        bare = alone(tok, models, opts, args, sizes, prompts, ro, seed=r)
        tokens = int(ro["response_mask"].sum())
        if r:
            rows.append((full, bare, tokens))

    def med(f):
        return statistics.median(f(x) for x in rows)

    it = med(lambda x: sum(x[0].values()))
    parts = med(lambda x: sum(x[1].values()))
    return {
        "model": f"hidden {hidden} x {layers} layers",
        "params_M": sum(p.numel() for p in models["policy"].parameters()) / 1e6,
        "rollout": rollout,
        "new_tokens": new_tokens,
        "iteration_s": it,
        **{f"{k}_s": med(lambda x, k=k: x[0][k]) for k in ("generate", "frozen_pass", "update")},
        "gen_tokens_per_s": med(lambda x: x[2] / x[0]["generate"]),
        "overhead_ratio": it / parts,
        "peak_rss_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def table(rows):
    keys = list(rows[0])
    out = ["| " + " | ".join(keys) + " |", "|---" * len(keys) + "|"]
    out += [
        "| "
        + " | ".join(f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k in keys)
        + " |"
        for r in rows
    ]
    return "\n".join(out)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--scaling", action="store_true")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(2)
    print(table([bench(128, 4, repeats=a.repeats), bench(512, 8, repeats=a.repeats)]))
    if a.scaling:
        print()
        print(
            table(
                [
                    bench(128, 4, rollout=b, new_tokens=n, repeats=a.repeats)
                    for b, n in ((64, 12), (64, 24), (64, 48), (32, 24), (128, 24))
                ]
            )
        )
