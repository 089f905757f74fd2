"""Stage 4: Reinforced Token Optimisation — PPO on dense per-token rewards from a DPO model.

    accelerate launch rto.py --sft_ckpt <sft> --dpo_ckpt <dpo> [--rm_ckpt <rm>] --reward_mode rto|ppo|dppo
    python rto.py --sft_ckpt runs/sft --dpo_ckpt runs/dpo --rm_ckpt runs/rm          # the built-in task

RTO (Zhong et al., "DPO Meets PPO", ICML 2025) models RLHF as a token-level MDP. A DPO model trained on the
preference pairs is a token-level reward model: beta1 * (log pi_dpo - log pi_ref) at every token. PPO then
optimises those dense rewards (plus the KL penalty and, optionally, a sentence-level reward model) instead of
a single reward at the last token. One iteration:

    1. rollout()        sample responses from pi_theta; cut each at its first EOS
    2. score()          one no-grad pass of every model: old log-probs, pi_ref, pi_dpo, critic values, r_MLE
    3. token_rewards()  the reward of every token — the only place where RTO, PPO and DPPO differ
    4. gae()            advantages and returns; advantages whitened over the whole rollout batch
    5. ppo_update()     ppo_epochs x mini-batches x micro-batches of the clipped policy and value losses

A rollout is a dict of tensors (B = rollout prompts on this process, P = prompt width, R = longest response):

    input_ids, attention_mask  (B, P+R)  prompts left-padded, responses right-padded (common.py's layout)
    response_mask              (B, R)    1 up to and including the first EOS; everything else is masked out
    ended                      (B,)      the response has an EOS (not cut by --max_new_tokens)
    logprobs, ref_logprobs     (B, R)    log pi_old (the sampling policy) and log pi_ref of each response token
    dpo_rewards                (B, R)    beta1 * (log pi_dpo - log pi_ref)                     [rto, dppo]
    score                      (B,)      r_MLE(x, y), normalised and clamped                     [beta3 > 0]
    values                     (B, R)    V_old(s_h), the critic before the update
    rewards, advantages, returns (B, R)
"""

import math
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import common
import toy_task
from common import TOY, arg, masked_mean


@dataclass
class Args(common.TrainArgs):
    sft_ckpt: str = arg(None, "SFT checkpoint: initial policy and the frozen reference pi_ref")
    dpo_ckpt: str = arg(None, "DPO checkpoint (trained from the SFT model): the token-level reward [rto, dppo]")
    rm_ckpt: str = arg(None, "sentence-level reward model; the critic starts from it when given")
    reward_mode: str = arg("rto", "rto | ppo | dppo: which per-token reward (ALGORITHM.md, stage 4)")
    dataset: str = arg(TOY, "RL prompts: 'toy', a hub id or a file (prompt-only, or the prompts of pairs)")
    output_dir: str = arg("runs/rto", "policy checkpoint folder (critic in <output_dir>/critic)")
    beta1: float = arg(0.05, "scale of the DPO token reward (authors' dpo_reward_scale; paper v1: 0.1)")
    dpo_reward_clip: float = arg(0.05, "clamp each DPO token reward to [-c, c] (0 = off)")
    beta2: float = arg(None, "KL coefficient, init_kl_coef (authors: 0.01; built-in task: 0.1)")
    kl_target: float = arg(None, "adapt beta2 toward this KL per response (Ziegler et al.); fixed when unset")
    kl_horizon: float = arg(10000, "horizon of the adaptive KL controller, in episodes")
    beta3: float = arg(1.0, "scale of the reward-model score at the last token (0 = paper v1: no reward model)")
    normalize_reward: bool = arg(True, "normalise the reward model's score with the mean/std in its config")
    reward_clip: float = arg(10.0, "clamp the (normalised) reward-model score to [-c, c]")
    missing_eos_penalty: float = arg(0.0, "subtracted from the last-token reward of responses with no EOS")
    gamma: float = arg(1.0, "discount")
    lam: float = arg(0.95, "GAE lambda")
    eps_clip: float = arg(0.2, "PPO ratio clip")
    value_clip: float = arg(0.2, "value clip around the old values")
    ppo_epochs: int = arg(2, "passes over each rollout batch (paper: 2)")
    rollout_batch_size: int = arg(None, "prompts per iteration, all processes (paper: 256; built-in task: 64)")
    mini_batch_size: int = arg(None, "sequences per optimiser step, all processes (paper: 16; toy: 16)")
    generation_batch_size: int = arg(64, "prompts per generate call on each process (bounds KV-cache memory)")
    max_prompt_len: int = arg(None, "longer prompts are skipped or fatal (--long_prompts) (default 512; toy 24)")
    max_new_tokens: int = arg(None, "response length limit (default 512; 24 on the built-in task)")
    temperature: float = arg(1.0, "sampling temperature (log-probs are taken at the same temperature)")
    top_p: float = arg(1.0, "nucleus sampling")
    actor_lr: float = arg(None, "policy learning rate (paper: 5e-6; built-in task: 1e-4)")
    critic_lr: float = arg(None, "critic learning rate (authors: 9e-6; built-in task: 3e-4)")
    max_grad_norm: float = arg(1.0, "gradient clipping")
    num_iterations: int = arg(None, "PPO iterations (default: one pass over the prompts)")
    num_episodes: int = arg(None, "alternative to --num_iterations: total prompts to roll out")
    save_every: int = arg(0, "write policy, critic and resumable state every N iterations (0 = only at the end); "
                             "--resume continues from the newest (optimisers, beta2, RNG, iteration)")
    sample_every: int = arg(10, "print a small table of (prompt, response, reward) every N iterations (0 = never)")
    oracle_prompts: int = arg(200, "built-in task: held-out prompts for the oracle reward before and after")


def fill_defaults(args):
    toy = args.dataset == TOY
    args.rollout_batch_size = args.rollout_batch_size or (64 if toy else 256)
    args.mini_batch_size = args.mini_batch_size or 16
    args.max_prompt_len = args.max_prompt_len or (24 if toy else 512)
    args.max_new_tokens = args.max_new_tokens or (24 if toy else 512)
    args.actor_lr = args.actor_lr or (1e-4 if toy else 5e-6)
    args.critic_lr = args.critic_lr or (3e-4 if toy else 9e-6)
    args.beta2 = args.beta2 if args.beta2 is not None else (0.1 if toy else 0.01)
    if args.reward_mode not in ("rto", "ppo", "dppo"):
        common.fail(f"--reward_mode {args.reward_mode}: expected rto, ppo or dppo")
    if not args.sft_ckpt:
        common.fail("--sft_ckpt is required: the SFT checkpoint folder (initial policy and reference)")
    if args.reward_mode in ("rto", "dppo") and not args.dpo_ckpt:
        common.fail(f"--reward_mode {args.reward_mode} needs --dpo_ckpt (the DPO model gives its token rewards)")
    if uses_reward_model(args) and not args.rm_ckpt:
        common.fail(f"--reward_mode {args.reward_mode} with --beta3 {args.beta3} needs --rm_ckpt "
                    "(or pass --beta3 0 to run without a reward model)")
    if args.reward_mode == "ppo" and args.beta3 <= 0:
        common.fail("--reward_mode ppo needs --beta3 > 0: its only task reward is the reward model's")
    return args


def uses_reward_model(args):
    return args.reward_mode in ("rto", "ppo") and args.beta3 > 0


# ============================================================================ 1. rollout
@torch.no_grad()
def rollout(accelerator, policy, tokenizer, prompts, args):
    """Sample one response per prompt from the current policy, in chunks; cut at the first EOS."""
    policy = accelerator.unwrap_model(policy)
    policy.eval()
    ids = [common.encode_prompt(tokenizer, p) for p in prompts]
    width = max(map(len, ids))  # one prompt width for the whole rollout
    chunks = [common.sample(policy, tokenizer, ids[i:i + args.generation_batch_size], args.max_new_tokens,
                            args.temperature, args.top_p, synced_gpus=accelerator.num_processes > 1,
                            prompt_width=width)
              for i in range(0, len(ids), args.generation_batch_size)]
    policy.train()
    return common.cat_batches(chunks, tokenizer.pad_token_id)


# ============================================================================ 2. score
@torch.no_grad()
def score(ro, models, args, micro):
    """Every frozen number the update needs, computed once per rollout (never again in the PPO epochs)."""
    parts = []
    for mb in micro_batches(ro, micro):
        out = {"logprobs": common.response_logprobs(models["policy"], mb, args.temperature),
               "ref_logprobs": common.response_logprobs(models["ref"], mb, args.temperature),
               "values": common.token_values(models["critic"], mb)}
        if "dpo" in models:
            out["dpo_rewards"] = common.dpo_token_rewards(models["dpo"], out["ref_logprobs"], mb, args.beta1)
        if "rm" in models:
            out["score"] = reward_model_score(models["rm"], mb, args)
        parts.append(out)
    return {**ro, **{k: torch.cat([p[k] for p in parts]) for k in parts[0]}}


def reward_model_score(rm, batch, args):
    """r_MLE at the last real token, normalised with the mean/std measured after RM training, clamped: (B,)."""
    r = common.sequence_scores(rm, batch)
    if args.normalize_reward:
        r = (r - rm.config.reward_mean) / rm.config.reward_std
    return r.clamp(-args.reward_clip, args.reward_clip)


# ============================================================================ 3. token rewards
def token_rewards(ro, args, beta2):
    """The reward of every response token, (B, R). This is the function to edit for a reward ablation.

        ppo :                      - beta2 * lr_theta(h) + 1[h=H] * beta3 * r_MLE(x, y)
        dppo:                      - beta2 * lr_theta(h) + 1[h=H] * beta1 * sum_h' lr_dpo(h')
        rto : beta1 * lr_dpo(h)    - beta2 * lr_theta(h) + 1[h=H] * beta3 * r_MLE(x, y)

    with lr_M(h) = log M(a_h|s_h) - log pi_ref(a_h|s_h), lr_theta from the sampling policy (k1 estimator),
    H the last real token (EOS included). ro['dpo_rewards'] already holds beta1 * lr_dpo(h).
    """
    mask = ro["response_mask"]
    last = F.one_hot(mask.sum(-1).long() - 1, mask.shape[1]).float()  # (B, R): 1 at h = H
    rewards = -beta2 * (ro["logprobs"] - ro["ref_logprobs"])
    if args.reward_mode == "rto":
        dense = ro["dpo_rewards"]
        if args.dpo_reward_clip > 0:  # "do not let DPO token rewards dominate" (authors' code)
            dense = dense.clamp(-args.dpo_reward_clip, args.dpo_reward_clip)
        rewards = rewards + dense
    if args.reward_mode == "dppo":
        rewards = rewards + last * ro["dpo_rewards"].sum(-1, keepdim=True)
    if uses_reward_model(args):
        rewards = rewards + last * args.beta3 * ro["score"][:, None]
    if args.missing_eos_penalty:
        rewards = rewards - last * args.missing_eos_penalty * (~ro["ended"]).float()[:, None]
    return rewards * mask


# ============================================================================ 4. advantages
def gae(rewards, values, mask, gamma, lam):
    """Generalised advantage estimation over (B, R); V after the last real token is 0."""
    values = values * mask
    advantages = torch.zeros_like(rewards)
    next_value, next_adv = torch.zeros_like(rewards[:, 0]), torch.zeros_like(rewards[:, 0])
    for h in reversed(range(rewards.shape[1])):
        delta = rewards[:, h] + gamma * next_value - values[:, h]
        next_adv = (delta + gamma * lam * next_adv) * mask[:, h]
        next_value = values[:, h]
        advantages[:, h] = next_adv
    return advantages, (advantages + values) * mask


def whiten(accelerator, x, mask):
    """(x - mean) / std over the masked entries of the whole rollout batch, all processes together."""
    n = accelerator.reduce(mask.sum(), "sum")
    mean = accelerator.reduce((x * mask).sum(), "sum") / n
    var = accelerator.reduce((((x - mean) * mask) ** 2).sum(), "sum") / (n - 1).clamp(min=1)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


# ============================================================================ 5. PPO update
def policy_loss(logprobs, old_logprobs, advantages, mask, eps):
    """Clipped surrogate; per-sequence token mean, then mean over sequences (authors' aggregation)."""
    ratio = torch.exp(logprobs - old_logprobs)
    surrogate = torch.max(-ratio * advantages, -ratio.clamp(1 - eps, 1 + eps) * advantages)  # (B, R)
    stats = {"clip_frac": masked_mean(((ratio - 1).abs() > eps).float(), mask),
             "approx_kl": masked_mean((ratio - 1) - (logprobs - old_logprobs), mask),  # k3, old -> new
             "ratio": masked_mean(ratio, mask)}
    return masked_mean(surrogate, mask, -1).mean(), stats


def value_loss(values, old_values, returns, mask, clip):
    """0.5 * max of the clipped and unclipped squared errors; same aggregation as the policy loss."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    loss = 0.5 * torch.max((values - returns) ** 2, (clipped - returns) ** 2)
    stats = {"value_clip_frac": masked_mean(((values - old_values).abs() > clip).float(), mask)}
    return masked_mean(loss, mask, -1).mean(), stats


def micro_batches(ro, size, order=None):
    """Slices of a rollout (all its (B, ...) tensors) of `size` sequences, in `order` if given."""
    order = torch.arange(ro["input_ids"].shape[0]) if order is None else order
    for i in range(0, len(order), size):
        idx = order[i:i + size]
        yield {k: v[idx] if torch.is_tensor(v) else v for k, v in ro.items()}


def ppo_update(accelerator, ro, models, optimizers, schedulers, args, sizes, it=0):
    """ppo_epochs x (local rollout / local mini-batch) optimiser steps for both actor and critic."""
    policy, critic = models["policy"], models["critic"]
    stats = []
    for _ in range(args.ppo_epochs):
        order = torch.randperm(ro["input_ids"].shape[0])
        for mb in micro_batches(ro, sizes["micro"], order):  # `accumulate` steps once per local mini-batch
            with accelerator.accumulate(policy, critic):
                logits = common.response_logits(policy, mb, args.temperature)  # (b, R, V)
                logprobs = common.logprobs_of(logits, mb["input_ids"][:, mb["prompt_len"]:])
                pl, ps = policy_loss(logprobs, mb["logprobs"], mb["advantages"], mb["response_mask"], args.eps_clip)
                vl, vs = value_loss(common.token_values(critic, mb), mb["values"], mb["returns"],
                                    mb["response_mask"], args.value_clip)
                # separate models and optimisers: the sum only saves a backward call
                ok = common.optimizer_step(accelerator, [policy, critic], pl + vl, optimizers, schedulers, args, it)
            with torch.no_grad():
                entropy = masked_mean(-(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1), mb["response_mask"])
            stats.append({"policy_loss": pl.detach(), "value_loss": vl.detach(), "entropy": entropy,
                          "skipped_nonfinite": torch.tensor(float(not ok)), **ps, **vs})
    return {k: accelerator.reduce(torch.stack([s[k] for s in stats]).mean(), "mean").item() for k in stats[0]}


def update_kl_coef(beta2, kl_per_response, args, n_episodes):
    """Adaptive KL (Ziegler et al. 2019): move beta2 toward --kl_target; fixed when no target is set."""
    if args.kl_target is None:
        return beta2
    error = max(-0.2, min(0.2, kl_per_response / args.kl_target - 1))
    return beta2 * (1 + error * n_episodes / args.kl_horizon)


# ============================================================================ logging, set-up, checkpoints
def rollout_metrics(accelerator, ro, tokenizer, prompts, beta2, args):
    """What the iteration's rollout looked like; the oracle reward too on the built-in task."""
    mask = ro["response_mask"]
    mean = lambda x: accelerator.reduce(x.float().mean(), "mean").item()
    token_mean = lambda x: (accelerator.reduce((x * mask).sum(), "sum") /
                            accelerator.reduce(mask.sum(), "sum")).item()
    kl = (ro["logprobs"] - ro["ref_logprobs"]) * mask
    m = {"reward_total": mean(ro["rewards"].sum(-1)), "kl_per_token": token_mean(kl),
         "kl_per_response": mean(kl.sum(-1)), "beta2": beta2, "response_length": mean(mask.sum(-1)),
         "eos_rate": mean(ro["ended"]), "value_mean": token_mean(ro["values"]),
         "explained_variance": 1 - (token_mean((ro["returns"] - ro["values"]) ** 2) /
                                    max(token_mean((ro["returns"] - token_mean(ro["returns"])) ** 2), 1e-8))}
    if "score" in ro:
        m["sentence_reward"] = mean(ro["score"])
    if "dpo_rewards" in ro:
        m["dpo_reward_per_token"] = token_mean(ro["dpo_rewards"])
        m["dpo_reward_per_response"] = mean(ro["dpo_rewards"].sum(-1))
    if args.dataset == TOY:
        texts = common.decode_responses(tokenizer, ro)
        m["oracle_reward"] = mean(torch.tensor([toy_task.oracle_reward(p, t) for p, t in zip(prompts, texts)]))
    return m


def print_samples(accelerator, ro, tokenizer, prompts, n=3):
    texts = common.decode_responses(tokenizer, ro)
    for p, t, r in list(zip(prompts, texts, ro["rewards"].sum(-1).tolist()))[:n]:
        accelerator.print(f"  [{r:+.3f}] {p[-1]['content'][:60]!r} -> {t[:100]!r}")


def load_models(args, accelerator):
    """Policy and critic (trained); reference, DPO and reward model (frozen, loaded only when used)."""
    tokenizer = common.load_tokenizer(args.sft_ckpt, args.dataset, "--sft_ckpt")
    for flag, path in (("--dpo_ckpt", args.dpo_ckpt), ("--rm_ckpt", args.rm_ckpt)):
        if path and common.load_tokenizer(path, args.dataset, flag).get_vocab() != tokenizer.get_vocab():
            common.fail(f"{flag} {path}: its tokenizer differs from --sft_ckpt's; token rewards need one vocabulary")
    models = {"policy": common.load_causal_lm(args.sft_ckpt, tokenizer, "--sft_ckpt"),
              "critic": common.load_scorer(args.rm_ckpt or args.sft_ckpt, tokenizer, "--rm_ckpt or --sft_ckpt"),
              "ref": common.frozen(common.load_causal_lm(args.sft_ckpt, tokenizer, "--sft_ckpt"))}
    if args.reward_mode in ("rto", "dppo"):
        models["dpo"] = common.frozen(common.load_causal_lm(args.dpo_ckpt, tokenizer, "--dpo_ckpt"))
    if uses_reward_model(args):
        models["rm"] = common.frozen(common.load_scorer(args.rm_ckpt, tokenizer, "--rm_ckpt"))
        if args.normalize_reward and getattr(models["rm"].config, "reward_std", None) is None:
            common.fail(f"--rm_ckpt {args.rm_ckpt}: no reward_mean/reward_std in its config (train it with "
                        "reward_model.py) — or pass --no_normalize_reward")
    for name in ("ref", "dpo", "rm"):
        if name in models:
            models[name] = common.place_frozen(accelerator, models[name])
    return tokenizer, models


def batch_sizes(args, num_processes):
    """Local sizes from the global ones, checked to divide exactly."""
    for flag, n in (("--rollout_batch_size", args.rollout_batch_size), ("--mini_batch_size", args.mini_batch_size)):
        if n % num_processes:
            common.fail(f"{flag} {n} is not divisible by the {num_processes} processes")
    rollout, mini = args.rollout_batch_size // num_processes, args.mini_batch_size // num_processes
    micro = args.micro_batch_size or mini
    if rollout % mini or mini % micro:
        common.fail(f"--rollout_batch_size {args.rollout_batch_size}, --mini_batch_size {args.mini_batch_size} and "
                    f"--micro_batch_size {micro} (per process) must each divide the one before")
    return {"rollout": rollout, "mini": mini, "micro": micro, "accum": mini // micro}


def num_iterations(args, n_prompts):
    n = args.num_iterations or math.ceil((args.num_episodes or n_prompts) / args.rollout_batch_size)
    steps_per_iteration = args.ppo_epochs * args.rollout_batch_size // args.mini_batch_size
    return min(n, math.ceil(args.max_steps / steps_per_iteration)) if args.max_steps > 0 else n


def save(accelerator, models, tokenizer, args, iteration, beta2):
    """Policy (a causal-LM folder), critic beside it, and resumable state, each written atomically."""
    common.save_model(accelerator, models["policy"], tokenizer, args.output_dir)
    common.save_model(accelerator, models["critic"], tokenizer, os.path.join(args.output_dir, "critic"))
    if args.save_every:  # resumable state (both models' optimisers too) is large: only when asked for
        common.save_state(accelerator, args, iteration, {"beta2": beta2})


def main(argv=None):
    args = fill_defaults(common.parse_args(Args, argv))
    accelerator = common.setup(args)
    sizes = batch_sizes(args, accelerator.num_processes)
    accelerator.gradient_accumulation_steps = sizes["accum"]
    tokenizer, models = load_models(args, accelerator)
    prompts = common.load_prompts(args.dataset, args.dataset_split, args)
    keep = [len(common.encode_prompt(tokenizer, p)) <= args.max_prompt_len for p in prompts]
    if not all(keep) and args.long_prompts == "fail":
        common.fail(f"{keep.count(False)} prompts exceed --max_prompt_len {args.max_prompt_len}")
    prompts = [p for p, k in zip(prompts, keep) if k] or common.fail("no prompt fits --max_prompt_len")
    common.prepare_output_dir(args, accelerator)
    n_iter = num_iterations(args, len(prompts))

    steps = n_iter * args.ppo_epochs * sizes["rollout"] // sizes["mini"]
    optimizers = [torch.optim.Adam(models[m].parameters(), lr=lr, betas=(0.9, 0.95))
                  for m, lr in (("policy", args.actor_lr), ("critic", args.critic_lr))]
    for i, name in enumerate(("policy", "critic")):  # one model per prepare() call, as FSDP2 requires
        models[name], optimizers[i] = accelerator.prepare(models[name], optimizers[i])
    schedulers = [common.lr_schedule(accelerator, o, "cosine_with_min_lr", math.ceil(0.03 * steps), steps,
                                     min_lr_rate=0.1) for o in optimizers]  # authors': cosine to 0.1 x lr
    if args.gradient_checkpointing:
        for m in ("policy", "critic"):
            accelerator.unwrap_model(models[m]).gradient_checkpointing_enable()
    state = common.load_state(accelerator, args) or {"step": 0, "beta2": args.beta2}
    start, beta2 = state["step"], state["beta2"]
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(args.seed)).tolist()
    oracle = lambda: common.oracle_score(accelerator, models["policy"], tokenizer,
                                         toy_task.prompts("test", args.oracle_prompts, seed=args.seed),
                                         args.max_new_tokens, seed=args.seed) if args.dataset == TOY else None
    if start == 0 and args.dataset == TOY:
        common.log_metrics(accelerator, args.output_dir, {"phase": "before", "oracle_reward_test": oracle()}, 0)

    bar = common.progress(accelerator, n_iter, args.reward_mode, start)
    for it in range(start, n_iter):
        first = (it * args.rollout_batch_size + accelerator.process_index * sizes["rollout"]) % len(prompts)
        batch_prompts = [prompts[order[(first + i) % len(prompts)]] for i in range(sizes["rollout"])]
        t0 = time.perf_counter()
        ro = rollout(accelerator, models["policy"], tokenizer, batch_prompts, args)  # 1.
        t1 = time.perf_counter()
        ro = score(ro, models, args, sizes["micro"])  # 2.
        ro["rewards"] = token_rewards(ro, args, beta2)  # 3.
        if not common.all_finite(accelerator, ro["rewards"]):  # a broken DPO or reward-model checkpoint
            common.nonfinite(args, "reward", it, optimizers)
            continue
        ro["advantages"], ro["returns"] = gae(ro["rewards"], ro["values"], ro["response_mask"], args.gamma, args.lam)
        ro["advantages"] = whiten(accelerator, ro["advantages"], ro["response_mask"])  # 4.
        t2 = time.perf_counter()
        train_stats = ppo_update(accelerator, ro, models, optimizers, schedulers, args, sizes, it)  # 5.
        t3 = time.perf_counter()

        metrics = {**rollout_metrics(accelerator, ro, tokenizer, batch_prompts, beta2, args), **train_stats,
                   "time_generate": t1 - t0, "time_score": t2 - t1, "time_update": t3 - t2}
        beta2 = update_kl_coef(beta2, metrics["kl_per_response"], args, args.rollout_batch_size)
        common.log_metrics(accelerator, args.output_dir, metrics, it + 1)
        bar.update(1)
        bar.set_postfix({k: f"{metrics[k]:.3f}" for k in ("oracle_reward", "sentence_reward", "dpo_reward_per_response",
                                                          "kl_per_token") if k in metrics})
        if args.sample_every and (it + 1) % args.sample_every == 0:
            print_samples(accelerator, ro, tokenizer, batch_prompts)
        if args.save_every and (it + 1) % args.save_every == 0 and it + 1 < n_iter:
            save(accelerator, models, tokenizer, args, it + 1, beta2)

    save(accelerator, models, tokenizer, args, n_iter, beta2)
    if args.dataset == TOY:
        after = oracle()
        common.log_metrics(accelerator, args.output_dir, {"phase": "after", "oracle_reward_test": after}, n_iter)
        accelerator.print(f"oracle reward on held-out prompts after RL: {after:.3f}")
    accelerator.print(f"saved {args.output_dir}")
    common.finish(accelerator)


if __name__ == "__main__":
    main()
