"""Preference pairs labelled by a judge on a policy's own samples, as RLAIF pipelines make them (not a test).

    python scripts/label_pairs.py --policy runs/sft --prompts prompts.jsonl --judge py:scripts/vader_judge.py:compound \
        --k 4 --margin 0.05 --max_new_tokens 48 --out runs/pairs.jsonl

k responses per prompt, sample j of prompt i drawn with its own seed (common.prompt_seeds(--seed, "label<j>")),
each scored by the judge (any spec of judges.py). The pair is the best and the worst of the k; a prompt whose best
and worst differ by less than --margin gives no pair. Prints how many prompts were dropped so, and the tie rate:
the share of all within-prompt pairs of samples whose scores differ by less than --margin. Writes prompt/chosen/
rejected JSONL (with the two scores), the layout dpo.py and reward_model.py read, atomically.
"""

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import data  # noqa: E402
import judges  # noqa: E402
import speed  # noqa: E402


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--policy", required=True, help="the checkpoint that samples (an SFT model)")
    p.add_argument("--prompts", required=True, help="prompt file, hub id, or toy / toy-long")
    p.add_argument("--split", default="train", help="split of a hub dataset or a built-in task")
    p.add_argument("--num_prompts", type=int, default=None, help="the first N that fit (all)")
    p.add_argument("--judge", required=True, help=judges.KINDS)
    p.add_argument("--k", type=int, default=4, help="samples per prompt")
    p.add_argument("--margin", type=float, default=0.05, help="best - worst below this: no pair")
    p.add_argument("--max_prompt_len", type=int, default=512)
    p.add_argument("--max_new_tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--batch_size", type=int, default=32, help="prompts per generate call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dpo_beta", type=float, default=0.1, help="a dpo: judge's beta if unrecorded")
    p.add_argument("--out", required=True, help="the JSONL file to write")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    a.skip_bad_rows, a.long_prompts = False, "skip"  # what data.held_out_prompts reads
    if a.k < 2:
        common.fail(f"--k {a.k}: a pair needs at least 2 samples per prompt")
    for flag in ("num_prompts", "max_prompt_len", "max_new_tokens", "batch_size"):
        if getattr(a, flag) is not None and getattr(a, flag) < 1:
            common.fail(f"--{flag} {getattr(a, flag)}: must be at least 1")
    if a.margin < 0 or a.temperature <= 0 or not 0 < a.top_p <= 1:
        common.fail("--margin must be >= 0, --temperature > 0 and --top_p in (0, 1]")
    if os.path.exists(a.out) and not a.overwrite:
        common.fail(f"--out {a.out} already exists; pass --overwrite to replace it")
    return a


@torch.no_grad()
def sample_scores(model, tokenizer, prompts, ids, judge, a):
    """(texts, scores): k lists, each with one response per prompt and its score."""
    texts, scores = [], []
    for j in range(a.k):
        seeds = common.prompt_seeds(a.seed, f"label{j}", len(ids))
        texts.append([])
        scores.append([])
        for i in range(0, len(ids), a.batch_size):
            chunk = slice(i, i + a.batch_size)
            batch = speed.sample(
                model,
                tokenizer,
                ids[chunk],
                seeds[chunk],
                a.max_new_tokens,
                a.temperature,
                a.top_p,
            )
            decoded = data.decode_responses(tokenizer, batch)
            texts[-1] += decoded
            scores[-1] += judges.score(judge, batch, prompts[chunk], decoded)
        print(f"sample {j + 1} of {a.k}: mean score {sum(scores[-1]) / len(ids):+.4f}", flush=True)
    return texts, scores


def pairs(prompts, texts, scores, margin):
    """(rows, dropped, tie rate): per prompt the best and the worst of its samples, unless they are within margin."""
    rows, dropped, ties, compared = [], 0, 0, 0
    for i, prompt in enumerate(prompts):
        mine = [s[i] for s in scores]  # (k,)
        best = max(range(len(mine)), key=mine.__getitem__)
        worst = min(range(len(mine)), key=mine.__getitem__)
        for x, y in itertools.combinations(mine, 2):
            ties += abs(x - y) < margin
            compared += 1
        if mine[best] - mine[worst] < margin:
            dropped += 1
            continue
        rows.append(
            {
                "prompt": prompt,
                "chosen": texts[best][i],
                "rejected": texts[worst][i],
                "chosen_score": mine[best],
                "rejected_score": mine[worst],
            }
        )
    return rows, dropped, ties / compared


def main(argv=None):
    a = parse(argv)
    tokenizer = data.load_tokenizer(a.policy, "--policy")
    dataset = a.prompts
    prompts, ids = data.held_out_prompts(tokenizer, dataset, a.split, a.num_prompts, a)
    judge = judges.parse(a.judge, dataset, "--judge")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    judge = judges.load(judge, tokenizer, device, a.dpo_beta, prompts)
    model = common.frozen(common.load_causal_lm(a.policy, tokenizer, "--policy")).to(device)
    texts, scores = sample_scores(model, tokenizer, prompts, ids, judge, a)
    rows, dropped, tie_rate = pairs(prompts, texts, scores, a.margin)
    print(
        f"{len(rows)} pairs from {len(prompts)} prompts; dropped {dropped} whose best and worst of {a.k} differ by "
        f"less than {a.margin}; tie rate {tie_rate:.3f} (within-prompt sample pairs closer than {a.margin})"
    )
    if not rows:
        common.fail(f"no pair: every prompt's samples are within --margin {a.margin}")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(a.out + ".tmp", a.out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
