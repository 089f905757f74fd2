"""Stage 4: Reinforced Token Optimisation — PPO on dense per-token rewards from a DPO model.

    accelerate launch rto.py --sft_ckpt runs/sft --dpo_ckpt runs/dpo [--rm_ckpt runs/rm] [--reward_mode ppo|dppo]

RTO (Zhong et al., "DPO Meets PPO", ICML 2025) models RLHF as a token-level MDP: a DPO model trained on the
preference pairs rewards every token, beta1 * (log pi_dpo - log pi_ref), and PPO optimises these dense rewards
(plus the KL penalty and, optionally, a reward model's score) instead of one at the last token. One iteration:
    1. rollout()        sample a response per prompt from pi_theta; cut each at its first EOS
    2. frozen_pass()    one no-grad pass of every model: old log-probs, pi_ref, pi_dpo, critic values V(s_h), r_MLE
    3. token_rewards()  the reward of every token — the only place where RTO, PPO and DPPO differ
    4. gae(), whiten()  advantages and returns; advantages whitened over the whole rollout batch (all processes)
    5. ppo_update()     ppo_epochs x mini-batches x micro-batches of the clipped policy and value losses

A rollout is a dict of tensors (B = rollout prompts on this process, P = prompt width, R = longest response):
    input_ids, attention_mask  (B, P+R)  prompts left-padded, responses right-padded
    response_mask              (B, R)    1 up to and including the first EOS; everything else is masked out
    ended                      (B,)      the response has an EOS (not cut by --max_new_tokens)
    logprobs, ref_logprobs     (B, R)    log pi_old (the sampling policy) and log pi_ref, both at --temperature T
    dpo_log_ratio              (B, R)    log pi_dpo - log pi_ref, both at T = 1                 [rto, dppo]
    rm_score                   (B,)      r_MLE(x, y), normalised and clamped                     [beta3 > 0]
    values                     (B, R)    V_old(s_h), the critic before the update
    rewards, advantages, returns (B, R)

Temperature T: tokens are drawn from softmax(logits / T) (then top-p). The PPO ratio and the KL penalty use
log-probs at T (the distribution that drew the tokens, and the equally tempered reference: KL 0 at the start).
The DPO token reward is a property of two models, not of sampling: T = 1, so it sums to DPO's implicit reward.

To fork an ablation, edit a function marked "edit here", or replace it from a script and call main()
(scripts/oracle_credit.py swaps rollout() and token_rewards() that way). Sections marked "plumbing" need no edit.
"""

import collections
import math
import time
from dataclasses import dataclass

import torch
from accelerate.utils import tqdm

import common
import data
import judges
import lora
import speed
import toy_task
import vllm_engine
from common import TOY, TOYS, arg


@dataclass
class Args(common.TrainArgs, common.LoraArgs, judges.EvalArgs):
    sft_ckpt: str = arg(None, "SFT checkpoint: initial policy and the frozen reference pi_ref")
    dpo_ckpt: str = arg(None, "DPO checkpoint (from the SFT model): the token rewards [rto, dppo]")
    rm_ckpt: str = arg(None, "sentence-level reward model; the critic starts from it when given")
    reward_mode: str = arg("rto", "rto | ppo | dppo: the per-token reward (docs/algorithm.md)")
    dataset: str = arg(TOY, "RL prompts: 'toy', a hub id or a file (prompt-only, or pairs)")
    output_dir: str = arg("runs/rto", "policy checkpoint folder (critic in <output_dir>/critic)")
    beta1: float = arg(0.05, "DPO token reward scale (authors' dpo_reward_scale; paper v1: 0.1)")
    dpo_reward_clip: float = arg(0.05, "clamp each DPO token reward to [-c, c] (0 = off)")
    beta2: float = arg(None, "KL coefficient, init_kl_coef")
    kl_target: float = arg(None, "adapt beta2 toward this KL per response (Ziegler); unset: fixed")
    kl_horizon: float = arg(10000, "horizon of the adaptive KL controller, in prompts (episodes)")
    beta3: float = arg(1.0, "reward-model score scale at the last token (0 = paper v1: no RM)")
    normalize_reward: bool = arg(True, "normalise r_MLE and its critic by the RM's mean and std")
    reward_clip: float = arg(10.0, "clamp the (normalised) reward-model score to [-c, c]")
    missing_eos_penalty: float = arg(0.0, "subtracted from the last reward if there is no EOS")
    gamma: float = arg(1.0, "discount")
    lam: float = arg(0.95, "GAE lambda")
    eps_clip: float = arg(0.2, "PPO ratio clip")
    value_clip: float = arg(0.2, "value clip around the old values")
    ppo_epochs: int = arg(2, "passes over each rollout batch (paper: 2)")
    rollout_batch_size: int = arg(None, "prompts per iteration, all processes")
    mini_batch_size: int = arg(None, "sequences per optimiser step, all processes")
    forward_batch_size: int = arg(None, "sequences per frozen_pass forward, per process, by length")
    generation_batch_size: int = arg(64, "hf: prompts per generate call, per process; vllm: all")
    max_prompt_len: int = arg(None, "longer prompts are skipped or fatal (--long_prompts)")
    max_new_tokens: int = arg(None, "response length limit (a response cut here has no EOS)")
    temperature: float = arg(1.0, "sampling temperature (module docstring: which log-probs use it)")
    top_p: float = arg(1.0, "nucleus sampling")
    packing: bool = arg(None, "frozen pass and update: a micro-batch's sequences in one row")
    generation_logprobs: bool = arg(False, "log pi_old from the sampling pass: one forward less")
    rollout_engine: str = arg("hf", "hf (transformers' generate) | vllm (vllm_engine.py)")
    vllm_gpu_memory_utilization: float = arg(0.3, "vllm: the engine's share of the GPU")
    vllm_sleep: bool = arg(False, "vllm, GPU only: free the engine's memory during the update")
    actor_lr: float = arg(None, "policy learning rate")
    critic_lr: float = arg(None, "critic learning rate")
    num_iterations: int = arg(None, "PPO iterations (default: one pass over the prompts)")
    num_episodes: int = arg(None, "or: total prompts to roll out (OpenRLHF counts passes)")
    save_every: int = arg(0, "models and resumable state every N iterations (0: models at the end)")
    sample_every: int = arg(10, "print (prompt, response, reward) every N iterations (0 = never)")


# flags defaulting to None in Args, by task: built-in, real models (docs/algorithm.md; beta2: authors'), toy-long
DEFAULTS = {
    "rollout_batch_size": common.Default(toy=64, real=256),
    "mini_batch_size": common.Default(toy=16, real=16),
    "forward_batch_size": common.Default(toy=64, real=8),
    "max_prompt_len": common.Default(toy=24, real=512),
    "max_new_tokens": common.Default(toy=24, real=512, toy_long=96),
    "beta2": common.Default(toy=0.1, real=0.01),
    "actor_lr": common.Default(toy=1e-4, real=5e-6),
    "critic_lr": common.Default(toy=3e-4, real=9e-6),
    "packing": common.Default(toy=False, real=True),
}  # real prompts vary in length: a third of a batch is padding


def validate(args):
    """The checks of rto.py's own flags (parse_args checked the shared ones): one line for the first bad one."""
    mode = args.reward_mode
    if mode not in ("rto", "ppo", "dppo"):
        common.fail(f"--reward_mode {mode}: expected rto, ppo or dppo")
    if not args.sft_ckpt:
        common.fail("--sft_ckpt is required: the SFT checkpoint (initial policy and reference)")
    if mode in ("rto", "dppo") and not args.dpo_ckpt:
        common.fail(f"--reward_mode {mode} needs --dpo_ckpt (the DPO model's token rewards)")
    if uses_reward_model(args) and not args.rm_ckpt:
        common.fail(f"--reward_mode {mode} with --beta3 {args.beta3} needs --rm_ckpt, or --beta3 0")
    if mode == "ppo" and args.beta3 <= 0:
        common.fail("--reward_mode ppo needs --beta3 > 0: its only task reward is the RM's")
    common.check_positive(args, "rollout_batch_size", "mini_batch_size", "forward_batch_size")
    common.check_positive(args, "generation_batch_size", "max_prompt_len", "max_new_tokens")
    common.check_positive(args, "ppo_epochs", "temperature", "top_p")
    common.check_between(args, "top_p", 0, 1)
    judges.check_flags(args)  # --eval_*, --keep_best; the judge spec parses
    vllm_engine.check(args)  # --rollout_engine: hf, or vllm installed and with good flags
    return args


def uses_reward_model(args):
    return args.reward_mode in ("rto", "ppo") and args.beta3 > 0


# ============================================================================ 1. rollout
@torch.no_grad()
def rollout(accelerator, policy, tokenizer, prompts, seeds, args):
    """One response per prompt, prompt i drawn with seed seeds[i] (its draw does not depend on its batch):
    speed.sample (transformers' generate), or with --rollout_engine vllm a vLLM engine's sampler."""
    model = accelerator.unwrap_model(policy)
    model.eval()
    ids = [data.encode_prompt(tokenizer, p) for p in prompts]
    width = max(map(len, ids))  # P: every prompt is left-padded to it
    # the vLLM engine, holding the policy's current weights; False for the hf engine
    engine = args.rollout_engine == "vllm" and vllm_engine.ready(accelerator, model, args)
    # hf: --generation_batch_size prompts per generate() call; vllm: every prompt in one call (the engine schedules
    # its own batches within its memory share, and with --vllm_sleep it sleeps once the call returns)
    size = len(ids) if engine else args.generation_batch_size
    chunks = []
    # FSDP2: one all-gather per rollout, then no collective per token
    with speed.gathered_weights(model, enabled=not engine):
        for i in range(0, len(ids), size):
            chunk = slice(i, i + size)
            if engine:
                batch = vllm_engine.generate(
                    engine, ids[chunk], seeds[chunk], width, tokenizer, args, accelerator.device
                )
            else:
                batch = speed.sample(
                    model,
                    tokenizer,
                    ids[chunk],
                    seeds[chunk],
                    args.max_new_tokens,
                    args.temperature,
                    args.top_p,
                    width,
                    args.generation_logprobs,
                )
            chunks.append(batch)
    model.train()
    return data.cat_batches(chunks, tokenizer.pad_token_id)


# ============================================================================ 2. frozen pass: log-probs and values
def plain_token_logprobs(model, batch, temperature=1.0, with_entropy=False):
    """log pi(a_h | s_h) of every response token at temperature T, (b, R), 0 on padding, in plain lines; and with
    with_entropy=True the entropy of each of those distributions (a statistic, no gradient)."""
    P, mask = batch["prompt_len"], batch["response_mask"]  # prompts left-padded to width P
    # (b, R, V): token P+h from P+h-1
    logits = speed.forward(model, batch).logits[:, P - 1 : -1].float() / temperature
    logprobs = logits.log_softmax(-1)  # (b, R, V)
    # (b, R): the response tokens' own
    taken = logprobs.gather(-1, batch["input_ids"][:, P:, None]).squeeze(-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1).detach()  # (b, R)
    return (taken * mask, entropy * mask) if with_entropy else taken * mask


def token_logprobs(model, batch, temperature=1.0, with_entropy=False):
    """plain_token_logprobs' numbers (tested equal, gradients too) a few rows at a time (speed.response_logprobs):
    the (b, R, V) logits, at V = 128,256 the largest tensor of a micro-step, never exist whole. Packing too."""
    return speed.response_logprobs(model, batch, temperature, with_entropy)


def critic_values(critic, batch, args):
    """V(s_h) of the state before response token h, (b, R), 0 on padding: the columns that predict the tokens. A
    critic started from the reward model (--rm_ckpt) speaks in normalised-reward units, as r_MLE does (authors')."""
    out = speed.head_outputs(critic, batch)[:, batch["prompt_len"] - 1 : -1]  # (b, R)
    if args.rm_ckpt and args.normalize_reward:
        # DDP wraps it; the RM's statistics are in its config
        config = getattr(critic, "module", critic).config
        out = (out - config.reward_mean) / config.reward_std
    return out * batch["response_mask"]


def rm_score(rm, batch, args):
    """r_MLE at the last real token (from the mask: right even when pad == EOS), normalised, clamped: (b,)."""
    score = speed.sequence_scores(rm, batch)  # (b,)
    if args.normalize_reward:
        score = (score - rm.config.reward_mean) / rm.config.reward_std
    return score.clamp(-args.reward_clip, args.reward_clip)


@torch.no_grad()
def frozen_pass(accelerator, batch, models, args):
    """Step 2, once per rollout, --forward_batch_size sequences of similar length (little padding) at a time."""
    mask = batch["response_mask"]  # (B, R); every output below is 0 after the first EOS
    out = {}
    for k in ("logprobs", "ref_logprobs", "values", "dpo_log_ratio"):  # (B, R)
        out[k] = batch.get(k, torch.zeros_like(mask))
    out["rm_score"] = torch.zeros_like(mask[:, 0])  # (B,)
    computed = 0  # the positions the forward passes run, padding or packed
    by_length = batch["attention_mask"].sum(-1).argsort()
    # --bf16: the frozen models compute as the prepared (trained) ones do
    with accelerator.autocast():
        for idx, micro in data.micro_batches(batch, args.forward_batch_size, by_length):
            width = micro["response_mask"].shape[1]
            if args.packing:
                micro = speed.pack(micro)
            computed += micro.get("packed", micro)["input_ids"].numel()
            if "logprobs" not in batch:  # else --generation_logprobs: the sampling pass gave them
                out["logprobs"][idx, :width] = token_logprobs(
                    models["policy"], micro, args.temperature
                )
            ref = token_logprobs(models["ref"], micro, args.temperature)
            out["ref_logprobs"][idx, :width] = ref
            if "critic" in models:  # evaluate's KL runs this pass without it
                out["values"][idx, :width] = critic_values(models["critic"], micro, args)
            if "dpo" in models:  # at T = 1 whatever --temperature (module docstring)
                if args.temperature != 1:
                    ref = token_logprobs(models["ref"], micro)
                out["dpo_log_ratio"][idx, :width] = token_logprobs(models["dpo"], micro) - ref
            if "rm" in models:
                out["rm_score"][idx] = rm_score(models["rm"], micro, args)
    speed.reshard(*(models[n] for n in ("ref", "dpo", "rm") if n in models))  # FSDP2: free them
    if "dpo" not in models:
        del out["dpo_log_ratio"]
    if "rm" not in models:
        del out["rm_score"]
    real = batch["attention_mask"].sum().item()
    totals = common.reduce(accelerator, [real, computed])  # (2,): over all processes
    return {**batch, **out, "padding_share": 1 - (totals[0] / totals[1]).item()}


# ============================================================================ 3. token rewards   <- edit here
def token_rewards(batch, args, beta2):
    """The reward of every response token, (B, R). This is the function to edit for a reward ablation:
        ppo :                          - beta2 * kl(h) + 1[h=H] * beta3 * r_MLE(x, y)
        dppo:                          - beta2 * kl(h) + 1[h=H] * beta1 * sum_h' dpo(h')
        rto : clip(beta1 * dpo(h))     - beta2 * kl(h) + 1[h=H] * beta3 * r_MLE(x, y)
    with dpo(h) = log pi_dpo(a_h|s_h) - log pi_ref(a_h|s_h) (batch['dpo_log_ratio']), kl(h) = log pi_old - log pi_ref
    of the sampling policy (the k1 estimator, no gradient), H the last real token (EOS included)."""
    mask = batch["response_mask"]
    H = mask.sum(-1).long() - 1  # (B,): the last real token
    last = torch.nn.functional.one_hot(H, mask.shape[1]).float()  # (B, R): 1 at h = H
    rewards = -beta2 * (batch["logprobs"] - batch["ref_logprobs"])
    if args.reward_mode == "rto":
        dense = args.beta1 * batch["dpo_log_ratio"]
        if args.dpo_reward_clip > 0:  # "do not let DPO token rewards dominate" (authors' code)
            dense = dense.clamp(-args.dpo_reward_clip, args.dpo_reward_clip)
        rewards = rewards + dense
    if args.reward_mode == "dppo":  # DPO's sentence-level implicit reward, paid at the end
        rewards = rewards + last * args.beta1 * batch["dpo_log_ratio"].sum(-1, keepdim=True)
    if uses_reward_model(args):
        rewards = rewards + last * args.beta3 * batch["rm_score"][:, None]
    if args.missing_eos_penalty:
        rewards = rewards - last * args.missing_eos_penalty * (~batch["ended"]).float()[:, None]
    return rewards * mask


# ============================================================================ 4. advantages
def gae(rewards, values, mask, gamma, lam):
    """GAE over (B, R): delta_h = r_h + gamma V(s_h+1) - V(s_h),  A_h = delta_h + gamma lam A_h+1,  returns = A + V."""
    values = values * mask
    advantages = torch.zeros_like(rewards)  # (B, R)
    next_value = torch.zeros_like(rewards[:, 0])  # (B,): V after the last token is 0
    next_adv = torch.zeros_like(rewards[:, 0])  # (B,): and so is A
    for h in reversed(range(rewards.shape[1])):
        delta = rewards[:, h] + gamma * next_value - values[:, h]
        next_adv = (delta + gamma * lam * next_adv) * mask[:, h]
        advantages[:, h] = next_adv
        next_value = values[:, h]
    returns = (advantages + values) * mask
    return advantages, returns


def whiten(accelerator, x, mask):
    """(x - mean) / std over the masked entries of all processes (unbiased variance, as torch.std); 0 elsewhere."""
    n = common.reduce(accelerator, mask.sum())
    mean = common.reduce(accelerator, (x * mask).sum()) / n
    var = common.reduce(accelerator, (((x - mean) * mask) ** 2).sum()) / (n - 1).clamp(min=1)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


# ============================================================================ 5. PPO update   <- edit here for a loss
def policy_loss(logprobs, old_logprobs, advantages, mask, eps):
    """Clipped surrogate; per-sequence token mean, then mean over sequences (authors' aggregation)."""
    ratio = torch.exp(logprobs - old_logprobs)  # (b, R)
    # (b, R)
    surrogate = torch.max(-ratio * advantages, -ratio.clamp(1 - eps, 1 + eps) * advantages)
    loss = common.masked_mean(surrogate, mask, -1).mean()
    token_stats = {
        "clip_frac": ((ratio - 1).abs() > eps).float(),
        "ratio": ratio,
        "approx_kl": (ratio - 1) - (logprobs - old_logprobs),  # k3 estimate of KL(old || new)
    }
    return loss, token_stats


def value_loss(values, old_values, returns, mask, clip):
    """0.5 * max of the clipped and unclipped squared errors; same aggregation as the policy loss."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    loss = 0.5 * torch.max((values - returns) ** 2, (clipped - returns) ** 2)  # (b, R)
    token_stats = {"value_clip_frac": ((values - old_values).abs() > clip).float()}
    return common.masked_mean(loss, mask, -1).mean(), token_stats


def ppo_update(accelerator, batch, models, optimizers, schedulers, args, sizes, it=0):
    """One optimiser step per mini-batch for actor and critic each; statistics: means over all tokens, all processes.

    How the loss adds up: a micro-batch's loss is the mean over its sequences of each sequence's token mean;
    accelerator.backward divides it by the micro-batches per step (sizes["accum"]), and DDP and FSDP2 average the
    gradients over the processes, so a step's gradient is that of the mean over the mini-batch's sequences."""
    policy = models["policy"]
    critic = models["critic"]
    # over tokens (over sequences for the losses), divided at the end
    sums = collections.defaultdict(float)
    for _epoch in range(args.ppo_epochs):
        order = torch.randperm(sizes["rollout"])  # same seed on every process
        for start in range(0, sizes["rollout"], sizes["mini"]):  # a mini-batch ...
            mini = order[start : start + sizes["mini"]]
            for _, micro in data.micro_batches(batch, sizes["micro"], mini):  # ... in micro-batches
                mask = micro["response_mask"]
                if args.packing:
                    micro = speed.pack(micro)
                with accelerator.accumulate(policy, critic):
                    logprobs, entropy = token_logprobs(
                        policy, micro, args.temperature, with_entropy=True
                    )
                    pg_loss, stats = policy_loss(
                        logprobs, micro["logprobs"], micro["advantages"], mask, args.eps_clip
                    )
                    values = critic_values(critic, micro, args)
                    v_loss, vstats = value_loss(
                        values, micro["values"], micro["returns"], mask, args.value_clip
                    )
                    where = f"iteration {it + 1}"
                    loss = pg_loss + v_loss
                    ok = common.optimizer_step(
                        accelerator, [policy, critic], loss, optimizers, schedulers, args, where
                    )
                    sums["skipped_nonfinite"] += not ok
                with torch.no_grad():
                    for k, v in {**stats, **vstats, "entropy": entropy, "tokens": 1}.items():
                        sums[k] += (v * mask).sum()
                    sums["sequences"] += len(mask)
                    sums["policy_loss"] += pg_loss * len(mask)
                    sums["value_loss"] += v_loss * len(mask)
                    # of the positions computed, padded or packed
                    sums["real"] += micro["attention_mask"].sum()
                    sums["positions"] += micro.get("packed", micro)["input_ids"].numel()
    totals = {k: common.reduce(accelerator, v).item() for k, v in sums.items()}
    out = {k: totals[k] / totals["tokens"] for k in stats.keys() | vstats.keys() | {"entropy"}}
    out |= {k: totals[k] / totals["sequences"] for k in ("policy_loss", "value_loss")}
    out["padding_share_update"] = 1 - totals["real"] / totals["positions"]
    out["skipped_nonfinite"] = totals["skipped_nonfinite"]
    return out


def update_kl_coef(beta2, kl_per_response, args, n_prompts):
    """Adaptive KL (Ziegler et al. 2019): beta2 *= 1 + clip(KL / target - 1, -0.2, 0.2) * n_prompts / horizon."""
    if args.kl_target is None:
        return beta2
    error = max(-0.2, min(0.2, kl_per_response / args.kl_target - 1))
    return beta2 * (1 + error * n_prompts / args.kl_horizon)


# ============================================================================ evaluation on held-out prompts
def evaluate(accelerator, models, tokenizer, evaluation, args, step, best):
    """judges.evaluate_policy with this run's sampler (rollout) and KL (frozen_pass): the eval row in
    metrics.jsonl, and with --keep_best the best policy so far in <output_dir>/best. Returns the best score."""

    def sample(prompts, seeds):
        return rollout(accelerator, models["policy"], tokenizer, prompts, seeds, args)

    # log pi - log pi_ref summed over each response, (b,), at --temperature as the rollouts' kl_per_response
    def kl(batch):
        out = frozen_pass(accelerator, batch, {k: models[k] for k in ("policy", "ref")}, args)
        return (out["logprobs"] - out["ref_logprobs"]).sum(-1)

    policy = models["policy"]
    return judges.evaluate_policy(
        accelerator, evaluation, tokenizer, sample, kl, policy, args, step, best
    )


# ============================================================================ plumbing: batches, models, logging
def load_models(args, accelerator):
    """Policy and critic (trained, with Adam), reference, DPO and reward model (frozen, only when used), each sharded
    or placed before the next loads. --lora_rank (docs/lora.md): two frozen bases, not five models: the reference is
    the policy's base, adapter off; a DPO adapter on it is a second adapter; the reward model is the critic's base."""
    tokenizer = data.load_tokenizer(args.sft_ckpt, "--sft_ckpt")
    for flag, path in (("--dpo_ckpt", args.dpo_ckpt), ("--rm_ckpt", args.rm_ckpt)):
        if path:
            data.same_vocab(path, tokenizer, flag, "--sft_ckpt")
    adapters = args.lora_rank > 0
    uses_dpo = args.reward_mode in ("rto", "dppo")
    # a frozen base needs no fp32 master
    dtype = torch.bfloat16 if adapters and args.bf16 else torch.float32
    weights = adapters or common.loads_weights(accelerator)
    models = {}
    optimizers = []
    dpo_shares = False
    critic_flag = "--rm_ckpt" if args.rm_ckpt else "--sft_ckpt"
    for name, lr, path, flag in (
        ("policy", args.actor_lr, args.sft_ckpt, "--sft_ckpt"),  # one per prepare() (FSDP2)
        ("critic", args.critic_lr, args.rm_ckpt or args.sft_ckpt, critic_flag),
    ):
        scorer = name == "critic"
        new_head = not args.rm_ckpt  # a critic without --rm_ckpt: a new value head
        model = common.load_model(
            path, tokenizer, flag, scorer=scorer, dtype=dtype, weights=weights, new_head=new_head
        )
        # whether --dpo_ckpt is an adapter on these weights: checked before adapters are added
        if name == "policy" and uses_dpo:
            dpo_shares = lora.adapter_on(
                accelerator, model, args.dpo_ckpt, "--dpo_ckpt", "--sft_ckpt"
            )
        if adapters:
            model = lora.add_adapter(common.cast(model, dtype), args, path, scorer=scorer)
        if name == "policy" and adapters and dpo_shares:
            lora.add_second_adapter(model, args.dpo_ckpt, "--dpo_ckpt", "dpo")
        optimizer = torch.optim.Adam(common.trainable(model), lr, betas=(0.9, 0.95), fused=True)
        models[name], optimizer = accelerator.prepare(model, optimizer)
        optimizers.append(optimizer)
    policy, critic = (accelerator.unwrap_model(models[n]) for n in ("policy", "critic"))
    reward_std = getattr(critic.config, "reward_std", None)  # what critic_values normalises with
    if args.rm_ckpt and args.normalize_reward and reward_std is None:
        common.fail(
            f"--rm_ckpt {args.rm_ckpt}: no reward_mean/reward_std in its config (train it with "
            "reward_model.py) — or pass --no_normalize_reward"
        )

    def load(path, flag, scorer=False):
        return common.load_frozen(accelerator, path, tokenizer, flag, args.bf16, scorer)

    # with adapters the frozen models are views of the trained models' bases (the critic starts from --rm_ckpt)
    views = lora.frozen_views(policy, critic, dpo_shares) if adapters else {}
    models["ref"] = views.get("ref") or load(args.sft_ckpt, "--sft_ckpt")
    if uses_dpo:
        models["dpo"] = views.get("dpo") or load(args.dpo_ckpt, "--dpo_ckpt")
    if uses_reward_model(args):
        models["rm"] = views.get("rm") or load(args.rm_ckpt, "--rm_ckpt", True)
    return tokenizer, models, optimizers


def batch_sizes(args, num_processes):
    """Local sizes from the global ones, checked to divide exactly."""
    for flag, n in (
        ("--rollout_batch_size", args.rollout_batch_size),
        ("--mini_batch_size", args.mini_batch_size),
    ):
        if n % num_processes:
            common.fail(f"{flag} {n} is not divisible by the {num_processes} processes")
    rollout, mini = args.rollout_batch_size // num_processes, args.mini_batch_size // num_processes
    if mini % (micro := args.micro_batch_size or mini) or rollout % mini:
        common.fail(
            f"--rollout_batch_size {args.rollout_batch_size}, --mini_batch_size {args.mini_batch_size} and "
            f"--micro_batch_size {micro} (per process) must each divide the one before"
        )
    return {"rollout": rollout, "mini": mini, "micro": micro, "accum": mini // micro}


def num_iterations(args, n_prompts):
    n = args.num_iterations or math.ceil((args.num_episodes or n_prompts) / args.rollout_batch_size)
    steps_per_iteration = args.ppo_epochs * args.rollout_batch_size // args.mini_batch_size
    return min(n, math.ceil(args.max_steps / steps_per_iteration)) if args.max_steps > 0 else n


def rollout_metrics(accelerator, batch, tokenizer, prompts, beta2, args):
    """What the iteration's rollout looked like (means over all processes); the oracle reward on the built-in task."""
    mask = batch["response_mask"]

    def mean(x):
        return common.reduce(accelerator, x.float().mean(), "mean").item()

    n_tokens = common.reduce(accelerator, mask.sum())

    def token_mean(x):
        return (common.reduce(accelerator, (x * mask).sum()) / n_tokens).item()

    kl = (batch["logprobs"] - batch["ref_logprobs"]) * mask
    residual = token_mean((batch["returns"] - batch["values"]) ** 2)
    spread = token_mean((batch["returns"] - token_mean(batch["returns"])) ** 2)
    metrics = {
        "reward_total": mean(batch["rewards"].sum(-1)),
        "kl_per_token": token_mean(kl),
        "kl_per_response": mean(kl.sum(-1)),
        "beta2": beta2,
        "response_length": mean(mask.sum(-1)),
        "eos_rate": mean(batch["ended"]),
        "value_mean": token_mean(batch["values"]),
        "padding_share": batch["padding_share"],
        "explained_variance": 1 - residual / max(spread, 1e-8),
    }
    if "rm_score" in batch:
        metrics["sentence_reward"] = mean(batch["rm_score"])
    if "dpo_log_ratio" in batch:
        metrics["dpo_reward_per_token"] = token_mean(args.beta1 * batch["dpo_log_ratio"])
        metrics["dpo_reward_per_response"] = mean(args.beta1 * batch["dpo_log_ratio"].sum(-1))
    if args.dataset in TOYS:
        texts = data.decode_responses(tokenizer, batch)
        scores = [toy_task.oracle_reward(p, t) for p, t in zip(prompts, texts, strict=True)]
        metrics["oracle_reward"] = mean(torch.tensor(scores))
    return metrics


def save(accelerator, models, tokenizer, args, iteration, beta2):
    """Policy (a causal-LM folder, or an adapter folder and with --merge_lora <dir>/merged), critic beside it, and
    resumable state, each written atomically."""
    for name, out in (("policy", args.output_dir), ("critic", f"{args.output_dir}/critic")):
        common.save_model(accelerator, models[name], tokenizer, out, merge_lora=args.merge_lora)
    # resumable state (both models' optimisers too) is large: only when asked for
    if args.save_every:
        common.save_state(accelerator, args, iteration, {"beta2": beta2})


def print_samples(accelerator, tokenizer, prompts, batch, n=3):
    """A few (reward, prompt, response) of the iteration, for a reader watching the run."""
    texts = data.decode_responses(tokenizer, batch)
    rewards = batch["rewards"].sum(-1)  # (B,)
    for p, text, reward in list(zip(prompts, texts, rewards, strict=True))[:n]:
        accelerator.print(f"  [{reward:+.3f}] {p[-1]['content'][:60]!r} -> {text[:100]!r}")


def phase_clock(accelerator):
    """clock(name) logs the seconds since the previous call (or since phase_clock), device work included, as
    time_<name>, and on GPUs the peak device memory in between as memory_<name>_gb; clock.metrics holds them."""
    device = accelerator.device
    metrics = {}
    began = [time.perf_counter()]  # when the phase began
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def clock(name):
        # kernels run asynchronously: the phase ends when its device work ends
        if device.type != "cpu":
            torch.accelerator.synchronize(device)
        metrics[f"time_{name}"] = time.perf_counter() - began[0]
        began[0] = time.perf_counter()
        if device.type == "cuda":
            metrics[f"memory_{name}_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
            torch.cuda.reset_peak_memory_stats(device)

    clock.metrics = metrics
    return clock


def main(argv=None):
    args = validate(common.parse_args(Args, argv, DEFAULTS))
    accelerator = common.setup(args)
    sizes = batch_sizes(args, accelerator.num_processes)
    accelerator.gradient_accumulation_steps = sizes["accum"]
    tokenizer, models, optimizers = load_models(args, accelerator)
    rows = data.load_prompts(args.dataset, args.dataset_split, args)
    fitted = data.fit_prompts(tokenizer, rows, args.max_prompt_len, args.long_prompts)
    prompts = [p for p, _ in fitted]
    if len(prompts) < args.rollout_batch_size:
        common.fail(
            f"--rollout_batch_size {args.rollout_batch_size} > the {len(prompts)} prompts: one would repeat"
        )
    evaluation = judges.held_out(accelerator, tokenizer, args)
    common.prepare_output_dir(args, accelerator, derived=sizes)
    n_iter = num_iterations(args, len(prompts))
    steps = n_iter * args.ppo_epochs * sizes["rollout"] // sizes["mini"]
    warmup = math.ceil(0.03 * steps)
    # authors': cosine to 0.1 x lr
    schedulers = [
        common.lr_schedule(accelerator, o, "cosine_with_min_lr", warmup, steps, min_lr_rate=0.1)
        for o in optimizers
    ]
    for name in ("policy", "critic") if args.gradient_checkpointing else ():
        accelerator.unwrap_model(models[name]).gradient_checkpointing_enable()
    state = common.load_state(accelerator, args) or {"step": 0, "beta2": args.beta2}
    start = state["step"]
    beta2 = state["beta2"]
    shuffle = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(prompts), generator=shuffle).tolist()  # one walk through the prompts
    best = judges.best_so_far(args)  # the eval_score kept in <output_dir>/best
    if evaluation and start == 0:
        best = evaluate(accelerator, models, tokenizer, evaluation, args, 0, best)
    bar = tqdm(total=n_iter, initial=start, desc=args.reward_mode)  # on the main process
    for it in range(start, n_iter):
        batch_prompts, seeds = data.iteration_prompts(
            prompts, order, it, args, accelerator.process_index, sizes["rollout"]
        )
        clock = phase_clock(accelerator)  # seconds (and on GPUs peak memory) of each phase
        batch = rollout(accelerator, models["policy"], tokenizer, batch_prompts, seeds, args)  # 1.
        clock("generate")
        batch = frozen_pass(accelerator, batch, models, args)  # 2.
        batch["rewards"] = token_rewards(batch, args, beta2)  # 3.
        # a broken DPO or reward-model checkpoint
        if not common.all_finite(accelerator, batch["rewards"]):
            common.nonfinite(args, "reward", f"iteration {it + 1}", optimizers)
            continue
        batch["advantages"], batch["returns"] = gae(
            batch["rewards"], batch["values"], batch["response_mask"], args.gamma, args.lam
        )
        batch["advantages"] = whiten(accelerator, batch["advantages"], batch["response_mask"])  # 4.
        clock("frozen_pass")
        train_stats = ppo_update(
            accelerator, batch, models, optimizers, schedulers, args, sizes, it
        )
        clock("update")
        metrics = {
            **rollout_metrics(accelerator, batch, tokenizer, batch_prompts, beta2, args),
            **train_stats,
            **clock.metrics,
        }
        beta2 = update_kl_coef(beta2, metrics["kl_per_response"], args, args.rollout_batch_size)
        common.log_metrics(accelerator, args.output_dir, metrics, it + 1)
        bar.update(1)
        if args.sample_every and (it + 1) % args.sample_every == 0:
            print_samples(accelerator, tokenizer, batch_prompts, batch)
        if evaluation and args.eval_every and (it + 1) % args.eval_every == 0 and it + 1 < n_iter:
            best = evaluate(accelerator, models, tokenizer, evaluation, args, it + 1, best)
        if args.save_every and (it + 1) % args.save_every == 0 and it + 1 < n_iter:
            save(accelerator, models, tokenizer, args, it + 1, beta2)
    save(accelerator, models, tokenizer, args, n_iter, beta2)
    if evaluation:
        evaluate(accelerator, models, tokenizer, evaluation, args, n_iter, best)
    accelerator.print(f"saved {args.output_dir}")
    common.finish(accelerator)


if __name__ == "__main__":
    main()
