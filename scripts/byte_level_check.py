"""Does DPO's fix (--nll_coef, RPO) hold on a second ground-truth task that goes through the real-data path?

    python scripts/byte_level_check.py --out results/byte_level_check          # ~7 min here

The built-in task's preference pairs are written to a local file, so every stage treats them as a user's dataset:
the byte-level tokenizer (each UTF-8 byte a token, no word list), and none of the built-in task's defaults. The
sizes the tiny model needs are given by hand, scaled from the built-in task's to bytes (a word is ~6 bytes).
1. <out>/pairs.jsonl: toy_task's training pairs, {prompt: messages, chosen, rejected}
2. sft.py on the chosen answers, then dpo.py from it three times: plain DPO (--nll_coef 0, the default for a
   dataset file) and RPO (--nll_coef 0.2, the built-in task's default, and 1)
3. each model answers the same held-out prompts (toy_task's test split, sampled at T = 1); the oracle judges the
   decoded text, and we count the answers that are not well-formed: a byte or marker outside the task's words.
Prints a table and writes <out>/summary.json. The task and its judge are the built-in task's, unchanged.
"""

import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import data  # noqa: E402
import speed  # noqa: E402
import toy_task  # noqa: E402

# the built-in task's sizes in bytes: its prompts are <= 24 words and answers <= 24 words of at most ~7 bytes
SIZES = ["--max_prompt_len", 192, "--max_response_len", 160]
SFT = ["--lr", 1e-3, "--epochs", 3, *SIZES]  # the built-in task's SFT defaults
DPO = ["--lr", 3e-4, "--epochs", 2, *SIZES]  # and its DPO defaults, but --nll_coef
MODELS = {
    "sft": None,
    "dpo (plain, --nll_coef 0)": 0.0,
    "dpo (RPO, --nll_coef 0.2)": 0.2,
    "dpo (RPO, --nll_coef 1)": 1.0,
}


def run(script, *args):
    cmd = [sys.executable, str(ROOT / script), *map(str, args), "--overwrite"]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


def well_formed(text):
    """Only the task's words, separated by single spaces, as the SFT data's answers are."""
    return text.split(" ") == text.split() and all(w in toy_task.VOCAB for w in text.split())


@torch.no_grad()
def judge(folder, prompts, seed, max_new_tokens):
    """Oracle reward of one sampled answer per prompt, and the share of answers that are well-formed."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    scores, formed, ended = [], [], []
    seeds = common.prompt_seeds(seed, "policy", len(prompts))
    for i in range(0, len(prompts), 50):
        chunk = prompts[i : i + 50]
        ids = [data.encode_prompt(tokenizer, p) for p in chunk]
        batch = speed.sample(model, tokenizer, ids, seeds[i : i + 50], max_new_tokens)
        texts = data.decode_responses(tokenizer, batch)
        scores += [toy_task.oracle_reward(p, t) for p, t in zip(chunk, texts, strict=True)]
        formed += [well_formed(t) for t in texts]
        ended += batch["ended"].tolist()
    mean = statistics.mean(scores)
    return {
        "oracle": mean,
        "ci95": 1.96 * statistics.stdev(scores) / math.sqrt(len(scores)),
        "well_formed": statistics.mean(formed),
        "eos_rate": statistics.mean(map(float, ended)),
        "example": texts[0],
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="results/byte_level_check")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_prompts", type=int, default=200)
    a = p.parse_args()
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    pairs = out / "pairs.jsonl"
    with open(pairs, "w") as f:
        for row in toy_task.preference_data("train", seed=a.seed):
            f.write(json.dumps(row) + "\n")
    task = ["--dataset", pairs, "--seed", a.seed]
    run("sft.py", *task, *SFT, "--output_dir", out / "sft")
    folders = {"sft": out / "sft"}
    for name, nll in MODELS.items():
        if nll is not None:
            folders[name] = out / f"dpo_nll{nll:g}"
            run(
                "dpo.py",
                *task,
                *DPO,
                "--nll_coef",
                nll,
                "--sft_ckpt",
                out / "sft",
                "--output_dir",
                folders[name],
            )
    prompts = toy_task.prompts("test", a.num_prompts, seed=a.seed)
    summary = {name: judge(f, prompts, a.seed, SIZES[-1]) for name, f in folders.items()}
    json.dump(summary, open(out / "summary.json", "w"), indent=1)
    print(f"\n{a.num_prompts} held-out prompts, seed {a.seed}, byte-level tokenizer:\n")
    print(
        "| model | oracle reward | well-formed answers | EOS rate | a sampled answer |\n|---|---|---|---|---|"
    )
    for name, r in summary.items():
        print(
            f"| {name} | {r['oracle']:.3f} ± {r['ci95']:.3f} | {r['well_formed']:.3f} | {r['eos_rate']:.3f} | "
            f"{r['example'][:60]!r} |"
        )


if __name__ == "__main__":
    main()
