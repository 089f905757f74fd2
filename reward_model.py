"""Stage 3: a sentence-level reward model, trained with the Bradley-Terry loss from the SFT backbone.

    L = -log sigmoid( r(x, y_w) - r(x, y_l) )

r is a scalar head read at the last real (non-padding) token of prompt + response (docs/algorithm.md, stage 3).

    python reward_model.py --sft_ckpt runs/sft
    accelerate launch reward_model.py --sft_ckpt <sft> --dataset Anthropic/hh-rlhf

The checkpoint loads with AutoModelForSequenceClassification.from_pretrained(dir, num_labels=1). After
training, the mean and std of the reward over the training responses are stored in its config
(reward_mean, reward_std) so that rto.py can normalise rewards as the authors' code does.
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
    "lr": Default(toy=3e-4, real=1e-5),
    "batch_size": Default(toy=32, real=128),
    "epochs": Default(toy=2, real=1),
    "max_prompt_len": Default(toy=24, real=512),
    "max_response_len": Default(toy=24, real=512, toy_long=96),
}


@dataclass
class Args(common.OfflineTrainArgs, common.LoraArgs):
    sft_ckpt: str = arg(
        None, "SFT checkpoint folder: the backbone (a fresh scalar head is put on it)"
    )
    dataset: str = arg(
        TOY,
        "'toy' or 'toy-long' (built-in tasks' pairs), a hub id, or a local json/jsonl/parquet file of pairs",
    )
    output_dir: str = arg("runs/rm", "checkpoint folder to write")
    lr: float = arg(None, "AdamW learning rate")
    batch_size: int = arg(None, "pairs per optimiser step, over all processes")
    epochs: int = arg(None, "passes over the pairs")
    warmup_ratio: float = arg(0.03, "fraction of steps of linear warm-up, then linear decay to 0")
    max_prompt_len: int = arg(
        None, "prompt tokens; longer prompts are skipped or fatal (--long_prompts)"
    )
    max_response_len: int = arg(None, "response tokens, EOS included; longer ones are cut")


def validate(args):
    """Every bad value fails here, with one line, before anything is loaded or written."""
    if not args.sft_ckpt:
        common.fail("--sft_ckpt is required: the SFT checkpoint folder written by sft.py")
    common.check_positive(args, "lr")
    common.check_at_least(args, 1, "batch_size", "epochs", "max_prompt_len", "max_response_len")
    common.check_between(args, "warmup_ratio", 0, 1)
    return args


def bt_loss(rewards):
    """Bradley-Terry loss on (2B,) rewards; also the chosen and rejected rewards."""
    B = rewards.shape[0] // 2
    chosen, rejected = rewards[:B], rewards[B:]
    return -F.logsigmoid(chosen - rejected).mean(), chosen.detach(), rejected.detach()


@torch.no_grad()
def evaluate(accelerator, model, loader):
    """Held-out loss and accuracy (chosen scored above rejected) over every pair of every process."""
    model.eval()
    parts = []
    for batch in loader:
        r = speed.sequence_scores(model, batch)
        B = r.shape[0] // 2
        parts.append(common.gather(accelerator, torch.stack([r[:B], r[B:]], 1)))
    model.train()
    cr = torch.cat(parts)  # (N, 2)
    return {
        "eval_loss": -F.logsigmoid(cr[:, 0] - cr[:, 1]).mean().item(),
        "eval_accuracy": (cr[:, 0] > cr[:, 1]).float().mean().item(),
    }


@torch.no_grad()
def reward_statistics(accelerator, model, loader):
    """Mean and std of r over the training responses (chosen and rejected), for normalisation in RL."""
    model.eval()
    # gathered per pair, (b, 2) like evaluate(): the gather drops the last batch's padding by counting
    # dataset rows (pairs), which on the flat (2b,) scores would drop the wrong ones
    r = torch.cat(
        [common.gather(accelerator, speed.sequence_scores(model, b).view(2, -1).T) for b in loader]
    )
    return {"reward_mean": r.mean().item(), "reward_std": r.std().item()}


def main(argv=None):
    args = validate(common.parse_args(Args, argv, DEFAULTS))
    accelerator = common.setup(args)
    micro, accum = common.batch_plan(accelerator, args.batch_size, args.micro_batch_size)
    tokenizer = data.load_tokenizer(args.sft_ckpt, "--sft_ckpt")
    # a frozen base needs no fp32 master
    dtype = torch.bfloat16 if args.bf16 and args.lora_rank else torch.float32
    model = common.load_scorer(
        args.sft_ckpt,
        tokenizer,
        "--sft_ckpt",
        dtype,
        weights=args.lora_rank > 0 or common.loads_weights(accelerator),
        new_head=True,  # the reward head is new
    )
    if args.lora_rank:  # an adapter on the frozen SFT model, and a trained copy of the new head
        model = lora.add_adapter(common.cast(model, dtype), args, args.sft_ckpt, scorer=True)
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

    def collate(exs):
        return data.collate_pairs(exs, pad)

    train_loader = DataLoader(train, micro, shuffle=True, collate_fn=collate)
    held_loader = DataLoader(held, micro, collate_fn=collate)
    stats_loader = DataLoader(train, micro, collate_fn=collate)
    optimizer = torch.optim.AdamW(common.trainable(model), lr=args.lr, fused=True)
    model, optimizer, train_loader, held_loader, stats_loader = accelerator.prepare(
        model, optimizer, train_loader, held_loader, stats_loader
    )
    # per-process batches
    steps = common.total_steps(len(train_loader), accum, args.epochs, args.max_steps)
    scheduler = common.lr_schedule(
        accelerator, optimizer, "linear", int(args.warmup_ratio * steps), steps
    )

    step = (common.load_state(accelerator, args) or {"step": 0})["step"]
    if step == 0:
        common.log_metrics(
            accelerator, args.output_dir, evaluate(accelerator, model, held_loader), 0
        )
    # on the main process
    bar = tqdm(total=steps, initial=step, desc="reward model", dynamic_ncols=True)
    skipped = 0
    window = []
    for batch in common.train_batches(accelerator, train_loader, args.epochs, step, accum):
        with accelerator.accumulate(model):
            loss, chosen, rejected = bt_loss(speed.sequence_scores(model, batch))
            skipped += not common.optimizer_step(
                accelerator, [model], loss, [optimizer], [scheduler], args, f"step {step + 1}"
            )
        window.append(torch.stack([loss.detach(), (chosen > rejected).float().mean()]))
        if not accelerator.sync_gradients:
            continue
        step += 1
        bar.update(1)
        # the step's means
        mean = common.reduce(accelerator, torch.stack(window).mean(0), "mean").tolist()
        window = []
        metrics = {"loss": mean[0], "accuracy": mean[1]}
        if step % args.eval_steps == 0 or step == steps:
            metrics.update(evaluate(accelerator, model, held_loader))
        if step % args.logging_steps == 0 or "eval_loss" in metrics:
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['accuracy']:.2f}")
            common.log_metrics(
                accelerator, args.output_dir, {**metrics, "skipped_nonfinite": skipped}, step
            )
        if args.save_every and step % args.save_every == 0 and step < steps:
            common.save_state(accelerator, args, step)
        if step >= steps:
            break

    final = {
        **evaluate(accelerator, model, held_loader),
        **reward_statistics(accelerator, model, stats_loader),
    }
    common.log_metrics(accelerator, args.output_dir, {"phase": "final", **final}, step)
    common.save_model(
        accelerator,
        model,
        tokenizer,
        args.output_dir,
        {"reward_mean": final["reward_mean"], "reward_std": final["reward_std"]},
        args.merge_lora,
    )
    accelerator.print(" | ".join(f"{k}: {v:.3f}" for k, v in final.items()))
    accelerator.print(f"saved {args.output_dir}")
    common.finish(accelerator)


if __name__ == "__main__":
    main()
