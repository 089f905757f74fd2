"""Evaluation: pairwise win rates between trained models, the layout of the paper's Table 1; RL curves.

    python evaluate.py --models sft=runs/sft dpo=runs/dpo ppo=runs/ppo dppo=runs/dppo rto=runs/rto \
        --judge oracle --num_prompts 400 --output_dir results/eval
    python evaluate.py --curves runs/rto runs/ppo runs/dppo --output_dir results/curves

Protocol (docs/algorithm.md, "What the paper reports"): every model samples one response to each of the same
held-out prompts with the same settings (each model with its own fixed seed); one judge scores every response;
the win rate of row model a over column model b is the fraction of prompts where a's response scores higher,
ties counting half.

Judges (--judge), judges.py: oracle (the built-in tasks' ground truth), rm:<dir>, dpo:<dpo_dir>,<ref_dir>, or your
own Python function py:<file.py>:<function>. A model named m draws prompt k's response with the seed
common.prompt_seeds(--seed, m)[k]: whatever the batch, and for a model named policy the response rto.py's
evaluation drew.

Writes winrates.md, winrates.json, responses.jsonl; token_rewards.html with --show_token_rewards; curves.png
(or curves.csv without matplotlib) with --curves. One process (python, not accelerate launch).
"""

import csv
import html
import json
import math
import os
import sys
from dataclasses import dataclass, field

import torch
from accelerate.utils import tqdm

import common
import data
import judges
import speed
from common import TOY, Default, arg

# flag: its value on the built-in task, with real models (None: required), on toy-long; None in Args
DEFAULTS = {
    "judge": Default(toy="oracle", real=None),
    "max_prompt_len": Default(toy=24, real=512),
    "max_new_tokens": Default(toy=24, real=512, toy_long=96),
}


@dataclass
class Args(common.RunArgs):
    models: list[str] = field(
        default_factory=list,
        metadata={
            "help": "name=checkpoint_dir ... (row/column order of "
            "the table); every model must share the first one's vocabulary"
        },
    )
    judge: str = arg(None, "oracle | rm:<dir> | dpo:<dpo>,<ref> | py:<file.py>:<function>")
    dataset: str = arg(
        TOY, "held-out prompts: 'toy' (the built-in task's test prompts), a hub id or a file"
    )
    split: str = arg("test", "split of a hub dataset")
    num_prompts: int = arg(400, "prompts to evaluate on (paper: 400)")
    max_prompt_len: int = arg(
        None, "prompt tokens; longer prompts are skipped or fatal (--long_prompts)"
    )
    max_new_tokens: int = arg(None, "response length limit")
    temperature: float = arg(1.0, "sampling temperature, the same for every model")
    top_p: float = arg(1.0, "nucleus sampling, the same for every model")
    batch_size: int = arg(64, "prompts per generate call (and per judge forward pass)")
    dpo_beta: float = arg(0.1, "beta of a DPO model whose config has no dpo_beta")
    show_token_rewards: int = arg(
        0, "show the per-token DPO reward of this many responses of every model"
    )
    token_reward_dpo: str = arg(
        None, "<dpo_dir>,<ref_dir> for --show_token_rewards (default: a dpo: judge's)"
    )
    curves: list[str] = field(
        default_factory=list,
        metadata={"help": "rto.py run folders whose metrics.jsonl to plot, one line per run"},
    )
    output_dir: str = arg("results/eval", "where the tables, responses and plots go")


CURVE_METRICS = [
    "eval_score",
    "sentence_reward",
    "oracle_reward",
    "dpo_reward_per_response",
    "kl_per_token",
    "response_length",
]


def validate(args):
    """Every bad value fails here, with one line, before anything is loaded or written."""
    if not args.models and not args.curves:
        common.fail("nothing to do: pass --models name=dir ... and/or --curves run_dir ...")
    if args.models and not args.judge:
        common.fail(
            "--judge is required off the built-in task: rm:<dir>, dpo:<dpo_dir>,<ref_dir> or py:<file.py>:<function>"
        )
    common.check_at_least(args, 1, "num_prompts", "batch_size", "max_new_tokens", "max_prompt_len")
    common.check_at_least(args, 0, "show_token_rewards")
    common.check_positive(args, "temperature", "dpo_beta")
    if not 0 < args.top_p <= 1:
        common.fail(f"--top_p {args.top_p}: must be greater than 0 and at most 1")
    if args.token_reward_dpo and not judges.is_pair(args.token_reward_dpo):
        common.fail(f"--token_reward_dpo {args.token_reward_dpo}: expected <dpo_dir>,<ref_dir>")
    if args.show_token_rewards and not (
        args.token_reward_dpo or (args.judge or "").startswith("dpo:")
    ):
        common.fail(
            "--show_token_rewards needs a DPO model: --judge dpo:<dpo>,<ref> or --token_reward_dpo <dpo>,<ref>"
        )
    return args


# ============================================================================ parsing --models and --judge
def parse_models(entries):
    """['sft=runs/sft', ...] -> {'sft': 'runs/sft', ...}, in the order given."""
    models = {}
    for entry in entries:
        name, sep, path = entry.partition("=")
        if not (sep and name.strip() and path.strip()):
            common.fail(f"--models {entry}: expected name=checkpoint_dir")
        if name in models:
            common.fail(f"--models: the name {name!r} is given twice")
        models[name] = path
    return models


# ============================================================================ sampling and scoring
@torch.no_grad()
def sample_and_score(model, tokenizer, prompts, ids, judge, args, name):
    """One response per prompt, scored: rows {prompt, response, score, length, ended, ids}. Prompt k is drawn
    with its own seed from --seed and the model's name: a model's samples do not depend on which other models
    are in the table or on the batch, and models draw independently as in the paper (one shared stream would make
    similar models write identical responses to many prompts: ties, not independent draws)."""
    seeds = common.prompt_seeds(args.seed, name, len(ids))
    width = max(map(len, ids))  # one prompt width for all batches and models
    rows = []
    bar = tqdm(total=len(ids), desc=f"{name}: sample + judge", dynamic_ncols=True)
    for i in range(0, len(ids), args.batch_size):
        chunk = slice(i, i + args.batch_size)
        batch = speed.sample(
            model,
            tokenizer,
            ids[chunk],
            seeds[chunk],
            args.max_new_tokens,
            args.temperature,
            args.top_p,
            width,
        )
        texts = data.decode_responses(tokenizer, batch)
        scores = judges.score(judge, batch, prompts[chunk], texts)
        # (b, R), right-padded after the first EOS
        responses = batch["input_ids"][:, batch["prompt_len"] :]
        for k, (text, score) in enumerate(zip(texts, scores, strict=True)):
            mask = batch["response_mask"][k].bool()
            rows.append(
                {
                    "prompt": prompts[i + k],
                    "response": text,
                    "score": score,
                    "length": int(mask.sum()),
                    "ended": bool(batch["ended"][k]),
                    "ids": responses[k][mask].tolist(),
                }
            )
        bar.update(len(texts))
    bar.close()
    return rows


# ============================================================================ win rates and the summary
def win_rates(scores, tie_tol=1e-6):
    """{name: [score per prompt]} (same prompts, same order) -> {row: {col: P(row's response scores higher)}}.

    Ties count half, so W[a][b] + W[b][a] = 1 and W[a][a] = 0.5. Scores within tie_tol are a tie: a model
    judge scores the same text to float noise that depends on the batch's padding."""

    def beats(x, y):
        return 0.5 if abs(x - y) <= tie_tol else float(x > y)

    return {
        a: {b: sum(map(beats, sa, sb)) / len(sa) for b, sb in scores.items()}
        for a, sa in scores.items()
    }


def mean_ci(xs):
    """(mean, half-width of the 95% normal-approximation interval 1.96 * std / sqrt(n)), std with n - 1."""
    n, mean = len(xs), sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
    return mean, 1.96 * std / math.sqrt(n)


def summarise(rows):
    mean, ci = mean_ci([r["score"] for r in rows])
    return {
        "mean_score": mean,
        "ci95": ci,
        "mean_length": sum(r["length"] for r in rows) / len(rows),
        "eos_rate": sum(r["ended"] for r in rows) / len(rows),
    }


def markdown(wins, summary, judge, n):
    names = list(wins)
    lines = [
        f"Win rates, judge `{judge}`, {n} prompts: row beats column (ties count half)",
        "",
        "| | " + " | ".join(names) + " |",
        "|---" * (len(names) + 1) + "|",
    ]
    lines += [f"| {a} | " + " | ".join(f"{wins[a][b]:.3f}" for b in names) + " |" for a in names]
    lines += [
        "",
        "| model | mean score | 95% CI | mean length (tokens, EOS included) | EOS rate |",
        "|---" * 5 + "|",
    ]
    lines += [
        f"| {m} | {s['mean_score']:.3f} | ±{s['ci95']:.3f} | {s['mean_length']:.1f} | {s['eos_rate']:.3f} |"
        for m, s in summary.items()
    ]
    return "\n".join(lines) + "\n"


def write_results(out, results, args):
    """winrates.md/.json (the table and the per-model summary) and responses.jsonl; returns the markdown."""
    wins = win_rates({m: [r["score"] for r in rows] for m, rows in results.items()})
    summary = {m: summarise(rows) for m, rows in results.items()}
    n = len(next(iter(results.values())))
    text = markdown(wins, summary, args.judge, n)
    with open(os.path.join(out, "winrates.md"), "w") as f:
        f.write(text)
    settings = {
        k: getattr(args, k) for k in ("dataset", "seed", "temperature", "top_p", "max_new_tokens")
    }
    with open(os.path.join(out, "winrates.json"), "w") as f:
        json.dump(
            {
                "judge": args.judge,
                "num_prompts": n,
                "models": parse_models(args.models),
                **settings,
                "win_rates": wins,
                "summary": summary,
            },
            f,
            indent=2,
        )
    with open(os.path.join(out, "responses.jsonl"), "w") as f:
        for model, rows in results.items():
            for k, r in enumerate(rows):
                f.write(
                    json.dumps(
                        {
                            "prompt_index": k,
                            "prompt": r["prompt"],
                            "model": model,
                            "response": r["response"],
                            "score": r["score"],
                            "length": r["length"],
                            "ended": r["ended"],
                        }
                    )
                    + "\n"
                )
    return text, summary


# ============================================================================ per-token DPO rewards, shown
def token_pieces(tokenizer, ids):
    """The text each token adds to the decoded response (spaces included), special tokens shown."""
    pieces, prev = [], ""
    for k in range(len(ids)):
        text = tokenizer.decode(ids[: k + 1])
        pieces.append(
            text[len(prev) :] if text.startswith(prev) else tokenizer.decode(ids[k : k + 1])
        )
        prev = text
    return pieces


def colour(value, scale):
    """Green for credit, red for blame, from white at 0 to full at |value| = scale: (r, g, b)."""
    a = min(1.0, abs(value) / scale)
    full = (60, 190, 60) if value > 0 else (225, 70, 70)
    return tuple(round(255 + a * (c - 255)) for c in full)


def print_token_rewards(items, scale):
    tty = sys.stdout.isatty()
    for it in items:
        if tty:
            body = "".join(
                "\x1b[30;48;2;{};{};{}m".format(*colour(v, scale)) + t + "\x1b[0m"
                for t, v in zip(it["tokens"], it["values"], strict=True)
            )
        else:
            body = " ".join(
                f"{t.strip() or repr(t)}[{v:+.3f}]"
                for t, v in zip(it["tokens"], it["values"], strict=True)
            )
        print(f"[{it['model']}] {it['prompt']!r} (sum {sum(it['values']):+.3f}): {body}")


def token_rewards_html(items, scale, beta):
    """A self-contained page: every token a <span> coloured by its reward, the value in its tooltip."""
    blocks = []
    for it in items:
        spans = "".join(
            f'<span style="background:rgb{colour(v, scale)}" title="{v:+.4f}">{html.escape(t)}</span>'
            for t, v in zip(it["tokens"], it["values"], strict=True)
        )
        blocks.append(
            f"<div class=r><b>{html.escape(it['model'])}</b> &mdash; {html.escape(it['prompt'])} "
            f"(sum {sum(it['values']):+.3f})<p class=t>{spans}</p></div>"
        )
    return (
        "<!doctype html><html><head><meta charset=utf-8><title>DPO token rewards</title><style>"
        "body{font-family:sans-serif;max-width:60em;margin:2em auto} .r{margin:1.5em 0} "
        ".t{font-family:monospace;white-space:pre-wrap;line-height:1.8}</style></head><body>"
        f"<h1>Per-token DPO reward &beta;&middot;(log &pi;<sub>dpo</sub> &minus; log &pi;<sub>ref</sub>), "
        f"&beta; = {beta}</h1><p>Green: credit, red: blame; full colour at |reward| &ge; {scale:.3f}. "
        "Hover over a token for its value.</p>" + "".join(blocks) + "</body></html>\n"
    )


@torch.no_grad()
def show_token_rewards(pair, tokenizer, results, prompt_ids, n, out, device):
    """The first n responses of every model, token by token: on stdout and in token_rewards.html."""
    items = []
    for model, rows in results.items():
        batch = data.collate(prompt_ids[:n], [r["ids"] for r in rows[:n]], tokenizer.pad_token_id)
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        rewards = judges.dpo_token_rewards(pair, batch)  # (n, R)
        items += [
            {
                "model": model,
                "prompt": r["prompt"][-1]["content"],
                "tokens": token_pieces(tokenizer, r["ids"]),
                "values": rewards[k, : len(r["ids"])].tolist(),
            }
            for k, r in enumerate(rows[:n])
        ]
    # one scale for all models
    scale = max((abs(v) for it in items for v in it["values"]), default=0.0) or 1.0
    print_token_rewards(items, scale)
    with open(os.path.join(out, "token_rewards.html"), "w") as f:
        f.write(token_rewards_html(items, scale, pair["beta"]))


# ============================================================================ training curves
def read_curves(run_dirs):
    """{run label (folder name): iteration lines of its metrics.jsonl} for rto.py runs."""
    curves = {}
    for d in run_dirs:
        path = os.path.join(d, "metrics.jsonl")
        try:
            with open(path) as f:
                lines = [json.loads(line) for line in f if line.strip()]
        except (OSError, ValueError) as e:
            common.fail(f"--curves {d}: cannot read {path} ({type(e).__name__})")
        # iteration lines and evaluations on held-out prompts
        lines = [m for m in lines if "policy_loss" in m or m.get("phase") == "eval"]
        if not lines:
            common.fail(f"--curves {d}: {path} has no RL iteration lines (is it an rto.py run?)")
        label = os.path.basename(os.path.normpath(d))
        curves[d if label in curves else label] = (
            lines  # two runs/rto folders: the second goes by its path
        )
    return curves


def plot_curves(curves, out):
    """curves.png, one subplot per metric and one line per run; curves.csv (long format) without matplotlib."""
    metrics = [
        m for m in CURVE_METRICS if any(m in line for lines in curves.values() for line in lines)
    ]
    # the held-out judge's score against the KL from the reference: the over-optimisation picture
    by_kl = any("eval_kl_per_response" in line for lines in curves.values() for line in lines)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        path = os.path.join(out, "curves.csv")
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["run", "step", "metric", "value"])
            w.writerows(
                [run, line["step"], m, line[m]]
                for run, lines in curves.items()
                for line in lines
                for m in [*metrics, "eval_kl_per_response"]
                if m in line
            )
        print(
            f"matplotlib is not installed, so the curves went to {path} (pip install -r requirements-plot.txt)"
        )
        return path
    panels = len(metrics) + by_kl
    cols, rows = min(3, panels), math.ceil(panels / 3)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows + 0.5), squeeze=False)
    # a run keeps its colour where others have no line
    colours = {run: f"C{k}" for k, run in enumerate(curves)}
    for ax, m in zip(axes.flat[: len(metrics)], metrics, strict=True):
        for run, lines in curves.items():
            points = [(line["step"], line[m]) for line in lines if m in line]
            if points:
                ax.plot(*zip(*points, strict=True), color=colours[run])
        ax.set(title=m, xlabel="iteration")
    if by_kl:
        ax = axes.flat[len(metrics)]
        for run, lines in curves.items():
            points = [
                (m["eval_kl_per_response"], m["eval_score"]) for m in lines if "eval_score" in m
            ]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", color=colours[run])
        ax.set(title="eval_score against KL", xlabel="eval_kl_per_response")
    for ax in axes.flat[panels:]:
        ax.axis("off")
    fig.legend(
        [plt.Line2D([], [], color=c) for c in colours.values()],
        list(colours),
        loc="upper center",
        ncol=len(colours),
        frameon=False,
    )
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))
    path = os.path.join(out, "curves.png")
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")
    return path


def main(argv=None):
    args = validate(common.parse_args(Args, argv, DEFAULTS))
    models = parse_models(args.models)
    judge = judges.parse(args.judge, args.dataset, "--judge") if models else None
    curves = read_curves(args.curves)
    accelerator = common.setup(args)
    # every process would sample everything and write the same files
    if accelerator.num_processes > 1:
        common.fail("evaluate.py runs in one process: start it with python, not accelerate launch")
    device = accelerator.device
    if models:  # every input is checked and every model found before anything is written
        first = next(iter(models.values()))
        tokenizer = data.load_tokenizer(first, "--models")
        for path in models.values():
            data.same_vocab(path, tokenizer, "--models", "the first model")
        prompts, prompt_ids = data.held_out_prompts(
            tokenizer, args.dataset, args.split, args.num_prompts, args
        )
        judge = judges.load(judge, tokenizer, device, args.dpo_beta, prompts)
        pair = judge  # the token rewards come from the dpo: judge unless --token_reward_dpo names another pair
        if args.show_token_rewards and args.token_reward_dpo:
            pair = judges.load_dpo_pair(
                args.token_reward_dpo, tokenizer, "--token_reward_dpo", args.dpo_beta, device
            )
    common.prepare_output_dir(args, accelerator, {"prompts": len(prompt_ids)} if models else None)

    if models:
        results = {}
        for name, path in models.items():  # one policy in memory at a time
            model = common.frozen(common.load_causal_lm(path, tokenizer, "--models")).to(device)
            results[name] = sample_and_score(
                model, tokenizer, prompts, prompt_ids, judge, args, name
            )
            del model
        text, summary = write_results(args.output_dir, results, args)
        print(text)
        common.log_metrics(
            accelerator,
            args.output_dir,
            {f"{m}/{k}": v for m, s in summary.items() for k, v in s.items()},
            0,
        )
        if args.show_token_rewards:
            show_token_rewards(
                pair,
                tokenizer,
                results,
                prompt_ids,
                args.show_token_rewards,
                args.output_dir,
                device,
            )
    if curves:
        plot_curves(curves, args.output_dir)
    print(f"wrote {args.output_dir}")
    common.finish(accelerator)


if __name__ == "__main__":
    main()
