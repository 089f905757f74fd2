"""Shared plumbing for the stages: arguments, set-up, data, tokenisation, log-probs, checkpoints.

Nothing here is specific to one stage; each piece is small and used by at least two of
sft.py, dpo.py, reward_model.py, rto.py, evaluate.py.

Batch layout used everywhere (built by `collate`):

    input_ids       (B, P + R)   [pad .. pad prompt | response pad .. pad]   prompt left-padded, response right-padded
    attention_mask  (B, P + R)   1 on real tokens
    response_mask   (B, R)       1 on response tokens (EOS included), 0 on padding
    prompt_len      int          P, the same for the whole batch, so response token j sits at column P + j

Left-padded prompts are what `generate` needs, so a rollout comes out of generation already in this layout.
"""

import importlib.util
import json
import math
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from tqdm.auto import tqdm
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, HfArgumentParser,
                          LlamaConfig, LlamaForCausalLM, get_scheduler)

import toy_task

TOY = "toy"  # --dataset name of the built-in task
TINY = "tiny"  # --model_name_or_path of the small randomly initialised Llama


# ============================================================================ errors and arguments
def fail(msg):
    """Bad input: one line on stderr, exit status 1, nothing written (callers validate before writing)."""
    raise SystemExit(f"error: {msg}")


def arg(default, help):
    """A dataclass field with a --help line."""
    return field(default=default, metadata={"help": help})


@dataclass
class RunArgs:
    """Flags every stage takes."""

    output_dir: str = arg(None, "where the checkpoint folder and metrics.jsonl go")
    seed: int = arg(0, "random seed (data order, initialisation, sampling)")
    overwrite: bool = arg(False, "replace --output_dir if it already holds something")
    report_to: str = arg("none", "Accelerate tracker for metrics besides metrics.jsonl: none | tensorboard | wandb")
    skip_bad_rows: bool = arg(False, "skip data rows that cannot be parsed (counted) instead of failing on the first")
    long_prompts: str = arg("skip", "prompts longer than --max_prompt_len: skip (counted) | fail")
    dataset_split: str = arg("train", "split of a hub --dataset to train on (UltraFeedback: train_prefs)")
    trust_remote_code: bool = arg(False, "let checkpoints run their own Python code (off: only built-in models)")


@dataclass
class TrainArgs(RunArgs):
    """Flags every training stage takes."""

    max_steps: int = arg(-1, "stop after this many optimiser steps (-1: run the epochs)")
    micro_batch_size: int = arg(None, "sequences per device per forward pass (default: --batch_size / processes)")
    gradient_checkpointing: bool = arg(False, "recompute activations in the backward pass to save memory")
    bf16: bool = arg(False, "bfloat16 mixed precision")
    logging_steps: int = arg(10, "log training metrics every this many optimiser steps")
    save_every: int = arg(0, "write resumable state every N optimiser steps (0: only the final model)")
    save_total_limit: int = arg(1, "resumable checkpoints to keep, newest first")
    resume: bool = arg(False, "continue from the newest checkpoint-<step> in --output_dir")
    skip_nonfinite: bool = arg(False, "skip a step whose loss or gradient is not finite (counted) instead of stopping")


def parse_args(args_class, argv=None):
    try:
        (args,) = HfArgumentParser(args_class).parse_args_into_dataclasses(args=argv)
    except ValueError as e:  # leftover arguments: an unknown flag
        fail(f"{str(e).splitlines()[0]} (see --help)")
    return args


def batch_plan(accelerator, batch_size, micro_batch_size):
    """Micro-batch and gradient-accumulation steps so that micro × processes × accumulation = global batch."""
    num_processes = accelerator.num_processes
    micro = micro_batch_size or max(1, batch_size // num_processes)
    if batch_size % (micro * num_processes):
        fail(f"--batch_size {batch_size} is not divisible by --micro_batch_size {micro} × {num_processes} processes; "
             "change one of them")
    accelerator.gradient_accumulation_steps = batch_size // (micro * num_processes)
    return micro, accelerator.gradient_accumulation_steps


# ============================================================================ set-up and logging
def setup(args):
    """Accelerator + seed. Trackers start only when asked for (--report_to)."""
    trackers = {"none": None, "tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}
    if args.report_to not in trackers:
        fail(f"--report_to {args.report_to}: expected one of {', '.join(trackers)}")
    if trackers[args.report_to] and not any(importlib.util.find_spec(p) for p in trackers[args.report_to]):
        fail(f"--report_to {args.report_to}: the {trackers[args.report_to][0]} package is not installed "
             f"(pip install {trackers[args.report_to][0]})")
    LOAD_OPTIONS["trust_remote_code"] = args.trust_remote_code
    accelerator = Accelerator(
        # each epoch's shuffle depends only on (seed, epoch), so a resumed run sees the same batches
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        mixed_precision="bf16" if getattr(args, "bf16", False) else "no",
        log_with=None if args.report_to == "none" else args.report_to,
        project_dir=args.output_dir,
    )
    fsdp_on_cpu(accelerator)
    # said out loud because a wrong launch command silently runs one process
    accelerator.print(f"processes: {accelerator.num_processes} ({accelerator.distributed_type.value})")
    set_seed(args.seed)
    return accelerator


def fsdp_on_cpu(accelerator):
    """Accelerate ignores an FSDP config when there is no GPU (and falls back to DDP); apply it by hand, so that
    the FSDP code paths run in tests on CPU processes. A no-op wherever Accelerate already set FSDP up."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true" or accelerator.is_fsdp2 or \
            accelerator.distributed_type == DistributedType.FSDP:
        return
    for state in (accelerator.state, PartialState()):
        state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # reads the launcher's FSDP_* variables


def finish(accelerator):
    """End a stage: trackers closed, process group destroyed. With several processes, each then exits at once,
    skipping Python's teardown: there a DDP model's reducer, freed after the group is gone, destroys the gloo
    group while holding the GIL that a gloo worker thread needs to free its last tensors, and the rank hangs
    for ever (seen here about once in 40 two-process CPU runs; pytorch/pytorch#56297). Everything is saved by now."""
    accelerator.end_training()
    if accelerator.num_processes > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def prepare_output_dir(args, accelerator):
    """Refuse to clobber a folder unless --overwrite; call only once all inputs are validated."""
    out, resume = args.output_dir, getattr(args, "resume", False)
    if os.path.exists(out) and os.listdir(out) and not (args.overwrite or resume):
        fail(f"--output_dir {out} already exists and is not empty; pass --overwrite to replace it")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if args.overwrite and not resume and os.path.exists(out):
            shutil.rmtree(out)
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "args.json.tmp"), "w") as f:  # what produced this folder, defaults filled in
            json.dump(asdict(args), f, indent=1, default=str)
        os.replace(os.path.join(out, "args.json.tmp"), os.path.join(out, "args.json"))
    accelerator.wait_for_everyone()
    if args.report_to != "none":
        accelerator.init_trackers(os.path.basename(os.path.abspath(out)), config=_jsonable(asdict(args)))


def _jsonable(d):
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in d.items()}


def log_metrics(accelerator, output_dir, metrics, step):
    """Append one JSON line to <output_dir>/metrics.jsonl and send the numbers to any tracker."""
    metrics = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}
    if accelerator.is_main_process:
        with open(os.path.join(output_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
    accelerator.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)


# ============================================================================ the training step and resumable state
def all_finite(accelerator, x):
    """True on every process iff x is finite on every process (so that all ranks take the same branch)."""
    x = x.full_tensor() if hasattr(x, "full_tensor") else x  # FSDP2's gradient norm is a DTensor
    bad = (~torch.isfinite(x.detach().float())).any().float()
    return accelerator.reduce(bad.to(accelerator.device), "sum").item() == 0


def optimizer_step(accelerator, models, loss, optimizers, schedulers, args, step):
    """backward; at the accumulation boundary clip, step and zero (Accelerate holds the step back before it).

    Lists of models/optimizers/schedulers, so that rto.py's actor and critic share it. A non-finite loss or
    gradient norm stops the run with one line, or with --skip_nonfinite drops the micro-batch (the step) and
    returns False so the caller can count it."""
    if not all_finite(accelerator, loss):
        return nonfinite(args, "loss", step, optimizers)
    accelerator.backward(loss)
    if accelerator.sync_gradients:
        norms = torch.stack([accelerator.clip_grad_norm_(m.parameters(), args.max_grad_norm) for m in models])
        if not all_finite(accelerator, norms):
            return nonfinite(args, "gradient norm", step, optimizers)
    for optimizer, scheduler in zip(optimizers, schedulers):
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return True


def nonfinite(args, what, step, optimizers):
    if not args.skip_nonfinite:
        fail(f"non-finite {what} at step {step + 1}; lower the learning rate, or pass --skip_nonfinite to skip it")
    for optimizer in optimizers:
        optimizer.zero_grad()
    return False


def lr_schedule(accelerator, optimizer, name, warmup_steps, steps, **kwargs):
    """A prepared transformers schedule over `steps` optimiser steps. Accelerate steps a prepared scheduler once
    per process at every optimiser step, so its length is counted in process-steps."""
    n = accelerator.num_processes
    return accelerator.prepare(get_scheduler(name, optimizer, warmup_steps * n, steps * n,
                                             scheduler_specific_kwargs=kwargs or None))


def train_batches(accelerator, loader, epochs, start_step, accum):
    """Every batch of the run, epoch after epoch; on resume, starting where step `start_step` left off."""
    skip = start_step * accum
    for epoch in range(skip // len(loader), epochs):
        loader.set_epoch(epoch)
        done = skip - epoch * len(loader) if epoch == skip // len(loader) else 0
        yield from accelerator.skip_first_batches(loader, done) if done else loader


def save_state(accelerator, args, step, extra=None):
    """Models, optimisers, schedulers, RNG (+ `extra`) in <output_dir>/checkpoint-<step>, written atomically;
    only the newest --save_total_limit are kept."""
    path = os.path.join(args.output_dir, f"checkpoint-{step}")
    tmp = os.path.join(args.output_dir, ".checkpoint.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    if accelerator.is_main_process:
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump({"step": step, **(extra or {})}, f)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
        for old in checkpoints(args.output_dir)[:-max(1, args.save_total_limit)]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def checkpoints(output_dir):
    """Complete checkpoint folders, oldest first."""
    found = []
    for name in os.listdir(output_dir) if os.path.isdir(output_dir) else []:
        if name.startswith("checkpoint-") and os.path.exists(os.path.join(output_dir, name, "state.json")):
            found.append(os.path.join(output_dir, name))
    return sorted(found, key=lambda p: int(p.rsplit("-", 1)[1]))


def load_state(accelerator, args):
    """With --resume: restore the newest checkpoint and return its state.json; otherwise None."""
    if not args.resume:
        return None
    found = checkpoints(args.output_dir)
    if not found:
        fail(f"--resume: no checkpoint-<step> folder in {args.output_dir} (save some with --save_every N)")
    accelerator.load_state(found[-1])
    with open(os.path.join(found[-1], "state.json")) as f:
        state = json.load(f)
    truncate_metrics(accelerator, args.output_dir, state["step"])
    accelerator.print(f"resumed from {found[-1]}")
    return state


def truncate_metrics(accelerator, output_dir, step):
    """On resume: drop the lines a killed run wrote after its last checkpoint, so the log reads as one run."""
    path = os.path.join(output_dir, "metrics.jsonl")
    if accelerator.is_main_process and os.path.exists(path):
        with open(path) as f:
            keep = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        with open(path + ".tmp", "w") as f:
            f.writelines(keep)
        os.replace(path + ".tmp", path)
    accelerator.wait_for_everyone()


def progress(accelerator, total, desc, initial=0):
    return tqdm(total=total, initial=initial, desc=desc, disable=not accelerator.is_local_main_process,
                dynamic_ncols=True)


def progress_iter(accelerator, iterable, desc):
    return tqdm(iterable, desc=desc, disable=not accelerator.is_local_main_process, dynamic_ncols=True, leave=False)


def total_steps(batches_per_epoch, accum, epochs, max_steps):
    """Optimiser steps of a run: the epochs, or --max_steps if that is smaller."""
    steps = batches_per_epoch // accum * epochs
    return min(steps, max_steps) if max_steps > 0 else steps


# ============================================================================ models and tokenizers
CHAT_TEMPLATE = (  # for the tiny tokenizers; real chat models bring their own
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# Every from_pretrained call: weights from safetensors only (no pickle), remote code only with --trust_remote_code
# (setup() sets it from the flag).
LOAD_OPTIONS = {"trust_remote_code": False}
SPECIALS = ["<pad>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]


def build_tiny_tokenizer(dataset):
    """Offline tokenizer: the built-in task's words (fast), or bytes (any text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if dataset == TOY:
        tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(SPECIALS + toy_task.VOCAB)}, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    else:
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        tok = Tokenizer(models.BPE({c: i for i, c in enumerate(SPECIALS + sorted(alphabet))}, [], unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                        additional_special_tokens=SPECIALS[3:])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_config(tokenizer, hidden=128, layers=4):
    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                       max_position_embeddings=512, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                       eos_token_id=tokenizer.eos_token_id, bos_token_id=None)


def check_model_path(name, flag):
    if name.endswith(".gguf") and not os.path.isfile(name):
        fail(f"{flag} {name}: no such .gguf file")
    if name != TINY and not os.path.exists(name) and (name.startswith((".", "/", "~")) or name.count("/") != 1):
        fail(f"{flag} {name}: no such folder or file (and not a hub id of the form org/name)")


def pretrained(name, flag, model=False):
    """from_pretrained's (path, extra kwargs) for a hub id, a folder, or a local .gguf file (llama.cpp's format).

    A .gguf file is read from its folder with gguf_file=. A model's weights are unpacked into a plain dense one:
    otherwise transformers 5 marks the model as GGUF-quantised (and, with a matmul kernel installed, may keep the
    weights in packed blocks that cannot train), and save_pretrained refuses it ("quantized with gguf and is not
    serializable"). GgufConfig(dequantize=True) unpacks every weight and drops the mark, so the checkpoint a stage
    writes is an ordinary safetensors folder. transformers 4 always unpacks GGUF and has no GgufConfig."""
    if not name.endswith(".gguf"):
        return name, {}
    if importlib.util.find_spec("gguf") is None:
        fail(f"{flag} {name}: reading a .gguf file needs the gguf package (pip install gguf)")
    kwargs = {"gguf_file": os.path.basename(name)}
    if model:
        try:
            from transformers import GgufConfig
            kwargs["quantization_config"] = GgufConfig(dequantize=True)
        except ImportError:
            pass
    return os.path.dirname(os.path.abspath(name)), kwargs


def end_of_turn_token(tokenizer):
    """The special token the chat template writes right after an assistant message (ChatML: <|im_end|>), or None."""
    if not tokenizer.chat_template:
        return None
    mark = "RESPONSE_ENDS_HERE"
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": mark}]
    try:
        text = tokenizer.apply_chat_template(turns, tokenize=False)
    except Exception:  # a template may reject this conversation (jinja raise_exception); then it tells us nothing
        return None
    after = text.split(mark, 1)[1].lstrip() if mark in text else ""
    ids = tokenizer(after, add_special_tokens=False)["input_ids"][:1]
    special = ids and getattr(tokenizer.added_tokens_decoder.get(ids[0]), "special", False)
    return tokenizer.convert_ids_to_tokens(ids[0]) if special else None


def load_tokenizer(name, dataset=TOY, flag="--model_name_or_path"):
    """A checkpoint's tokenizer (hub id, folder or .gguf file).

    EOS is the token that ends a response: encode_response appends it and sampling stops at it. When the chat
    template ends an assistant turn with another special token (a base model's <|endoftext|> under a ChatML
    template that ends turns with <|im_end|>), that token becomes EOS, so that responses end the way the
    template's turns do and an instruct model stops where it was taught to. Sets pad = EOS when the tokenizer
    has no pad token (masks compensate)."""
    if name == TINY:
        return build_tiny_tokenizer(dataset)
    check_model_path(name, flag)
    path, kwargs = pretrained(name, flag)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs, **LOAD_OPTIONS)
    except (OSError, ValueError) as e:
        fail(f"{flag} {name}: cannot load a tokenizer ({str(e).splitlines()[0]})")
    eot = end_of_turn_token(tokenizer)
    if eot and eot != tokenizer.eos_token:
        print(f"note: the chat template of {name} ends an assistant turn with {eot!r}, not its EOS "
              f"{tokenizer.eos_token!r}; using {eot!r} as EOS", file=sys.stderr)
        tokenizer.eos_token = eot
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        print(f"note: tokenizer of {name} has no pad token; using EOS ({tokenizer.eos_token!r}) as pad", file=sys.stderr)
    return tokenizer


def load_causal_lm(name, tokenizer, flag="--model_name_or_path", seed=0):
    """Any causal LM by hub id, folder or .gguf file, or `tiny`; float32, dropout off (PPO's ratio must be 1
    before any update)."""
    if name == TINY:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(tiny_config(tokenizer))
    else:
        check_model_path(name, flag)
        path, kwargs = pretrained(name, flag, model=True)
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True, **kwargs,
                                                         **LOAD_OPTIONS)
        except (OSError, ValueError) as e:
            fail(f"{flag} {name}: cannot load a causal LM ({str(e).splitlines()[0]})")
        if getattr(model, "is_quantized", False):
            fail(f"{flag} {name}: loads as a quantised model, which cannot be trained or saved; use an "
                 "unquantised checkpoint")
    return disable_dropout(model)


def load_scorer(name, tokenizer, flag):
    """A scalar-head model (reward model or critic): AutoModelForSequenceClassification with num_labels=1."""
    check_model_path(name, flag)
    path, kwargs = pretrained(name, flag, model=True)  # a .gguf file works too (a fresh head on its backbone)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32,
                                                                   use_safetensors=True, **kwargs, **LOAD_OPTIONS)
    except (OSError, ValueError) as e:
        fail(f"{flag} {name}: cannot load as a sequence-classification model ({str(e).splitlines()[0]})")
    if getattr(model, "is_quantized", False):
        fail(f"{flag} {name}: loads as a quantised model, which cannot be trained or saved; use an unquantised "
             "checkpoint")
    model.config.pad_token_id = tokenizer.pad_token_id
    return disable_dropout(model)


def disable_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def frozen(model):
    model.eval().requires_grad_(False)
    return model


def place_frozen(accelerator, model):
    """Put a frozen model (reference, DPO, reward model) where it runs: sharded like the trained models under
    FSDP2 (each decoder layer, then the whole), otherwise one copy per device. Accelerate's prepare() refuses
    a model that has no optimiser under FSDP2, hence fully_shard by hand."""
    if not accelerator.is_fsdp2:
        return model.to(accelerator.device)
    from torch.distributed.fsdp import fully_shard

    for module in model.modules():
        if type(module).__name__ in (model._no_split_modules or []):
            fully_shard(module)
    fully_shard(model)
    return model


# ============================================================================ data
def _messages_from_hh(text):
    """'\\n\\nHuman: a\\n\\nAssistant: b ...' -> [{role, content}, ...]"""
    msgs = []
    for chunk in ("\n\n" + text.lstrip("\n")).split("\n\nHuman:")[1:]:
        human, *assistants = chunk.split("\n\nAssistant:")
        msgs.append({"role": "user", "content": human.strip()})
        msgs += [{"role": "assistant", "content": a.strip()} for a in assistants]
    return msgs


def _as_prompt(value):
    """A prompt column: a string (HH-style transcripts are split into turns) or a list of messages."""
    if isinstance(value, str):
        if value.lstrip().startswith("Human:"):
            msgs = _messages_from_hh(value)
            if msgs and msgs[-1] == {"role": "assistant", "content": ""}:
                msgs.pop()  # a trailing "Assistant:" (Dahoas/rm-static layout) is the cue to answer, not a turn
            if msgs:
                return msgs
        return [{"role": "user", "content": value}]
    return _as_messages(value)


def _as_messages(value):
    if not isinstance(value, list) or not value:
        raise ValueError("expected a non-empty list of {role, content} messages")
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in (
                "system", "user", "assistant"):
            raise ValueError("a message is not {role: system|user|assistant, content: str}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _text(value, column):
    # An empty reply is real data, not a broken row: HH-RLHF and UltraFeedback hold a few (the assistant said
    # nothing); the response is then EOS alone.
    if not isinstance(value, str):
        raise ValueError(f"'{column}' is not a string")
    return value


def detect_format(columns):
    """The data layout, from the column names alone."""
    cols = set(columns)
    if "context_messages" in cols:
        return "prompt_only"
    if {"chosen", "rejected"} <= cols:
        return "pairs"  # HH transcripts, UltraFeedback message lists, or generic prompt/chosen/rejected
    if "prompt" in cols:
        return "prompt_only"
    return None


def parse_row(row, fmt):
    """One raw row -> {'prompt': messages, 'chosen': str, 'rejected': str} (or just 'prompt')."""
    parsed = _parse_layout(row, fmt)
    # A prompt without any text (an empty prompt column, a bare "Human:", a conversation that is only the answer)
    # leaves nothing to respond to: a broken row, not a question
    if not any(m["content"].strip() for m in parsed["prompt"]):
        raise ValueError("the prompt is empty")
    return parsed


def _parse_layout(row, fmt):
    if fmt == "prompt_only":
        return {"prompt": _as_prompt(row["context_messages"] if "context_messages" in row else row["prompt"])}
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if chosen is None or rejected is None:
        raise ValueError("'chosen' or 'rejected' is missing")
    if isinstance(chosen, list):  # UltraFeedback: full conversations, the last message is the answer
        chosen, rejected = _as_messages(chosen), _as_messages(rejected)
        if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
            raise ValueError("the last message of 'chosen'/'rejected' is not the assistant's")
        # no prompt column (or an empty one): the conversation before the answer; any other value must be a prompt
        prompt = chosen[:-1] if row.get("prompt") in (None, "") else _as_prompt(row["prompt"])
        return {"prompt": prompt, "chosen": _text(chosen[-1]["content"], "chosen"),
                "rejected": _text(rejected[-1]["content"], "rejected")}
    chosen, rejected = _text(chosen, "chosen"), _text(rejected, "rejected")
    if row.get("prompt") is not None:  # generic prompt/chosen/rejected
        return {"prompt": _as_prompt(row["prompt"]), "chosen": chosen, "rejected": rejected}
    # Anthropic HH-RLHF: two full transcripts that differ only after the last "Assistant:"
    cut_c, cut_r = chosen.rfind("\n\nAssistant:"), rejected.rfind("\n\nAssistant:")
    if cut_c < 0 or cut_r < 0:
        raise ValueError("no '\\n\\nAssistant:' turn in 'chosen'/'rejected'")
    prompt = _messages_from_hh(chosen[:cut_c])
    if not prompt:
        raise ValueError("no '\\n\\nHuman:' turn before the last assistant turn")
    return {"prompt": prompt, "chosen": _text(chosen[cut_c + 12:].strip(), "chosen"),
            "rejected": _text(rejected[cut_r + 12:].strip(), "rejected")}


def load_rows(dataset, split="train", skip_bad_rows=False):
    """Rows of a hub dataset or a local json/jsonl(.gz)/parquet file, parsed into one layout."""
    local = os.path.exists(dataset)
    if not local and (dataset.startswith((".", "/", "~")) or dataset.endswith((".json", ".jsonl", ".gz", ".parquet"))):
        fail(f"--dataset {dataset}: no such file")
    if local and not dataset.endswith(".parquet"):
        columns, raws = _read_json(dataset)
    else:
        columns, raws = _read_with_datasets(dataset, split, local)
    if len(raws) == 0:
        fail(f"--dataset {dataset}: has no rows")
    fmt = detect_format(columns)
    if fmt is None:
        fail(f"--dataset {dataset}: unknown format (columns {columns}); expected chosen/rejected "
             "(HH-RLHF, UltraFeedback, or with prompt), or prompt / context_messages")
    rows, bad = [], 0
    for i in range(len(raws)):
        try:
            raw = raws[i]  # by index: a parquet string that is not UTF-8 raises as its row is read, not before
            if isinstance(raw, ValueError):  # a JSON line that is not an object (see _read_json)
                raise raw
            rows.append(parse_row(raw, fmt))
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            why = "not valid UTF-8 text" if isinstance(e, UnicodeDecodeError) else e
            if not skip_bad_rows:
                fail(f"--dataset {dataset} row {i}: {why} (pass --skip_bad_rows to skip such rows)")
            bad += 1
    if bad:
        print(f"note: skipped {bad} of {len(raws)} rows of {dataset} that could not be parsed", file=sys.stderr)
    if not rows:
        fail(f"--dataset {dataset}: no usable rows")
    return rows


def _read_with_datasets(dataset, split, local):
    """A parquet file or a hub dataset: (column names, rows)."""
    import datasets

    try:
        if local:
            ds = datasets.load_dataset("parquet", data_files=dataset, split="train")
        else:
            ds = datasets.load_dataset(dataset, split=split)
    except Exception as e:  # the datasets library raises many kinds; all mean the same to a user
        why = (str(e).splitlines() or [""])[0][:200]  # some come with no message at all
        fail(f"--dataset {dataset}: cannot be read as a dataset ({type(e).__name__}{f': {why}' if why else ''})")
    return ds.column_names, ds


def _read_json(path):
    """A local JSON-lines file, or one JSON array, either possibly gzipped: (column names, rows), where a row is a
    dict holding every column (None where it lacks one) or the ValueError that says why its line is not a row.

    The json module rather than the datasets library's JSON reader, which changes values where it should let
    parse_row refuse them: past its first 10 MB it casts a column to the type seen so far (an int `chosen` comes
    back as "5", a dict as its JSON text); a column of mixed types is stored as JSON, so that an answer which
    happens to read as JSON ("[1, 2]", '"yes"') comes back as a list or loses its quotes; it lets invalid UTF-8
    through; and its pyarrow (26) crashes the interpreter on a file whose first row is `null`."""
    import gzip
    import zlib

    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            data = f.read().removeprefix(b"\xef\xbb\xbf")
    except (OSError, EOFError, zlib.error) as e:  # a folder, not gzip after all, gzip cut short, ...
        fail(f"--dataset {path}: cannot be read ({type(e).__name__}: {str(e)[:200]})")
    if data.lstrip().startswith(b"["):  # one JSON array: it stands or falls as a whole
        values = _json_value(data)
        if isinstance(values, ValueError):
            fail(f"--dataset {path}: cannot be read as a dataset (a JSON array that is {values})")
        rows = [_json_object(v) for v in values]
    else:
        rows = [_json_object(_json_value(line)) for line in data.splitlines() if line.strip()]
    if not rows:
        fail(f"--dataset {path}: is empty (no rows)")
    if not any(isinstance(r, dict) for r in rows):
        what = "one JSON object over many lines" if isinstance(_json_value(data), dict) else f"row 0: {rows[0]}"
        fail(f"--dataset {path}: cannot be read as a dataset ({what}; expected an object per line or an array of "
             "objects)")
    columns = list(dict.fromkeys(k for r in rows if isinstance(r, dict) for k in r))
    return columns, [{c: r.get(c) for c in columns} if isinstance(r, dict) else r for r in rows]


def _json_value(text):
    """Bytes of JSON -> the value, or a ValueError saying why not."""
    try:
        value = json.loads(text.decode())  # strict UTF-8
        if b"\\ud" in text.lower():  # escapes of lone surrogates ("\ud800") parse, but no tokenizer takes them
            json.dumps(value, ensure_ascii=False).encode()
    except UnicodeError:
        return ValueError("not valid UTF-8 text")
    except (ValueError, RecursionError) as e:
        return ValueError(f"not valid JSON ({str(e)[:200]})")
    return value


def _json_object(value):
    if isinstance(value, (dict, ValueError)):
        return value
    return ValueError(f"{json.dumps(value)[:40]} is not a JSON object")


def split_eval(rows, eval_fraction, seed):
    """Hold out a fixed, seeded fraction of a single file for evaluation."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(rows), generator=g).tolist()
    n_eval = max(1, int(len(rows) * eval_fraction)) if len(rows) > 1 else 0
    return [rows[i] for i in order[n_eval:]], [rows[i] for i in order[:n_eval]]


def load_pairs(dataset, args, eval_fraction=0.05):
    """(train, eval) preference pairs: {prompt: messages, chosen: str, rejected: str}."""
    if dataset == TOY:
        return toy_task.preference_data("train", seed=args.seed), toy_task.preference_data("test", 500, args.seed)
    rows = [r for r in load_rows(dataset, args.dataset_split, args.skip_bad_rows) if "chosen" in r]
    if not rows:
        fail(f"--dataset {dataset}: holds prompts only; this stage needs chosen/rejected pairs")
    same = [r for r in rows if r["chosen"] == r["rejected"]]
    if same:
        print(f"note: skipped {len(same)} pairs whose chosen equals rejected", file=sys.stderr)
        rows = [r for r in rows if r["chosen"] != r["rejected"]]
    if not rows:  # else an empty training set, and a crash far from its cause
        fail(f"--dataset {dataset}: every pair has chosen equal to rejected; nothing to learn from")
    return split_eval(rows, eval_fraction, args.seed)


def load_prompts(dataset, split, args, n=None):
    """Prompts (lists of messages): a prompt-only set, or the prompts of a preference set."""
    if dataset == TOY:
        return toy_task.prompts(split, n or 2000, seed=args.seed)
    prompts = [r["prompt"] for r in load_rows(dataset, split, args.skip_bad_rows)]
    return prompts[:n] if n else prompts


# ============================================================================ tokenisation and batches
def format_prompt(tokenizer, messages):
    """Prompt text ending where the assistant's answer starts; HH-style text when there is no chat template."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    who = {"user": "Human", "assistant": "Assistant", "system": "System"}
    return "".join(f"\n\n{who[m['role']]}: {m['content']}" for m in messages) + "\n\nAssistant:"


def encode_prompt(tokenizer, messages):
    return tokenizer(format_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"]


def encode_response(tokenizer, text, max_len):
    """Response ids + EOS, cut to max_len (EOS kept only if it fits); returns (ids, was_truncated)."""
    prefix = "" if tokenizer.chat_template else " "  # "Assistant: answer" in the HH layout
    ids = tokenizer(prefix + text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return ids[:max_len], len(ids) > max_len


def encode_examples(tokenizer, rows, max_prompt_len, max_response_len, long_prompts="skip",
                    keys=("chosen", "rejected")):
    """Tokenise rows; responses are truncated (never prompts); over-long prompts skipped with a count or fatal."""
    out, long, cut = [], 0, 0
    for row in rows:
        p = encode_prompt(tokenizer, row["prompt"])
        if len(p) > max_prompt_len:
            if long_prompts == "fail":
                fail(f"a prompt has {len(p)} tokens > --max_prompt_len {max_prompt_len} (or pass --long_prompts skip)")
            long += 1
            continue
        ex = {"prompt": p}
        for k in keys:
            ex[k], was_cut = encode_response(tokenizer, row[k], max_response_len)
            cut += was_cut
        out.append(ex)
    if long or cut:
        print(f"note: skipped {long} rows with prompts over {max_prompt_len} tokens; "
              f"truncated {cut} responses to {max_response_len} tokens", file=sys.stderr)
    if not out:
        fail(f"no rows left after tokenisation (every prompt is over --max_prompt_len {max_prompt_len})")
    return out


def collate(prompts, responses, pad_id):
    """Lists of token-id lists -> the batch layout in this module's docstring."""
    P, R = max(map(len, prompts)), max(map(len, responses))
    B = len(prompts)
    input_ids = torch.full((B, P + R), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(B, P + R, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        input_ids[i, P - len(p):P], input_ids[i, P:P + len(r)] = torch.tensor(p), torch.tensor(r, dtype=torch.long)
        attention_mask[i, P - len(p):P + len(r)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "response_mask": attention_mask[:, P:].float(), "prompt_len": P}


def collate_pairs(examples, pad_id):
    """Chosen and rejected stacked into one batch of 2B: rows [0, B) chosen, [B, 2B) rejected."""
    return collate([e["prompt"] for e in examples] * 2,
                   [e["chosen"] for e in examples] + [e["rejected"] for e in examples], pad_id)


def collate_prompts(prompts, pad_id, width=None):
    """Left-padded prompts for generate: (B, P) ids and mask, P = width or the longest prompt."""
    P = width or max(map(len, prompts))
    b = collate([[pad_id] * (P - len(p)) + p for p in prompts], [[]] * len(prompts), pad_id)
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    return b["input_ids"], mask


def cat_batches(batches, pad_id):
    """Concatenate batches of the common layout that share P but not R (responses right-padded to the longest)."""
    R = max(b["response_mask"].shape[1] for b in batches)
    out = {}
    for key, fill in (("input_ids", pad_id), ("attention_mask", 0), ("response_mask", 0)):
        out[key] = torch.cat([F.pad(b[key], (0, R - b["response_mask"].shape[1]), value=fill) for b in batches])
    out["ended"] = torch.cat([b["ended"] for b in batches])
    return {**out, "prompt_len": batches[0]["prompt_len"]}


# ============================================================================ log-probs and masked statistics
def position_ids(attention_mask):
    """Positions counted from the first real token, so left padding does not shift them (as generate does)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_logits(model, batch, temperature=1.0):
    """Logits that predict each response token: (B, R, V)."""
    P = batch["prompt_len"]
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=position_ids(batch["attention_mask"]), use_cache=False)
    return out.logits[:, P - 1:-1].float() / temperature


def logprobs_of(logits, tokens):
    """log softmax(logits)[tokens] without materialising the full log-softmax: (B, R)."""
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def response_logprobs(model, batch, temperature=1.0):
    """Per-token log-probs of the response tokens under `model`: (B, R); multiply by batch['response_mask']."""
    tokens = batch["input_ids"][:, batch["prompt_len"]:]
    return logprobs_of(response_logits(model, batch, temperature), tokens) * batch["response_mask"]


def scores_per_position(model, batch):
    """The scalar head's output at every position, (B, T), from a forward pass of the whole model.

    transformers' sequence-classification models apply the head to every position and then pool; we catch
    the head's output with a hook, so the forward goes through any DDP/FSDP wrapper (gradients stay in sync)."""
    head = model
    while hasattr(head, "module"):  # DDP / FSDP1 wrappers
        head = head.module
    caught = []
    hook = head.score.register_forward_hook(lambda module, inputs, output: caught.append(output))
    try:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
              position_ids=position_ids(batch["attention_mask"]), use_cache=False)
    finally:
        hook.remove()
    return caught[0].squeeze(-1).float()


def sequence_scores(model, batch):
    """Reward-model score read at the last real token of prompt + response, whatever the padding: (B,).

    Read from the attention mask rather than by looking for pad tokens, so it stays right when pad == EOS."""
    T = batch["attention_mask"].shape[1]
    last = T - 1 - batch["attention_mask"].flip(-1).argmax(-1)  # index of the last 1 in each row
    return scores_per_position(model, batch).gather(1, last[:, None]).squeeze(1)


def token_values(critic, batch):
    """Critic values V(s_h) for the state before each response token h: (B, R), 0 on padding."""
    P = batch["prompt_len"]
    return scores_per_position(critic, batch)[:, P - 1:-1] * batch["response_mask"]


def dpo_token_rewards(dpo_model, ref_logprobs, batch, beta):
    """RTO's dense reward: beta * (log pi_dpo - log pi_ref) at every response token, (B, R), 0 on padding.

    Summed over a response it equals DPO's sentence-level implicit reward (paper sec. 4.2)."""
    return beta * (response_logprobs(dpo_model, batch) - ref_logprobs) * batch["response_mask"]


def masked_sum(x, mask, dim=None):
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x, mask, dim=None):
    return masked_sum(x, mask, dim) / (mask.sum() if dim is None else mask.sum(dim)).clamp(min=1e-8)


def masked_whiten(x, mask, shift_mean=True):
    """(x - mean) / std over the masked entries; 0 stays 0 outside the mask."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    var = var * mask.sum() / (mask.sum() - 1).clamp(min=1)  # unbiased, as torch.std
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return (out if shift_mean else out + mean) * mask


# ============================================================================ sampling
def truncate_at_eos(responses, eos_id):
    """Mask (B, R) that keeps tokens up to and including the first EOS; and whether an EOS was found (B,)."""
    is_eos = responses == eos_id
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0  # strictly after the first EOS
    return (~after_eos).float(), is_eos.any(-1)


@torch.no_grad()
def sample(model, tokenizer, prompt_ids, max_new_tokens, temperature=1.0, top_p=1.0, synced_gpus=False,
           prompt_width=None):
    """Sample responses with the KV cache. prompt_ids: list of id lists.

    Returns a batch in the common layout plus 'ended' (B,): whether the response has an EOS.
    Tokens after the first EOS are padding and masked out."""
    input_ids, attention_mask = collate_prompts(prompt_ids, tokenizer.pad_token_id, prompt_width)
    device = next(model.parameters()).device
    out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                         do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                         max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, synced_gpus=synced_gpus)
    P = input_ids.shape[1]
    responses = out[:, P:]  # (B, R)
    response_mask, ended = truncate_at_eos(responses, tokenizer.eos_token_id)
    responses = responses.masked_fill(response_mask == 0, tokenizer.pad_token_id)
    return {"input_ids": torch.cat([input_ids.to(device), responses], 1),
            "attention_mask": torch.cat([attention_mask.to(device), response_mask.long()], 1),
            "response_mask": response_mask, "prompt_len": P, "ended": ended}


def decode_responses(tokenizer, batch):
    """Response texts without the final EOS. Other special tokens stay in the text: a policy that learns to
    emit <unk> or a role marker is writing junk, and a judge must be able to see it."""
    P = batch["prompt_len"]
    texts = []
    for ids, m in zip(batch["input_ids"][:, P:], batch["response_mask"]):
        ids = ids[m.bool()].tolist()
        ids = ids[:-1] if ids and ids[-1] == tokenizer.eos_token_id else ids
        texts.append(tokenizer.decode(ids, skip_special_tokens=False).strip())
    return texts


@torch.no_grad()
def oracle_score(accelerator, model, tokenizer, prompts, max_new_tokens, batch_size=64, seed=0):
    """Mean ground-truth reward of sampled responses to built-in-task prompts (messages). Every process
    samples the same responses (same seed) in step with the others; the training RNG is left untouched."""
    model = accelerator.unwrap_model(model)
    scores = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i:i + batch_size]
            batch = sample(model, tokenizer, [encode_prompt(tokenizer, p) for p in chunk], max_new_tokens,
                           synced_gpus=accelerator.num_processes > 1)
            scores += [toy_task.oracle_reward(p, r) for p, r in zip(chunk, decode_responses(tokenizer, batch))]
    return sum(scores) / len(scores)


# ============================================================================ checkpoints
def save_model(accelerator, model, tokenizer, out_dir, extra_config=None):
    """save_pretrained (safetensors) + tokenizer, atomically: config.json is moved in last, so a crash
    mid-save never leaves a folder that from_pretrained would load."""
    accelerator.wait_for_everyone()
    state = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return
    model = accelerator.unwrap_model(model)
    if extra_config:
        for k, v in extra_config.items():
            setattr(model.config, k, v)
    tmp = os.path.join(out_dir, ".saving")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if os.path.exists(os.path.join(out_dir, "config.json")):
        os.remove(os.path.join(out_dir, "config.json"))  # the folder stops looking complete first
    for name in sorted(os.listdir(tmp), key=lambda n: n == "config.json"):
        os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
    os.rmdir(tmp)
