"""How well does each reward signal track the built-in task's ground truth? The analysis behind
docs/results.md's "Why, as far as we can tell".

    python scripts/reward_signal.py --run results/reproduce/seed0                 # responses of the SFT model
    python scripts/reward_signal.py --run results/reproduce/seed0 --policy rto    # ... of the trained RTO policy

--run is a folder holding sft/, dpo/ and rm/ (scripts/reproduce.py writes one per seed). One response is sampled
from --policy for each held-out prompt; then, against the oracle (toy_task.py):

  sequence level  Pearson correlation with the oracle reward of the reward model's normalised score (what PPO
                  optimises), of the DPO implicit reward (the sum of the token rewards: what DPPO optimises) and of
                  the sum of the clipped token rewards (the dense part RTO adds to the reward model's score)
  token level     correlation of each token's DPO reward beta1 * (log pi_dpo - log pi_ref) with the oracle's credit
                  for that word, and the mean token reward per kind of word
  scale           the spread (std over responses) of each signal as it enters RTO's reward: how much of RTO's
                  return is the dense part

The oracle's credit per token is exact (toy_task.token_credit, 0 on EOS); it sums to oracle_reward.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import data  # noqa: E402
import speed  # noqa: E402
import toy_task  # noqa: E402

KINDS = [
    "on-topic, new",
    "on-topic, repeat",
    "other topic",
    "filler",
    "junk or unknown",
    'final "."',
    "EOS",
    '";" (toy-long)',
]


def token_credit(prompt, words):
    """The oracle's credit for each word (list of floats, summing to oracle_reward) and each word's kind; on
    toy-long a word is on topic if it belongs to its section's topic."""
    credit, long = toy_task.token_credit(prompt, words), toy_task.is_long(prompt)
    topics = toy_task.topics_of(prompt) if long else [toy_task.topic_of(prompt)]
    lists, word_topic = (
        (toy_task.LONG_TOPICS, toy_task.LONG_WORD_TOPIC)
        if long
        else (toy_task.TOPICS, toy_task.WORD_TOPIC)
    )
    kinds, seen, section = [], set(), 0
    for i, w in enumerate(words):
        if long and w == toy_task.SEP:
            kinds.append(KINDS[7])
            section += 1
        elif section < len(topics) and w in lists[topics[section]]:
            kinds.append(KINDS[1] if w in seen else KINDS[0])
        elif w in word_topic:
            kinds.append(KINDS[2])
        elif w in toy_task.FILLER:
            kinds.append(KINDS[3])
        elif w == toy_task.END and i == len(words) - 1:
            kinds.append(KINDS[5])
        else:
            kinds.append(KINDS[4])
        seen.add(w)
    return credit, kinds


def pearson(x, y):
    x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    return float(torch.corrcoef(torch.stack([x, y]))[0, 1])


@torch.no_grad()
def measure(run, policy_dir, n, beta1, clip, seed, task="toy", batch=100):
    tokenizer = data.load_tokenizer(str(run / "sft"))

    def load(d):
        return common.frozen(common.load_causal_lm(str(d), tokenizer))

    policy, ref, dpo = load(policy_dir), load(run / "sft"), load(run / "dpo")
    rm = common.frozen(common.load_scorer(str(run / "rm"), tokenizer, "--run"))
    prompts = toy_task.prompts("test", n, task=task)
    seeds = common.prompt_seeds(seed, "policy", n)
    max_new_tokens = 96 if task == common.TOY_LONG else 24  # rto.py's defaults
    seq = {"oracle": [], "rm": [], "dpo_sum": [], "dpo_clipped_sum": []}
    tok = {"credit": [], "reward": [], "kind": []}
    for i in range(0, n, batch):
        chunk = prompts[i : i + batch]
        ids = [data.encode_prompt(tokenizer, p) for p in chunk]
        b = speed.sample(policy, tokenizer, ids, seeds[i : i + batch], max_new_tokens)
        mask = b["response_mask"]  # (B, R)
        # (B, R) token rewards
        r = beta1 * (speed.response_logprobs(dpo, b) - speed.response_logprobs(ref, b))
        score = (
            speed.sequence_scores(rm, b) - rm.config.reward_mean
        ) / rm.config.reward_std  # (B,)
        for j, (p, text) in enumerate(zip(chunk, data.decode_responses(tokenizer, b), strict=True)):
            words, L = text.split(), int(mask[j].sum())
            credit, kinds = token_credit(p, words)
            # one token per word (+ EOS): true on the built-in task
            if len(words) != L - bool(b["ended"][j]):
                common.fail(
                    f"response {text!r} does not map one word to one token; this analysis needs the "
                    "built-in task's word-level tokenizer"
                )
            credit, kinds = credit + [0.0] * (L - len(words)), kinds + [KINDS[6]] * (L - len(words))
            seq["oracle"].append(toy_task.oracle_reward(p, text))
            seq["rm"].append(float(score[j]))
            seq["dpo_sum"].append(float(r[j, :L].sum()))
            seq["dpo_clipped_sum"].append(float(r[j, :L].clamp(-clip, clip).sum()))
            tok["credit"] += credit
            tok["reward"] += r[j, :L].tolist()
            tok["kind"] += kinds
    return seq, tok


def summarise(seq, tok, clip):
    rewards = torch.tensor(tok["reward"])
    by_kind = {}
    for k in KINDS:
        xs = [r for r, kk in zip(tok["reward"], tok["kind"], strict=True) if kk == k]
        by_kind[k] = {"tokens": len(xs), "mean_reward": sum(xs) / len(xs) if xs else float("nan")}

    def std(xs):
        return float(torch.tensor(xs).std())

    return {
        "responses": len(seq["oracle"]),
        "tokens": len(tok["reward"]),
        "oracle_mean": sum(seq["oracle"]) / len(seq["oracle"]),
        "corr_oracle_rm": pearson(seq["oracle"], seq["rm"]),
        "corr_oracle_dpo_sum": pearson(seq["oracle"], seq["dpo_sum"]),
        "corr_oracle_dpo_clipped_sum": pearson(seq["oracle"], seq["dpo_clipped_sum"]),
        "corr_token_reward_credit": pearson(tok["reward"], tok["credit"]),
        "corr_token_clipped_reward_credit": pearson(rewards.clamp(-clip, clip), tok["credit"]),
        "token_reward_mean_abs": float(rewards.abs().mean()),
        "token_reward_at_clip": float((rewards.abs() >= clip).float().mean()),
        "std_rm_score": std(seq["rm"]),
        "std_dpo_sum": std(seq["dpo_sum"]),
        "std_dpo_clipped_sum": std(seq["dpo_clipped_sum"]),
        "by_kind": by_kind,
    }


def report(s, beta1, clip):
    lines = [
        f"{s['responses']} responses, {s['tokens']} tokens, oracle mean {s['oracle_mean']:.3f}; "
        f"beta1 {beta1:g}, clip {clip:g}",
        "",
        "| signal | correlation with the oracle | std over responses |",
        "|---|---|---|",
        f"| reward-model score, normalised (PPO, RTO) | {s['corr_oracle_rm']:.3f} | {s['std_rm_score']:.3f} |",
        f"| DPO implicit reward = sum of token rewards (DPPO) | {s['corr_oracle_dpo_sum']:.3f} | "
        f"{s['std_dpo_sum']:.3f} |",
        f"| sum of clipped token rewards (RTO's dense part) | {s['corr_oracle_dpo_clipped_sum']:.3f} | "
        f"{s['std_dpo_clipped_sum']:.3f} |",
        "",
        f"token level: correlation of the token reward with the oracle's credit for the word "
        f"{s['corr_token_reward_credit']:.3f} (clipped: {s['corr_token_clipped_reward_credit']:.3f}); "
        f"mean |token reward| {s['token_reward_mean_abs']:.4f}; share at the clip {s['token_reward_at_clip']:.3f}",
        "",
        "| word | tokens | mean DPO token reward |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {v['tokens']} | {v['mean_reward']:+.4f} |" for k, v in s["by_kind"].items()]
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--run",
        required=True,
        help="folder with sft/, dpo/ and rm/ (a seed folder of reproduce.py)",
    )
    p.add_argument(
        "--policy", default="sft", help="folder under --run (or a path) whose responses are scored"
    )
    p.add_argument("--num_prompts", type=int, default=400)
    p.add_argument("--beta1", type=float, default=0.05, help="rto.py's --beta1")
    p.add_argument("--dpo_reward_clip", type=float, default=0.05, help="rto.py's --dpo_reward_clip")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--dataset", default=common.TOY, choices=common.TOYS, help="the built-in task of --run"
    )
    p.add_argument("--json", help="also write the numbers here")
    a = p.parse_args()
    run = Path(a.run)
    policy = run / a.policy if (run / a.policy).is_dir() else Path(a.policy)
    for d in (run / "sft", run / "dpo", run / "rm", policy):
        if not (d / "config.json").exists():
            common.fail(
                f"{d} is not a checkpoint folder; --run needs sft/, dpo/ and rm/ (as written by "
                "scripts/reproduce.py) and --policy a checkpoint"
            )
    seq, tok = measure(run, policy, a.num_prompts, a.beta1, a.dpo_reward_clip, a.seed, a.dataset)
    s = summarise(seq, tok, a.dpo_reward_clip)
    print(report(s, a.beta1, a.dpo_reward_clip))
    if a.json:
        Path(a.json).write_text(json.dumps(s, indent=1))


if __name__ == "__main__":
    main()
