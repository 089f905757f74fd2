"""Control experiment: does dense credit help PPO on the built-in task when the credit is *right*?

    python scripts/oracle_credit.py --credit dense  --sft_ckpt runs/sft --rm_ckpt runs/rm --output_dir runs/oracle_dense
    python scripts/oracle_credit.py --credit sparse --sft_ckpt runs/sft --rm_ckpt runs/rm \
        --output_dir runs/oracle_sparse

RTO's premise is that a per-token reward assigns credit better than one reward at the last token. On the built-in
task the true per-token credit is known (toy_task.token_credit), so the premise can be tested apart from the
quality of the DPO model's token rewards:

    dense : - beta2 * lr_theta(h) + credit(h)                   the oracle's credit at each token (RTO's shape)
    sparse: - beta2 * lr_theta(h) + 1[h=H] * sum_h' credit(h')  the same total at the last token (PPO's shape)

Both return the oracle reward, so they differ only in where it is paid. Every other flag is rto.py's. This is
also the worked example of forking an ablation: rto.py runs unchanged except for two of its functions, rollout()
(which here also records each token's credit) and token_rewards().
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import rto  # noqa: E402
import toy_task  # noqa: E402

rollout_as_in_rto = rto.rollout


def rollout(accelerator, policy, tokenizer, prompts, seeds, args):
    """rto.rollout, plus ro['credit'] (B, R): the oracle's credit for each response token (0 on EOS, padding)."""
    ro = rollout_as_in_rto(accelerator, policy, tokenizer, prompts, seeds, args)
    P, mask = ro["prompt_len"], ro["response_mask"]
    credit = torch.zeros_like(mask)
    for i, (p, ids, m) in enumerate(zip(prompts, ro["input_ids"][:, P:], mask, strict=True)):
        # one word per token on this task
        tokens = tokenizer.convert_ids_to_tokens(ids[m.bool()].tolist())
        words = tokens[:-1] if ro["ended"][i] else tokens
        credit[i, : len(words)] = torch.tensor(toy_task.token_credit(p, words))
    ro["credit"] = credit
    return ro


def token_rewards(ro, args, beta2):
    """The KL penalty plus the oracle's credit, per token (dense) or summed at the last token (sparse)."""
    mask = ro["response_mask"]
    last = F.one_hot(mask.sum(-1).long() - 1, mask.shape[1]).float()  # (B, R): 1 at h = H
    rewards = -beta2 * (ro["logprobs"] - ro["ref_logprobs"])
    if CREDIT == "dense":
        rewards = rewards + ro["credit"]
    else:
        rewards = rewards + last * ro["credit"].sum(-1, keepdim=True)
    return rewards * mask


def main(argv):
    global CREDIT
    if "--credit" not in argv or argv[argv.index("--credit") + 1 :][:1] not in (
        ["dense"],
        ["sparse"],
    ):
        common.fail(
            "--credit dense|sparse is required (where the oracle's reward is paid); other flags are rto.py's"
        )
    i = argv.index("--credit")
    CREDIT, argv = argv[i + 1], argv[:i] + argv[i + 2 :]
    if "--dataset" in argv and argv[argv.index("--dataset") + 1] not in common.TOYS:
        common.fail(
            "--dataset: the oracle's credit exists only on the built-in tasks ('toy', 'toy-long')"
        )
    rto.rollout, rto.token_rewards = rollout, token_rewards
    # --reward_mode ppo: rto.py then loads no DPO model; the reward model only initialises the critic (as in PPO)
    rto.main(["--reward_mode", "ppo", *argv])


CREDIT = None

if __name__ == "__main__":
    main(sys.argv[1:])
