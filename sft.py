"""Stage 1: supervised fine-tuning. Cross-entropy on the response tokens only; the prompt is context.

    python sft.py                                        # tiny model on the built-in task
    accelerate launch sft.py --model_name_or_path EleutherAI/pythia-2.8b --dataset Anthropic/hh-rlhf

On preference data the demonstration is the chosen response (docs/algorithm.md, stage 1).
Writes a Hugging Face checkpoint folder (model + tokenizer) to --output_dir, and metrics.jsonl beside it.
"""

from dataclasses import dataclass

import torch
from accelerate.utils import tqdm
from torch.utils.data import DataLoader

import common
import data
import lora
import speed
import toy_task
from common import TOY, TOYS, Default, arg

# flag: its value on the built-in task, with real models (the paper), on toy-long; these flags default to None in Args
DEFAULTS = {
    "lr": Default(toy=1e-3, real=1e-5),
    "epochs": Default(toy=3, real=1),
    "max_prompt_len": Default(toy=24, real=512),
    "max_response_len": Default(toy=24, real=512, toy_long=96),
}


@dataclass
class Args(common.OfflineTrainArgs, common.LoraArgs):
    model_name_or_path: str = arg(
        common.TINY,
        "hub id, local folder, local .gguf file (needs the gguf package; "
        "de-quantised to float32), or 'tiny' (a small random Llama)",
    )
    dataset: str = arg(
        TOY, "'toy' or 'toy-long' (built-in tasks), a hub id, or a local json/jsonl/parquet file"
    )
    output_dir: str = arg("runs/sft", "checkpoint folder to write")
    lr: float = arg(None, "AdamW learning rate")
    batch_size: int = arg(32, "sequences per optimiser step, over all processes (paper: 32)")
    epochs: int = arg(None, "passes over the data")
    warmup_ratio: float = arg(0.03, "fraction of steps of linear warm-up, then linear decay to 0")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    max_prompt_len: int = arg(
        None, "prompt tokens; longer prompts are skipped or fatal (--long_prompts)"
    )
    max_response_len: int = arg(None, "response tokens, EOS included; longer ones are cut")
    oracle_prompts: int = arg(
        200, "built-in task only: test prompts sampled to measure the oracle reward"
    )


def validate(args):
    """Every bad value fails here, with one line, before anything is loaded or written."""
    common.check_positive(args, "lr")
    common.check_at_least(args, 0, "weight_decay")
    common.check_at_least(
        args, 1, "batch_size", "epochs", "max_prompt_len", "max_response_len", "oracle_prompts"
    )
    common.check_between(args, "warmup_ratio", 0, 1)
    if args.lora_rank and args.model_name_or_path == common.TINY:
        common.fail(
            "--lora_rank needs a pretrained --model_name_or_path: an adapter on the random tiny model has "
            "no base checkpoint to name"
        )
    return args


def load_demonstrations(args, tokenizer):
    """(train, eval) lists of {prompt: ids, response: ids}."""
    if args.dataset in TOYS:
        train = toy_task.sft_data("train", seed=args.seed, task=args.dataset)
        held = toy_task.sft_data("test", 400, seed=args.seed, task=args.dataset)
    else:
        pairs, held_pairs = data.load_pairs(args.dataset, args, args.eval_fraction)
        train, held = (
            [{"prompt": p["prompt"], "response": p["chosen"]} for p in ps]
            for ps in (pairs, held_pairs)
        )

    def enc(rows):
        return data.encode_examples(
            tokenizer,
            rows,
            args.max_prompt_len,
            args.max_response_len,
            args.long_prompts,
            keys=("response",),
        )

    return enc(train), enc(held)


def sft_loss(model, batch):
    """Mean negative log-likelihood of the response tokens (prompt tokens carry no loss)."""
    logp = speed.response_logprobs(model, batch)  # (B, R)
    return -common.masked_mean(logp, batch["response_mask"])


@torch.no_grad()
def heldout_loss(accelerator, model, loader):
    """Token-mean NLL over every held-out response of every process (gather_for_metrics drops the padding
    that evens out the last batch across processes)."""
    model.eval()
    sums = []
    for b in loader:
        nll = -speed.response_logprobs(model, b).sum(-1)  # (B,)
        sums.append(common.gather(accelerator, torch.stack([nll, b["response_mask"].sum(-1)], 1)))
    model.train()
    total = torch.cat(sums).sum(0)
    return (total[0] / total[1]).item()


def oracle_reward(args, accelerator, model, tokenizer):
    """Built-in task only: ground-truth reward of sampled responses to held-out prompts."""
    if args.dataset not in TOYS:
        return {}
    prompts = toy_task.prompts("test", args.oracle_prompts, seed=args.seed, task=args.dataset)
    return {
        "oracle_reward": data.mean_oracle_reward(
            accelerator, model, tokenizer, prompts, args.max_response_len, seed=args.seed
        )
    }


def main(argv=None):
    args = validate(common.parse_args(Args, argv, DEFAULTS))
    accelerator = common.setup(args)
    micro, accum = common.batch_plan(accelerator, args.batch_size, args.micro_batch_size)
    tokenizer = (
        data.build_tiny_tokenizer(args.dataset)
        if args.model_name_or_path == common.TINY
        else data.load_tokenizer(args.model_name_or_path)
    )
    # a frozen base needs no fp32 master
    dtype = torch.bfloat16 if args.bf16 and args.lora_rank else torch.float32
    model = common.load_causal_lm(
        args.model_name_or_path,
        tokenizer,
        seed=args.seed,
        dtype=dtype,
        weights=args.lora_rank > 0 or common.loads_weights(accelerator),
    )
    # an adapter on the frozen pretrained model; later stages load it merged (common.py)
    if args.lora_rank:
        model = lora.add_adapter(common.cast(model, dtype), args, args.model_name_or_path)
    train, held = load_demonstrations(args, tokenizer)
    common.prepare_output_dir(
        args,
        accelerator,
        {
            "processes": accelerator.num_processes,
            "micro_batch_size": micro,
            "gradient_accumulation_steps": accum,
            "train_examples": len(train),
            "heldout_examples": len(held),
        },
    )
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()

    pad = tokenizer.pad_token_id

    def collate(exs):
        return data.collate([e["prompt"] for e in exs], [e["response"] for e in exs], pad)

    train_loader = DataLoader(train, micro, shuffle=True, collate_fn=collate)
    held_loader = DataLoader(held, micro, collate_fn=collate)
    optimizer = torch.optim.AdamW(
        common.trainable(model), lr=args.lr, weight_decay=args.weight_decay, fused=True
    )
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
        before = {
            "heldout_loss": heldout_loss(accelerator, model, held_loader),
            **oracle_reward(args, accelerator, model, tokenizer),
        }
        common.log_metrics(accelerator, args.output_dir, {"phase": "before", **before}, 0)
    bar = tqdm(total=steps, initial=step, desc="sft", dynamic_ncols=True)  # on the main process
    skipped = 0
    window = []
    for batch in common.train_batches(accelerator, train_loader, args.epochs, step, accum):
        with accelerator.accumulate(model):
            loss = sft_loss(model, batch)
            skipped += not common.optimizer_step(
                accelerator, [model], loss, [optimizer], [scheduler], args, f"step {step + 1}"
            )
        window.append(loss.detach())
        if not accelerator.sync_gradients:
            continue
        step += 1
        bar.update(1)
        # the step's mean loss
        loss = common.reduce(accelerator, torch.stack(window).mean(), "mean").item()
        window = []
        metrics = {"loss": loss, "lr": scheduler.get_last_lr()[0]}
        if step % args.eval_steps == 0 or step == steps:
            metrics["heldout_loss"] = heldout_loss(accelerator, model, held_loader)
        if step % args.logging_steps == 0 or "heldout_loss" in metrics:
            bar.set_postfix(loss=f"{metrics['loss']:.3f}")
            common.log_metrics(
                accelerator, args.output_dir, {**metrics, "skipped_nonfinite": skipped}, step
            )
        if args.save_every and step % args.save_every == 0 and step < steps:
            common.save_state(accelerator, args, step)
        if step >= steps:
            break

    after = {
        "heldout_loss": heldout_loss(accelerator, model, held_loader),
        **oracle_reward(args, accelerator, model, tokenizer),
    }
    common.log_metrics(accelerator, args.output_dir, {"phase": "after", **after}, step)
    common.save_model(accelerator, model, tokenizer, args.output_dir, merge_lora=args.merge_lora)
    accelerator.print(" | ".join(f"{k}: {v:.3f}" for k, v in after.items()))
    accelerator.print(f"saved {args.output_dir}")
    common.finish(accelerator)


if __name__ == "__main__":
    main()
