"""How often judges agree with a file of labelled pairs: each judge's accuracy on prompt/chosen/rejected (not a test).

    python scripts/judge_accuracy.py --pairs runs/pairs.jsonl --tokenizer runs/sft \
        --judge rm:runs/rm --judge dpo:runs/dpo,runs/sft --out runs/accuracy.json

A pair counts 1 when the judge scores chosen above rejected, 1/2 when it scores them equal, 0 otherwise. The pairs
are those scripts/label_pairs.py writes (a gold judge's labels on a policy's samples) or any preference file that
dpo.py reads; each response is tokenised as dpo.py and reward_model.py tokenise it. Prints one line per judge and
writes {judge spec: accuracy, "pairs": n} to --out, atomically.
"""

import argparse
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


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--pairs", required=True, help="prompt/chosen/rejected JSONL (or any preference file)"
    )
    p.add_argument(
        "--tokenizer", required=True, help="the checkpoint whose tokenizer the judges read"
    )
    p.add_argument(
        "--judge", required=True, action="append", help=f"{judges.KINDS}; repeat for more"
    )
    p.add_argument("--max_prompt_len", type=int, default=512, help="longer prompts are skipped")
    p.add_argument("--max_response_len", type=int, default=512, help="responses are cut to this")
    p.add_argument("--batch_size", type=int, default=8, help="pairs per forward pass")
    p.add_argument("--dpo_beta", type=float, default=0.1, help="a dpo: judge's beta if unrecorded")
    p.add_argument("--out", default=None, help="the JSON file to write")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    for flag in ("max_prompt_len", "max_response_len", "batch_size"):
        if getattr(a, flag) < 1:
            common.fail(f"--{flag} {getattr(a, flag)}: must be at least 1")
    if a.out and os.path.exists(a.out) and not a.overwrite:
        common.fail(f"--out {a.out} already exists; pass --overwrite to replace it")
    return a


def credit(chosen, rejected):
    """1 when chosen scores above rejected, 1/2 on a tie, else 0."""
    return 1.0 if chosen > rejected else 0.5 if chosen == rejected else 0.0


def pair_scores(judge, rows, examples, pad_id, batch_size):
    """[(chosen's score, rejected's score)] of every pair (rows as read, examples as tokenised), chosen and
    rejected scored in one batch of 2B."""
    out = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        batch = data.collate_pairs(examples[i : i + batch_size], pad_id)
        prompts = [r["prompt"] for r in chunk] * 2
        texts = [r["chosen"] for r in chunk] + [r["rejected"] for r in chunk]
        scores = judges.score(judge, batch, prompts, texts)  # (2B,): chosen, then rejected
        B = len(chunk)
        out += zip(scores[:B], scores[B:], strict=True)
    return out


def main(argv=None):
    a = parse(argv)
    tokenizer = data.load_tokenizer(a.tokenizer, "--tokenizer")
    rows = [r for r in data.load_rows(a.pairs) if "chosen" in r]
    if not rows:
        common.fail(f"--pairs {a.pairs}: holds no chosen/rejected pairs")
    # the pairs whose prompt fits, as the judges see them (data.fit_prompts notes how many were skipped)
    rows = [row for row, _ in data.fit_prompts(tokenizer, rows, a.max_prompt_len, key="prompt")]
    examples = data.encode_examples(tokenizer, rows, a.max_prompt_len, a.max_response_len)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = {"pairs": len(rows)}
    for spec in a.judge:
        judge = judges.parse(spec, a.pairs, "--judge")
        judge = judges.load(judge, tokenizer, device, a.dpo_beta, [r["prompt"] for r in rows])
        scores = pair_scores(judge, rows, examples, tokenizer.pad_token_id, a.batch_size)
        result[spec] = sum(credit(c, r) for c, r in scores) / len(scores)
        print(f"{spec}: accuracy {result[spec]:.3f} on {len(rows)} pairs", flush=True)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(a.out + ".tmp", a.out)
    return result


if __name__ == "__main__":
    main()
