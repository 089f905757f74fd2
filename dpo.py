"""Stage 2: Direct Preference Optimisation, from the SFT model, with the SFT model as the reference.

    L = -log sigmoid( beta * [ (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x)) ] )

with sequence log-probs summed over response tokens only (docs/algorithm.md, stage 2).

    python dpo.py --sft_ckpt runs/sft
    accelerate launch dpo.py --sft_ckpt <sft> --dataset Anthropic/hh-rlhf

The result matters to RTO as a *token-level* reward model: beta * (log pi_dpo - log pi_ref) at every token
(rto.py's frozen_pass and token_rewards), whose sum over a response is the implicit reward trained here.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate.utils import tqdm
from torch.utils.data import DataLoader

import common
import data
import lora
import speed
from common import TOY, Default, arg

# flag: its value on the built-in task, with real models (the paper), on toy-long; these flags default to None in Args
DEFAULTS = {
    "lr": Default(toy=3e-4, real=5e-6),
    # built-in task: plain DPO's sampled policy collapses (docs/results.md); the paper: plain DPO
    "nll_coef": Default(toy=0.2, real=0.0),
    "epochs": Default(toy=2, real=1),
    "max_prompt_len": Default(toy=24, real=512),
    "max_response_len": Default(toy=24, real=512, toy_long=96),
}


@dataclass
class Args(common.OfflineTrainArgs, common.LoraArgs):
    sft_ckpt: str = arg(
        None, "SFT checkpoint folder: the policy to train and, frozen, the reference"
    )
    dataset: str = arg(
        TOY,
        "'toy' or 'toy-long' (built-in tasks' pairs), a hub id, or a local json/jsonl/parquet file of pairs",
    )
    output_dir: str = arg("runs/dpo", "checkpoint folder to write")
    beta: float = arg(0.1, "DPO beta (paper: 0.1)")
    nll_coef: float = arg(
        None,
        "RPO (Pang et al. 2024): add this x the chosen response's mean token NLL, so that "
        "chosen responses stay likely (OpenRLHF: --nll_loss_coef; 0 = plain DPO, the paper)",
    )
    lr: float = arg(None, "AdamW learning rate")
    batch_size: int = arg(32, "pairs per optimiser step, over all processes (paper: 32)")
    epochs: int = arg(None, "passes over the pairs")
    warmup_ratio: float = arg(0.1, "fraction of steps of linear warm-up, then linear decay to 0")
    max_prompt_len: int = arg(
        None, "prompt tokens; longer prompts are skipped or fatal (--long_prompts)"
    )
    max_response_len: int = arg(None, "response tokens, EOS included; longer ones are cut")
    ref_logprobs: str = arg(
        "precompute",
        "precompute: one pass of the reference before training, then free it; "
        "live: keep the reference model and run it every step",
    )


def validate(args):
    """Every bad value fails here, with one line, before anything is loaded or written."""
    if not args.sft_ckpt:
        common.fail("--sft_ckpt is required: the SFT checkpoint folder written by sft.py")
    if args.ref_logprobs not in ("precompute", "live"):
        common.fail(f"--ref_logprobs {args.ref_logprobs}: expected precompute or live")
    common.check_positive(args, "lr", "beta")
    common.check_at_least(args, 0, "nll_coef")
    common.check_at_least(args, 1, "batch_size", "epochs", "max_prompt_len", "max_response_len")
    common.check_between(args, "warmup_ratio", 0, 1)
    return args


def pair_collate(pad_id):
    """data.collate_pairs, plus the precomputed reference log-probs when there are some: (2B,)."""

    def collate(exs):
        batch = data.collate_pairs(exs, pad_id)
        if "ref_chosen" in exs[0]:
            batch["ref"] = torch.tensor(
                [e["ref_chosen"] for e in exs] + [e["ref_rejected"] for e in exs]
            )
        return batch

    return collate


def sequence_logprobs(model, batch):
    """log pi(y|x) summed over response tokens: (2B,)."""
    return speed.response_logprobs(model, batch).sum(-1)


@torch.no_grad()
def precompute_reference(accelerator, ref, examples, micro, pad_id):
    """One pass of the frozen reference over every pair; stores its sequence log-probs in the examples."""
    loader = accelerator.prepare_data_loader(
        DataLoader(examples, micro, collate_fn=pair_collate(pad_id))
    )
    out = []
    for batch in tqdm(loader, desc="reference log-probs", dynamic_ncols=True, leave=False):
        lp = sequence_logprobs(ref, batch)  # (2B,)
        B = lp.shape[0] // 2
        # (B, 2) in data order
        out.append(common.gather(accelerator, torch.stack([lp[:B], lp[B:]], 1)))
    out = torch.cat(out).tolist()
    return [
        {**e, "ref_chosen": c, "ref_rejected": r} for e, (c, r) in zip(examples, out, strict=True)
    ]


def dpo_loss(policy_logps, ref_logps, beta):
    """Sigmoid DPO loss on (2B,) sequence log-probs; also the implicit rewards beta*(log pi - log pi_ref)."""
    rewards = beta * (policy_logps - ref_logps)  # (2B,)
    B = rewards.shape[0] // 2
    chosen, rejected = rewards[:B], rewards[B:]
    loss = -F.logsigmoid(chosen - rejected).mean()
    return loss, chosen.detach(), rejected.detach()


def step_metrics(loss, chosen, rejected):
    return {
        "loss": loss.item(),
        "accuracy": (chosen > rejected).float().mean().item(),
        "chosen_reward": chosen.mean().item(),
        "rejected_reward": rejected.mean().item(),
        "margin": (chosen - rejected).mean().item(),
    }


def batch_loss(model, ref, batch, beta, nll_coef=0.0):
    logps = sequence_logprobs(model, batch)  # (2B,): chosen, then rejected
    ref_logps = batch["ref"] if "ref" in batch else sequence_logprobs(ref, batch)
    loss, chosen, rejected = dpo_loss(logps, ref_logps, beta)
    if nll_coef:  # RPO: - log pi(y_w|x) / |y_w|, mean over the pairs
        B = logps.shape[0] // 2
        loss = loss + nll_coef * (-logps[:B] / batch["response_mask"][:B].sum(-1)).mean()
    return loss, chosen, rejected


@torch.no_grad()
def evaluate(accelerator, model, ref, loader, beta):
    """Held-out loss, implicit-reward accuracy, mean rewards and margin over all pairs of all processes."""
    model.eval()
    parts = []
    for batch in loader:
        loss, c, r = batch_loss(model, ref, batch, beta)
        parts.append(common.gather(accelerator, torch.stack([c, r], 1)))
    model.train()
    cr = torch.cat(parts)  # (N, 2)
    c, r = cr[:, 0], cr[:, 1]
    return {f"eval_{k}": v for k, v in step_metrics(-F.logsigmoid(c - r).mean(), c, r).items()}


def main(argv=None):
    args = validate(common.parse_args(Args, argv, DEFAULTS))
    accelerator = common.setup(args)
    micro, accum = common.batch_plan(accelerator, args.batch_size, args.micro_batch_size)
    tokenizer = data.load_tokenizer(args.sft_ckpt, "--sft_ckpt")
    # an adapter on the frozen SFT model (bf16 under --bf16); the reference: the adapter off
    if args.lora_rank:
        dtype = torch.bfloat16 if args.bf16 else torch.float32
        model = common.load_causal_lm(args.sft_ckpt, tokenizer, "--sft_ckpt", dtype=dtype)
        model = lora.add_adapter(common.cast(model, dtype), args, args.sft_ckpt).to(
            accelerator.device
        )
        ref = lora.AdapterView(model, None)
    else:
        model = common.load_causal_lm(
            args.sft_ckpt, tokenizer, "--sft_ckpt", weights=common.loads_weights(accelerator)
        )
        # bf16 under --bf16
        ref = common.load_frozen(accelerator, args.sft_ckpt, tokenizer, "--sft_ckpt", args.bf16)
    train, held = data.load_pairs(args.dataset, args, args.eval_fraction)

    def enc(rows):
        return data.encode_examples(
            tokenizer, rows, args.max_prompt_len, args.max_response_len, args.long_prompts
        )

    train, held = enc(train), enc(held)
    common.prepare_output_dir(
        args,
        accelerator,
        {
            "processes": accelerator.num_processes,
            "micro_batch_size": micro,
            "gradient_accumulation_steps": accum,
            "train_pairs": len(train),
            "heldout_pairs": len(held),
        },
    )
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()

    pad = tokenizer.pad_token_id
    if args.ref_logprobs == "precompute":  # the reference is used once and freed
        train = precompute_reference(accelerator, ref, train, micro, pad)
        held = precompute_reference(accelerator, ref, held, micro, pad)
        ref = None
    train_loader = DataLoader(train, micro, shuffle=True, collate_fn=pair_collate(pad))
    held_loader = DataLoader(held, micro, collate_fn=pair_collate(pad))
    optimizer = torch.optim.AdamW(common.trainable(model), lr=args.lr, fused=True)
    model, optimizer, train_loader, held_loader = accelerator.prepare(
        model, optimizer, train_loader, held_loader
    )
    # per-process batches
    steps = common.total_steps(len(train_loader), accum, args.epochs, args.max_steps)
    scheduler = common.lr_schedule(
        accelerator, optimizer, "linear", int(args.warmup_ratio * steps), steps
    )

    step = (common.load_state(accelerator, args) or {"step": 0})["step"]
    if step == 0:
        common.log_metrics(
            accelerator,
            args.output_dir,
            evaluate(accelerator, model, ref, held_loader, args.beta),
            0,
        )
    bar = tqdm(total=steps, initial=step, desc="dpo", dynamic_ncols=True)  # on the main process
    skipped = 0
    window = []
    for batch in common.train_batches(accelerator, train_loader, args.epochs, step, accum):
        with accelerator.accumulate(model):
            loss, chosen, rejected = batch_loss(model, ref, batch, args.beta, args.nll_coef)
            skipped += not common.optimizer_step(
                accelerator, [model], loss, [optimizer], [scheduler], args, f"step {step + 1}"
            )
        window.append(step_metrics(loss.detach(), chosen, rejected))
        if not accelerator.sync_gradients:
            continue
        step += 1
        bar.update(1)
        metrics = {
            k: common.reduce(
                accelerator, torch.tensor([w[k] for w in window]).mean(), "mean"
            ).item()
            for k in window[0]
        }  # the step's means
        window = []
        if step % args.eval_steps == 0 or step == steps:
            metrics.update(evaluate(accelerator, model, ref, held_loader, args.beta))
        if step % args.logging_steps == 0 or "eval_loss" in metrics:
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['accuracy']:.2f}")
            common.log_metrics(
                accelerator, args.output_dir, {**metrics, "skipped_nonfinite": skipped}, step
            )
        if args.save_every and step % args.save_every == 0 and step < steps:
            common.save_state(accelerator, args, step)
        if step >= steps:
            break

    final = evaluate(accelerator, model, ref, held_loader, args.beta)
    common.save_model(
        accelerator, model, tokenizer, args.output_dir, {"dpo_beta": args.beta}, args.merge_lora
    )
    accelerator.print(" | ".join(f"{k}: {v:.3f}" for k, v in final.items()))
    accelerator.print(f"saved {args.output_dir}")
    common.finish(accelerator)


if __name__ == "__main__":
    main()
