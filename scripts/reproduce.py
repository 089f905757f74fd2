"""The paper's comparison in miniature, on the built-in task, over several seeds.

    python scripts/reproduce.py --out results/reproduce     # both built-in tasks, into <out>/toy and <out>/toy-long
    python scripts/reproduce.py --datasets toy               # the short task only (~15 min here; both ~63 min)

1. tune:   for each method (rto, ppo, dppo) the same small grid of actor learning rate x KL coefficient beta2, on
           a tuning seed that is not an evaluation seed; the score is the oracle reward of the method's own training
           rollouts over its last 5 iterations (train prompts), never the held-out test prompts.
2. seeds:  for each seed, SFT -> DPO -> reward model -> RTO, PPO, DPPO with their tuned settings -> evaluate.py
           with the oracle judge on 400 held-out prompts; the win-rate matrices are averaged over seeds, with a
           95% interval across seeds, and each seed's matrix is kept.
3. budget: RTO and PPO trained on 1/8, 1/4, 1/2 and all of the RL prompts (--num_episodes), final oracle reward
           on the held-out prompts, per seed.
4. why:    scripts/reward_signal.py per seed, on the SFT model's responses and on the RTO policy's: how well the
           reward model, the DPO implicit reward and the DPO token rewards track the oracle, and at what scale.
5. ablate: RTO variants with RTO's tuned settings, held-out oracle reward per seed: without the clip on the DPO
           token reward, and without the reward model (beta3 0, no clip: the paper's first version, which uses the
           same information as DPPO, dense instead of at the last token).
6. control: scripts/oracle_credit.py with RTO's settings: the oracle's exact per-token credit paid at every token
           vs its sum paid at the last token — does dense credit help here when it is right?
Each task (--datasets: toy, toy-long) gets <out>/<task>/summary.md and summary.json; every run folder stays under
it for inspection, and an interrupted reproduction continues where it stopped. The time each task took is printed.

The runs of a step are independent of one another, so --jobs of them (default 2) run at once, each with
cores / jobs threads: the tiny model's matrices are too small for two threads to share one well, and two
one-thread runs side by side get through more runs per minute than one two-thread run at a time.
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import toy_task  # noqa: E402

METHODS = ["rto", "ppo", "dppo"]
VARIANTS = {
    "rto_noclip": ["--dpo_reward_clip", 0],
    "rto_dpo_only": ["--beta3", 0, "--dpo_reward_clip", 0],
}
# actor lr x KL coefficient, the same for all
GRID = [(lr, b2) for lr in (5e-5, 1e-4) for b2 in (0.05, 0.1)]
PROMPTS = toy_task.RL_PROMPTS  # the built-in task's RL prompts


# per run: the cores shared out among the --jobs running at once
THREADS = {"n": os.cpu_count() or 1}


def run(script, *args):
    cmd = [sys.executable, str(ROOT / script), *map(str, args)]
    print("$", " ".join(cmd[1:]), flush=True)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(THREADS["n"]),
    }  # torch takes its thread count from it
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, env=env)


def parallel(jobs, calls):
    """The results of calls (zero-argument functions), in order, `jobs` of them running at a time. After a
    failure no further call starts; it is raised once the calls already running have finished."""
    failed = threading.Event()

    def guarded(call):
        if failed.is_set():
            return None
        try:
            return call()
        except BaseException:
            failed.set()
            raise

    with ThreadPoolExecutor(jobs) as pool:
        futures = [pool.submit(guarded, c) for c in calls]
    return [f.result() for f in futures]


def metrics(folder):
    return [json.loads(line) for line in open(Path(folder) / "metrics.jsonl")]


def preference_stages(out, seed, dataset):
    d = out / f"seed{seed}"
    if not (d / "rm" / "config.json").exists():
        task = ["--seed", seed, "--dataset", dataset]
        run("sft.py", *task, "--output_dir", d / "sft", "--overwrite")
        run("dpo.py", *task, "--sft_ckpt", d / "sft", "--output_dir", d / "dpo", "--overwrite")
        run(
            "reward_model.py",
            *task,
            "--sft_ckpt",
            d / "sft",
            "--output_dir",
            d / "rm",
            "--overwrite",
        )
    return d


def rl(d, method, seed, lr, beta2, name=None, *extra, script="rto.py", pre=(), dataset="toy"):
    """One rto.py run (or a fork of it: `script`, taking `pre` first); an existing folder is reused only if its
    args.json says it ran with these settings."""
    folder = d / (name or method)
    args = [
        "--reward_mode",
        method,
        "--seed",
        seed,
        "--dataset",
        dataset,
        "--sft_ckpt",
        d / "sft",
        "--dpo_ckpt",
        d / "dpo",
        "--rm_ckpt",
        d / "rm",
        "--actor_lr",
        lr,
        "--beta2",
        beta2,
        "--sample_every",
        0,
        "--output_dir",
        folder,
        *extra,
    ]
    done = (folder / "config.json").exists() and (folder / "args.json").exists()
    if not done or not same_settings(json.load(open(folder / "args.json")), args):
        run(script, *pre, *args, "--overwrite")
    return folder


def same_settings(saved, args):
    def value(v):  # 1e-4 == 0.0001 and 0 == 0.0, as rto.py parses them
        try:
            return float(v)
        except (TypeError, ValueError):
            return str(v)

    return all(
        value(saved.get(flag[2:])) == value(v)
        for flag, v in zip(args[::2], args[1::2], strict=False)  # a bare flag ends the list
    )


def train_score(folder):
    it = [m["oracle_reward"] for m in metrics(folder) if "policy_loss" in m]
    return sum(it[-5:]) / len(it[-5:])


def test_score(folder):
    return [m["eval_score"] for m in metrics(folder) if m.get("phase") == "eval"][-1]


def ci95(xs):
    return 1.96 * statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="results/reproduce")
    p.add_argument(
        "--datasets", nargs="+", default=["toy", "toy-long"], choices=["toy", "toy-long"]
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--tune_seed", type=int, default=100)
    p.add_argument("--skip_budget", action="store_true")
    p.add_argument(
        "--jobs", type=int, default=2, help="runs at once, each with cores / jobs threads"
    )
    a = p.parse_args()
    if a.jobs < 1:
        p.error(f"--jobs {a.jobs}: expected at least 1")
    THREADS["n"] = max(1, (os.cpu_count() or 1) // a.jobs)
    for dataset in a.datasets:
        t = time.perf_counter()
        reproduce(Path(a.out).resolve() / dataset, dataset, a)
        print(f"{dataset}: reproduction took {(time.perf_counter() - t) / 60:.1f} min", flush=True)


def reproduce(out, dataset, a):
    out.mkdir(parents=True, exist_ok=True)
    summary = {"dataset": dataset, "grid": GRID, "seeds": a.seeds, "tune_seed": a.tune_seed}
    task = {"dataset": dataset}

    def par(calls):
        return parallel(a.jobs, calls)

    # SFT -> DPO -> reward model, for the tuning seed and every seed
    par([lambda s=s: preference_stages(out, s, dataset) for s in [a.tune_seed, *a.seeds]])

    # 1. tune every method with the same grid
    d = out / f"seed{a.tune_seed}"
    runs = [(m, lr, b2) for m in METHODS for lr, b2 in GRID]
    scores = par(
        [
            lambda m=m, lr=lr, b2=b2: train_score(
                rl(d, m, a.tune_seed, lr, b2, f"{m}_lr{lr:g}_kl{b2:g}", **task)
            )
            for m, lr, b2 in runs
        ]
    )
    tuning = {m: {} for m in METHODS}
    for (m, lr, b2), score in zip(runs, scores, strict=True):
        tuning[m][f"{lr:g},{b2:g}"] = score
    best = {m: max(tuning[m], key=tuning[m].get) for m in METHODS}
    summary.update(tuning=tuning, best=best)

    def tuned(m):
        return map(float, best[m].split(","))

    # 2. the comparison, one pipeline per seed
    par(
        [
            lambda m=m, s=s: rl(out / f"seed{s}", m, s, *tuned(m), **task)
            for s in a.seeds
            for m in METHODS
        ]
    )
    summary["per_seed"] = par([lambda s=s: evaluate(out / f"seed{s}", s, dataset) for s in a.seeds])

    # 3. sample efficiency: RTO vs PPO on a fraction of the prompts (all the prompts: the runs of step 2)
    if not a.skip_budget:
        cells = [(m, frac, s) for m in ("rto", "ppo") for frac in (8, 4, 2, 1) for s in a.seeds]

        def name(m, frac):
            return m if frac == 1 else f"{m}_frac{frac}"

        def extra(frac):
            return [] if frac == 1 else ["--num_episodes", PROMPTS // frac]

        scores = par(
            [
                lambda m=m, frac=frac, s=s: test_score(
                    rl(out / f"seed{s}", m, s, *tuned(m), name(m, frac), *extra(frac), **task)
                )
                for m, frac, s in cells
            ]
        )
        budget = {}
        for (m, frac, _), score in zip(cells, scores, strict=True):
            budget.setdefault(f"{m} 1/{frac}", []).append(score)
        summary["budget"] = budget
        plot_budget(budget, a.seeds, out)

    # 4. why: how well each reward signal tracks the oracle, on SFT's responses and on RTO's
    cells = [(policy, s) for policy in ("sft", "rto") for s in a.seeds]
    signals = par(
        [
            lambda policy=policy, s=s: reward_signal(out / f"seed{s}", policy, dataset)
            for policy, s in cells
        ]
    )
    summary["signal"] = {
        policy: signals[i * len(a.seeds) : (i + 1) * len(a.seeds)]
        for i, policy in enumerate(("sft", "rto"))
    }

    # 5. ablations of RTO's reward, with RTO's tuned settings; 6. control: the oracle's exact credit, paid per token
    # (dense) or at the last token (sparse)
    variants = [(name, "rto", extra, {}) for name, extra in VARIANTS.items()] + [
        (f"oracle_{c}", "ppo", [], {"script": "scripts/oracle_credit.py", "pre": ("--credit", c)})
        for c in ("dense", "sparse")
    ]
    lr, b2 = tuned("rto")
    scores = par(
        [
            lambda s=s, v=v: test_score(
                rl(out / f"seed{s}", v[1], s, lr, b2, v[0], *v[2], **v[3], **task)
            )
            for v in variants
            for s in a.seeds
        ]
    )
    results = {
        v[0]: scores[i * len(a.seeds) : (i + 1) * len(a.seeds)] for i, v in enumerate(variants)
    }
    summary["ablation"] = {name: results[name] for name in VARIANTS}
    summary["ablation"].update(
        {m: [test_score(out / f"seed{s}" / m) for s in a.seeds] for m in METHODS}
    )
    summary["control"] = {
        f"oracle credit, {c}": results[f"oracle_{c}"] for c in ("dense", "sparse")
    }
    diff = [x - y for x, y in zip(*summary["control"].values(), strict=True)]  # paired by seed
    summary["control_difference"] = {"mean": statistics.mean(diff), "ci95": ci95(diff)}
    json.dump(summary, open(out / "summary.json", "w"), indent=1)
    (out / "summary.md").write_text(report(summary))
    print(report(summary))


def evaluate(d, seed, dataset):
    """evaluate.py with the oracle judge over SFT, DPO and the three methods; redone when a model is newer."""
    folders = {m: d / m for m in METHODS}
    ev, done = d / "eval", d / "eval" / "winrates.json"
    if not done.exists() or any(
        (f / "config.json").stat().st_mtime > done.stat().st_mtime for f in folders.values()
    ):
        run(
            "evaluate.py",
            "--models",
            f"sft={d / 'sft'}",
            f"dpo={d / 'dpo'}",
            *[f"{m}={f}" for m, f in folders.items()],
            "--judge",
            "oracle",
            "--num_prompts",
            400,
            "--seed",
            seed,
            "--dataset",
            dataset,
            "--output_dir",
            ev,
            "--overwrite",
        )
    return json.load(open(done))


def reward_signal(d, policy, dataset):
    f = d / f"reward_signal_{policy}.json"  # always redone: the policy may have changed
    run(
        "scripts/reward_signal.py",
        "--run",
        d,
        "--policy",
        policy,
        "--json",
        f,
        "--dataset",
        dataset,
    )
    return json.load(open(f))


def plot_budget(budget, seeds, out):
    """budget.csv, and budget.png when matplotlib is installed (requirements-plot.txt)."""
    with open(out / "budget.csv", "w") as f:
        f.write("run,fraction," + ",".join(f"seed{s}" for s in seeds) + ",mean\n")
        for k, xs in budget.items():
            m, frac = k.split(" ")
            f.write(
                f"{m},{frac}," + ",".join(f"{x:.4f}" for x in xs) + f",{statistics.mean(xs):.4f}\n"
            )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"wrote {out / 'budget.csv'} (pip install -r requirements-plot.txt for budget.png)")
        return
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for m in ("rto", "ppo"):
        rows = [
            (PROMPTS // int(k.split("/")[1]), xs)
            for k, xs in budget.items()
            if k.startswith(m + " ")
        ]
        x = [n for n, _ in rows]
        (line,) = ax.plot(x, [statistics.mean(xs) for _, xs in rows], marker="o", label=m)
        for n, xs in rows:
            ax.scatter([n] * len(xs), xs, color=line.get_color(), alpha=0.35, s=12)
    ax.set_xscale("log", base=2)
    ax.set_xticks(x, [str(n) for n in x])
    ax.minorticks_off()
    ax.set_xlabel("RL prompts used")
    ax.set_ylabel("held-out oracle reward")
    ax.set_title("Sample efficiency (mean over seeds; dots: seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "budget.png", dpi=120)
    print(f"wrote {out / 'budget.png'}")


def report(s):
    names = list(s["per_seed"][0]["models"])
    lines = [
        f"# The built-in task '{s.get('dataset', 'toy')}'",
        "",
        f"## Tuning (tuning seed {s['tune_seed']}; oracle reward of training rollouts, last 5 iterations)",
        "",
        "| method | "
        + " | ".join(f"lr {k.split(',')[0]}, β2 {k.split(',')[1]}" for k in s["tuning"]["rto"])
        + " | chosen |",
        "|---" * (len(s["tuning"]["rto"]) + 2) + "|",
    ]
    for m, row in s["tuning"].items():
        lines.append(
            f"| {m} | " + " | ".join(f"{v:.3f}" for v in row.values()) + f" | {s['best'][m]} |"
        )
    lines += [
        "",
        f"## Win rates, oracle judge, mean over seeds {s['seeds']} ± 95% interval across seeds "
        "(row beats column)",
        "",
        "| | " + " | ".join(names) + " |",
        "|---" * (len(names) + 1) + "|",
    ]
    for i, a in enumerate(names):
        cells = []
        for j in range(len(names)):
            xs = [m["win_rates"][a][names[j]] for m in s["per_seed"]]
            cells.append(f"{statistics.mean(xs):.3f} ± {ci95(xs):.3f}" if i != j else "0.500")
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Row beats column in how many seeds (win rate > 0.5):",
        "",
        "| | " + " | ".join(names) + " |",
        "|---" * (len(names) + 1) + "|",
    ]
    for a in names:
        lines.append(
            f"| {a} | "
            + " | ".join(
                "-" if a == b else str(sum(m["win_rates"][a][b] > 0.5 for m in s["per_seed"]))
                for b in names
            )
            + " |"
        )
    lines += [
        "",
        "Mean oracle score per seed:",
        "",
        "| model | " + " | ".join(f"seed {x}" for x in s["seeds"]) + " |",
        "|---" * (len(s["seeds"]) + 1) + "|",
    ]
    for a in names:
        lines.append(
            f"| {a} | "
            + " | ".join(f"{m['summary'][a]['mean_score']:.3f}" for m in s["per_seed"])
            + " |"
        )
    if "budget" in s:
        lines += [
            "",
            "## Sample efficiency: held-out oracle reward after training on a fraction of the RL prompts",
            "",
            "| run | " + " | ".join(f"seed {x}" for x in s["seeds"]) + " | mean |",
            "|---" * (len(s["seeds"]) + 2) + "|",
        ]
        for k, xs in s["budget"].items():
            lines.append(
                f"| {k} | " + " | ".join(f"{x:.3f}" for x in xs) + f" | {statistics.mean(xs):.3f} |"
            )
    if "signal" in s:
        rows = [
            ("reward-model score vs oracle, correlation", "corr_oracle_rm"),
            ("DPO implicit reward vs oracle, correlation", "corr_oracle_dpo_sum"),
            (
                "sum of clipped DPO token rewards vs oracle, correlation",
                "corr_oracle_dpo_clipped_sum",
            ),
            (
                "DPO token reward vs the oracle's credit for the word, correlation",
                "corr_token_reward_credit",
            ),
            ("share of DPO token rewards at the clip", "token_reward_at_clip"),
            ("std over responses: reward-model score", "std_rm_score"),
            ("std over responses: sum of clipped DPO token rewards", "std_dpo_clipped_sum"),
        ]
        lines += [
            "",
            "## Why: each reward signal against the oracle (scripts/reward_signal.py; mean over seeds, "
            "min..max)",
            "",
            "| | on SFT's responses | on RTO's responses |",
            "|---|---|---|",
        ]

        def cell(xs):
            return f"{statistics.mean(xs):.3f} ({min(xs):.3f}..{max(xs):.3f})"

        for label, key in rows:
            lines.append(
                f"| {label} | "
                + " | ".join(cell([x[key] for x in s["signal"][p]]) for p in ("sft", "rto"))
                + " |"
            )
        lines += [
            "",
            "Mean DPO token reward by kind of word (mean over seeds):",
            "",
            "| word | on SFT's responses | on RTO's responses |",
            "|---|---|---|",
        ]
        for kind in s["signal"]["sft"][0]["by_kind"]:
            means = [
                statistics.mean(x["by_kind"][kind]["mean_reward"] for x in s["signal"][p])
                for p in ("sft", "rto")
            ]
            # a kind of word this task never produces (";" on toy)
            if any(math.isnan(m) for m in means):
                continue
            lines.append(f"| {kind} | " + " | ".join(f"{m:+.4f}" for m in means) + " |")
    if "ablation" in s:
        lines += [
            "",
            "## Ablations of RTO's reward: held-out oracle reward (200 prompts) per seed",
            "",
            "| run | " + " | ".join(f"seed {x}" for x in s["seeds"]) + " | mean |",
            "|---" * (len(s["seeds"]) + 2) + "|",
        ]
        for k, xs in {**s["ablation"], **s.get("control", {})}.items():
            lines.append(
                f"| {k} | " + " | ".join(f"{x:.3f}" for x in xs) + f" | {statistics.mean(xs):.3f} |"
            )
    if "control_difference" in s:
        c = s["control_difference"]
        lines += [
            "",
            f"Oracle credit, dense − sparse, paired by seed: {c['mean']:+.3f} ± {c['ci95']:.3f} (95%)",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
