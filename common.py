"""Plumbing shared by the stages: loading, set-up, the optimiser step, checkpoints, logging.

Sections, in this order:
    errors and arguments           fail(); the flag dataclasses; a stage's DEFAULTS table applied; shared checks
    set-up and distributed         the Accelerator and seed; the output folder and args.json; ending a run
    models and tokenizers          any checkpoint (hub id, folder, .gguf, the tiny Llama); the vocabulary check
    log-probs and masked means     log-probs of given tokens, scalar-head read-outs; masked mean and sum
    sampling                       generate with the KV cache, everything after the first EOS masked
    training step, resumable state batch sizes, the optimiser step, schedules, checkpoint-<step> save/resume
    checkpoints                    the save_pretrained hand-off between stages
    adapters (LoRA)                --lora_rank: a trained adapter on a frozen base; its roles, fingerprint, export
    logging and progress           metrics.jsonl and trackers, progress bars

The dataset layouts and the batch layout (prompt left-padded, response right-padded) are in data.py, the built-in
task in toy_task.py; common.py imports neither.
"""

import argparse
import contextlib
import dataclasses
import functools
import importlib.util
import json
import os
import shutil
import sys
import time
import weakref
from argparse import ArgumentDefaultsHelpFormatter
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any, NamedTuple

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs, set_seed
from tqdm.auto import tqdm
from transformers import (
    AttentionInterface,
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    HfArgumentParser,
    LlamaConfig,
    LlamaForCausalLM,
    get_scheduler,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

TOY, TOY_LONG = (
    "toy",
    "toy-long",
)  # --dataset names of the built-in task and its long variant (toy_task.py)
TOYS = (TOY, TOY_LONG)  # every built-in task; toy_task.py takes the names from here
COLLECTIVE_TIMEOUT = 1800  # seconds, --collective_timeout's default
TINY = "tiny"  # --model_name_or_path of the small randomly initialised Llama


# ============================================================================ errors and arguments
# Bad input fails with one line. Flags are dataclasses; a flag whose good value depends on the task takes it
# from its stage's DEFAULTS table (apply_defaults), and each stage checks its values in its own validate(args).
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
    report_to: str = arg(
        "none", "Accelerate tracker for metrics besides metrics.jsonl: none | tensorboard | wandb"
    )
    skip_bad_rows: bool = arg(
        False, "skip data rows that cannot be parsed (counted) instead of failing on the first"
    )
    long_prompts: str = arg("skip", "prompts longer than --max_prompt_len: skip (counted) | fail")
    trust_remote_code: bool = arg(
        False, "let checkpoints run their own Python code (off: only built-in models)"
    )
    collective_timeout: int = arg(
        COLLECTIVE_TIMEOUT,
        "seconds a rank waits in a collective before the run fails "
        "(torch: 600); rank 0 writing a consolidated 8B checkpoint takes minutes",
    )
    config: str = arg(
        None,
        "a YAML file of 'flag: value' lines (flag names without --); a flag given on the command "
        "line overrides it, and args.json records the values the run used",
    )


@dataclass
class TrainArgs(RunArgs):
    """Flags every training stage takes (sft, dpo, reward model, rto)."""

    dataset_split: str = arg(
        "train", "split of a hub --dataset to train on (UltraFeedback: train_prefs)"
    )
    max_steps: int = arg(-1, "stop after this many optimiser steps (-1: run the epochs)")
    micro_batch_size: int = arg(
        None,
        "sequences per device per forward pass (default: the optimiser step's "
        "sequences / processes: --batch_size, or rto.py's --mini_batch_size)",
    )
    gradient_checkpointing: bool = arg(
        False, "recompute activations in the backward pass to save memory"
    )
    bf16: bool = arg(False, "bfloat16 mixed precision")
    max_grad_norm: float = arg(
        1.0, "clip each model's gradient norm to this before every optimiser step"
    )
    save_every: int = arg(
        0, "write resumable state every N optimiser steps (0: only the final model)"
    )
    save_total_limit: int = arg(1, "resumable checkpoints to keep, newest first")
    resume: bool = arg(False, "continue from the newest checkpoint-<step> in --output_dir")
    skip_nonfinite: bool = arg(
        False, "skip a step whose loss or gradient is not finite (counted) instead of stopping"
    )


@dataclass
class LoraArgs:
    """Flags of the stages that can train a LoRA adapter instead of every weight (dpo, reward model, rto)."""

    lora_rank: int = arg(
        0,
        "train a LoRA adapter of this rank on the frozen model instead of every weight "
        "(0: off; needs peft); the checkpoint is an adapter folder (docs/lora.md)",
    )
    lora_alpha: float = arg(
        16.0, "LoRA scale numerator: the adapter adds (alpha / rank) * B A to each weight"
    )
    lora_dropout: float = arg(
        0.0, "dropout on the adapters' input (rto.py: keep 0, or the first PPO ratio is not 1)"
    )
    lora_target_modules: str = arg(
        "all-linear",
        "comma-separated module names to adapt, or all-linear (every "
        "linear layer but the output head)",
    )
    merge_lora: bool = arg(
        False,
        "also write <output_dir>/merged: the adapter merged into a plain save_pretrained "
        "model that transformers loads without peft",
    )


@dataclass
class OfflineTrainArgs(TrainArgs):
    """Flags of the stages that train on a fixed dataset (sft, dpo, reward model), not on their own samples."""

    eval_fraction: float = arg(
        0.05, "held-out share of a --dataset file (the built-in task has its own test set)"
    )
    eval_steps: int = arg(50, "held-out metrics every this many optimiser steps")
    logging_steps: int = arg(10, "log training metrics every this many optimiser steps")


class Default(NamedTuple):
    """A flag's default in a stage's DEFAULTS table, by --dataset: the built-in task's, the real models' (the paper's;
    None: the flag is required) and toy-long's (None: the built-in task's; its responses are longer)."""

    toy: Any
    real: Any
    toy_long: Any = None


def parse_args(args_class, argv=None, defaults=None):
    """The command line (and the --config file's values, which it overrides) -> an args_class instance, `defaults`
    applied (apply_defaults) and the shared flags checked (validate_shared); an unknown flag or key fails. The
    stage's own validate checks the rest.

    defaults: the stage's table {flag: Default(toy=..., real=...[, toy_long=...])}, for flags whose good value
    depends on the task. Their fields default to None, and --help shows every value."""
    defaults = defaults or {}
    fields = {f.name: f for f in dataclasses.fields(args_class)}
    for flag in defaults:  # a flag with a default of its own would never take the table's
        assert fields[flag].default is None, (
            f"DEFAULTS[{flag!r}]: the field {flag} must default to None"
        )
    parser = HfArgumentParser(
        args_class, formatter_class=functools.partial(TwoDefaultsHelp, defaults=defaults)
    )
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    read_config(parser, argv)
    try:
        # look_for_args_file=False: HfArgumentParser would otherwise prepend the flags of a <script>.args file
        (args,) = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    except ValueError as e:  # leftover arguments: an unknown flag
        fail(f"{str(e).splitlines()[0]} (see --help)")
    return validate_shared(apply_defaults(args, defaults))


def read_config(parser, argv):
    """--config FILE (TRL's TrlParser style): its values become the parser's defaults, so that the command line
    overrides them, and are parsed as the same flags typed on the command line would be. A key that is not a flag
    of the stage fails with one line naming it."""
    import yaml  # a dependency of transformers

    find = argparse.ArgumentParser(add_help=False)
    find.add_argument("--config")
    path = find.parse_known_args(argv)[0].config
    if path is None:
        return
    try:
        with open(path) as f:
            values = yaml.safe_load(f)
    except OSError as e:
        fail(f"--config {path}: {e.strerror}")
    except yaml.YAMLError as e:
        fail(f"--config {path}: not valid YAML ({' '.join(str(e).split())})")
    values = {} if values is None else values  # an empty file
    if not isinstance(values, dict):
        fail(f"--config {path}: expected 'flag: value' lines (a YAML mapping)")
    actions = {
        a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "config")
    }
    for key, value in values.items():
        if key not in actions:
            fail(
                f"--config {path}: unknown key {key!r}, not a flag of this stage (keys are flag names without --; "
                "see --help)"
            )
        listed = actions[key].nargs in ("+", "*")
        if isinstance(value, (list, dict)) and not (listed and isinstance(value, list)):
            fail(f"--config {path}: {key} takes one value, not {type(value).__name__} {value}")
        if value is not None:  # as text: parsed by the flag's own type, as on the command line
            values[key] = (
                [str(v) for v in value]
                if isinstance(value, list)
                else [str(value)]
                if listed
                else str(value)
            )
    parser.set_defaults(**values)


def apply_defaults(args, defaults):
    """Every flag of the table left unset (None) takes its Default for --dataset: .toy_long on toy-long where the
    table gives one, .toy on the built-in tasks, .real otherwise. A value given on the command line, 0 included,
    is kept as it is (the stage's validate judges it)."""
    for flag, default in defaults.items():
        if getattr(args, flag) is None:
            if args.dataset == TOY_LONG and default.toy_long is not None:
                setattr(args, flag, default.toy_long)
            else:
                setattr(args, flag, default.toy if args.dataset in TOYS else default.real)
    return args


class TwoDefaultsHelp(ArgumentDefaultsHelpFormatter):
    """--help for a flag of a DEFAULTS table: '(default: 0.0003 on the built-in task, 5e-06 otherwise)', where
    argparse would say '(default: None)'. A help line that states its own default ('(default: --batch_size /
    processes)') is shown as it is."""

    def __init__(self, prog, defaults=None, **kwargs):
        super().__init__(prog, **kwargs)
        self.defaults = defaults or {}

    def _get_help_string(self, action):
        if action.dest not in self.defaults:
            return (
                action.help
                if "(default:" in (action.help or "")
                else super()._get_help_string(action)
            )
        default = self.defaults[action.dest]
        long = "" if default.toy_long is None else f"{default.toy_long} on toy-long, "
        return (
            f"{action.help} (default: {default.toy} on the built-in task, {long}"
            f"{'required' if default.real is None else default.real} otherwise)"
        )


def validate_shared(args):
    """The checks of the shared flags (RunArgs, TrainArgs, OfflineTrainArgs); every stage's validate calls it."""
    if args.long_prompts not in ("skip", "fail"):
        fail(f"--long_prompts {args.long_prompts}: expected skip or fail")
    check_at_least(args, 1, "collective_timeout")
    if isinstance(args, TrainArgs):
        if args.max_steps == 0 or args.max_steps < -1:
            fail(f"--max_steps {args.max_steps}: must be -1 (run the epochs) or at least 1")
        check_at_least(args, 1, "micro_batch_size", "save_total_limit")
        check_at_least(args, 0, "save_every")
        check_positive(args, "max_grad_norm")
    if isinstance(args, LoraArgs):
        check_at_least(args, 0, "lora_rank")
        check_between(args, "lora_dropout", 0, 0.99)
        if args.lora_rank:
            check_positive(args, "lora_alpha")
            peft_module()
        if args.merge_lora and not args.lora_rank:
            fail(
                "--merge_lora needs --lora_rank: without an adapter the checkpoint is already a plain model"
            )
    if isinstance(args, OfflineTrainArgs):
        check_at_least(args, 1, "eval_steps", "logging_steps")
        if not 0 < args.eval_fraction < 1:
            fail(f"--eval_fraction {args.eval_fraction}: must be between 0 and 1 (both excluded)")
    return args


def check_at_least(args, low, *flags):
    """validate's check of counts and sizes: fail on the first of `flags` below `low` (unset flags pass)."""
    for flag in flags:
        value = getattr(args, flag)
        if value is not None and value < low:
            fail(f"--{flag} {value}: must be at least {low}")


def check_positive(args, *flags):
    """validate's check of learning rates, scales and norms: fail on the first of `flags` that is not > 0."""
    for flag in flags:
        value = getattr(args, flag)
        if not value > 0:  # NaN fails too
            fail(f"--{flag} {value}: must be greater than 0")


def check_between(args, flag, low, high):
    """validate's check of a fraction: fail unless low <= --flag <= high."""
    value = getattr(args, flag)
    if not low <= value <= high:
        fail(f"--{flag} {value}: must be between {low} and {high}")


# ============================================================================ set-up and distributed
# One Accelerator per stage, seeded; the output folder written only once every input is checked; FSDP2 helpers.
def setup(args):
    """Accelerator + seed. Trackers start only when asked for (--report_to)."""
    trackers = {"none": None, "tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}
    if args.report_to not in trackers:
        fail(f"--report_to {args.report_to}: expected one of {', '.join(trackers)}")
    if trackers[args.report_to] and not any(
        importlib.util.find_spec(p) for p in trackers[args.report_to]
    ):
        fail(
            f"--report_to {args.report_to}: the {trackers[args.report_to][0]} package is not installed "
            f"(pip install {trackers[args.report_to][0]})"
        )
    LOAD_OPTIONS["trust_remote_code"] = args.trust_remote_code
    accelerator = Accelerator(
        # each epoch's shuffle depends only on (seed, epoch), so a resumed run sees the same batches
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        mixed_precision="bf16" if getattr(args, "bf16", False) else "no",
        log_with=None if args.report_to == "none" else args.report_to,
        project_dir=args.output_dir,
        kwargs_handlers=[
            InitProcessGroupKwargs(
                timeout=timedelta(seconds=getattr(args, "collective_timeout", COLLECTIVE_TIMEOUT))
            )
        ],
    )
    fsdp_on_cpu(accelerator)
    if accelerator.distributed_type.value == "FSDP":
        # Resumable state (save_state) sharded: each rank writes its own part, in parallel (torch distributed
        # checkpoint), instead of rank 0 gathering everything. The exported model (save_model) stays one folder.
        accelerator.state.fsdp_plugin.set_state_dict_type("SHARDED_STATE_DICT")
        # Under gradient accumulation Accelerate skips the gradient sync until the last micro-batch, and FSDP then
        # keeps whole, unsharded gradients on every rank: reduce-scatter at every micro-batch instead, so that a
        # rank only ever holds its shard of the gradient. (DDP keeps its no_sync: it saves all-reduces.)
        accelerator.gradient_state.plugin_kwargs["sync_each_batch"] = True
        plugin = accelerator.state.fsdp_plugin
        if accelerator.is_fsdp2 and plugin.mixed_precision_policy is not None:
            # Accelerate's bf16 policy computes in bf16 and also reduce-scatters the gradients in bf16; sum them in
            # float32 instead, as the fp32 master weights they update (and as DDP's fp32 gradients) are.
            plugin.mixed_precision_policy = dataclasses.replace(
                plugin.mixed_precision_policy, reduce_dtype=torch.float32
            )
    # said out loud because a wrong launch command silently runs one process
    accelerator.print(
        f"processes: {accelerator.num_processes} ({accelerator.distributed_type.value})"
    )
    set_seed(args.seed)
    return accelerator


def reduce(accelerator, x, op="sum"):
    """accelerator.reduce of a statistic (a number or a tensor, as float32) on accelerator.device: NCCL takes no CPU
    tensor. With gather() below, the only collectives on tensors in the project (tests/test_distributed.py checks
    that every call site goes through them)."""
    return accelerator.reduce(torch.as_tensor(x, dtype=torch.float).to(accelerator.device), op)


def gather(accelerator, x):
    """accelerator.gather_for_metrics of a tensor, on accelerator.device: every process's rows in data order, the
    padding that evened out the last batch dropped."""
    return accelerator.gather_for_metrics(x.to(accelerator.device))


def phase_clock(accelerator):
    """clock(name) logs the seconds since the previous call (or since phase_clock), device work included, as
    time_<name>, and on GPUs the
    peak device memory in between as memory_<name>_gb; clock.metrics holds them."""
    device = accelerator.device
    cuda, metrics, last = device.type == "cuda", {}, [time.perf_counter()]
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    def clock(name):
        if (
            device.type != "cpu"
        ):  # kernels run asynchronously: the phase ends when its device work has finished
            torch.accelerator.synchronize(device)
        now = time.perf_counter()
        metrics[f"time_{name}"], last[0] = now - last[0], now
        if cuda:
            metrics[f"memory_{name}_gb"] = torch.cuda.max_memory_allocated(accelerator.device) / 1e9
            torch.cuda.reset_peak_memory_stats(accelerator.device)

    clock.metrics = metrics
    return clock


def fsdp_on_cpu(accelerator):
    """Accelerate ignores an FSDP config when there is no GPU (and falls back to DDP); apply it by hand, so that
    the FSDP code paths run in tests on CPU processes. A no-op wherever Accelerate already set FSDP up."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if (
        os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true"
        or accelerator.is_fsdp2
        or accelerator.distributed_type == DistributedType.FSDP
    ):
        return
    for state in (accelerator.state, PartialState()):
        state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = (
        FullyShardedDataParallelPlugin()
    )  # reads the launcher's FSDP_* variables
    if (
        accelerator.mixed_precision != "no"
    ):  # as Accelerate does on GPUs: bf16 compute, fp32 master weights
        accelerator.state.fsdp_plugin.set_mixed_precision(accelerator.mixed_precision)


def prepare_output_dir(args, accelerator, derived=None):
    """Refuse to clobber a folder unless --overwrite; call only once all inputs are validated. Writes args.json:
    every flag (defaults filled in), and under "derived" the sizes the stage computed from them (`derived`:
    micro-batch, gradient accumulation, processes, ...)."""
    out, resume = args.output_dir, getattr(args, "resume", False)
    if os.path.exists(out) and os.listdir(out) and not (args.overwrite or resume):
        fail(f"--output_dir {out} already exists and is not empty; pass --overwrite to replace it")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if args.overwrite and not resume and os.path.exists(out):
            shutil.rmtree(out)
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "args.json.tmp"), "w") as f:  # what produced this folder
            json.dump({**asdict(args), "derived": derived or {}}, f, indent=1, default=str)
        os.replace(os.path.join(out, "args.json.tmp"), os.path.join(out, "args.json"))
    accelerator.wait_for_everyone()
    if args.report_to != "none":
        config = _jsonable(
            {**asdict(args), **{f"derived/{k}": v for k, v in (derived or {}).items()}}
        )
        accelerator.init_trackers(os.path.basename(os.path.abspath(out)), config=config)


def _jsonable(d):
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in d.items()}


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


def fsdp_modules(model):
    """The FSDP2-sharded modules of a model (each decoder layer and the root), or [] when it is not sharded."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered_weights(model, enabled=True):
    """Under FSDP2, all-gather every weight once on entry and reshard on exit, and no collective in between:
    generate() would otherwise all-gather every layer at every decode step, and ranks whose responses end at
    different lengths would have to step together (synced_gpus). On exit each sharded module gets back the
    reshard-after-forward setting it had: Accelerate keeps the root and the final norm + LM head gathered between
    forward and backward, which saves an all-gather per micro-step. Nothing to do for DDP or one process, nor
    with enabled=False (rto.py's vLLM engine holds its own weights)."""
    modules = fsdp_modules(model) if enabled else []
    before = {m: reshards_after_forward(m, root=m is model) for m in modules}
    for m in modules:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield model
    finally:
        for m, value in before.items():
            m.set_reshard_after_forward(value, recurse=False)
        reshard(model)


def reshards_after_forward(module, root):
    """An FSDP2 module's reshard-after-forward setting (FSDP2 has a setter only): whether its parameter groups free
    the gathered weights after forward. The root's default is decided at its first forward, and is no."""
    state = module._get_fsdp_state()
    return not (root and state._auto_reshard_after_forward) and any(
        group._reshard_after_forward for group in state._fsdp_param_groups
    )


def reshard(*models):
    """FSDP2: free the gathered full weights of every sharded module of each model (a no-grad forward leaves the
    final norm and LM head gathered). Nothing to do for DDP or one process."""
    for m in (module for model in models for module in fsdp_modules(model)):
        m.reshard()


# ============================================================================ models and tokenizers
# Every checkpoint a stage reads: a hub id, a folder, a .gguf file, or the tiny random Llama.
# Every from_pretrained call: weights from safetensors only (no pickle), remote code only with --trust_remote_code
# (setup() sets it from the flag).
LOAD_OPTIONS = {"trust_remote_code": False}


def check_model_path(name, flag):
    if name.endswith(".gguf") and not os.path.isfile(name):
        fail(f"{flag} {name}: no such .gguf file")
    if (
        name != TINY
        and not os.path.exists(name)
        and (name.startswith((".", "/", "~")) or name.count("/") != 1)
    ):
        fail(f"{flag} {name}: no such folder or file (and not a hub id of the form org/name)")


def from_pretrained_args(name, flag, model=False):
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
    except (
        Exception
    ):  # a template may reject this conversation (jinja raise_exception); then it tells us nothing
        return None
    after = text.split(mark, 1)[1].lstrip() if mark in text else ""
    ids = tokenizer(after, add_special_tokens=False)["input_ids"][:1]
    special = ids and getattr(tokenizer.added_tokens_decoder.get(ids[0]), "special", False)
    return tokenizer.convert_ids_to_tokens(ids[0]) if special else None


def load_tokenizer(name, flag="--model_name_or_path"):
    """A checkpoint's tokenizer (hub id, folder or .gguf file).

    EOS is the token that ends a response: encode_response appends it and sampling stops at it. When the chat
    template ends an assistant turn with another special token (a base model's <|endoftext|> under a ChatML
    template that ends turns with <|im_end|>), that token becomes EOS, so that responses end the way the
    template's turns do and an instruct model stops where it was taught to. Sets pad = EOS when the tokenizer
    has no pad token (masks compensate). The tiny model's tokenizer is data.build_tiny_tokenizer (sft.py)."""
    if name == TINY:
        fail(
            f"{flag} {TINY}: the small random model is sft.py's starting point only; pass a checkpoint folder"
        )
    check_model_path(name, flag)
    path, kwargs = from_pretrained_args(name, flag)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs, **LOAD_OPTIONS)
    except (OSError, ValueError) as e:
        fail(f"{flag} {name}: cannot load a tokenizer ({str(e).splitlines()[0]})")
    eot = end_of_turn_token(tokenizer)
    if eot and eot != tokenizer.eos_token:
        print(
            f"note: the chat template of {name} ends an assistant turn with {eot!r}, not its EOS "
            f"{tokenizer.eos_token!r}; using {eot!r} as EOS",
            file=sys.stderr,
        )
        tokenizer.eos_token = eot
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        print(
            f"note: tokenizer of {name} has no pad token; using EOS ({tokenizer.eos_token!r}) as pad",
            file=sys.stderr,
        )
    return tokenizer


def same_vocab(path, tokenizer, flag, first):
    """The vocabulary check: fail unless the checkpoint at `path` (given as `flag`) has `tokenizer`'s vocabulary.
    Models of one run pass token ids to each other as they are (a DPO model or a judge reads the policy's ids),
    so they must share one; `first` names where `tokenizer` came from ("--sft_ckpt", "the first model")."""
    if load_tokenizer(path, flag).get_vocab() != tokenizer.get_vocab():
        fail(
            f"{flag} {path}: its tokenizer differs from {first}'s; all models of a run must share one vocabulary"
        )


def tiny_config(tokenizer, hidden=128, layers=4):
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )


def loads_weights(accelerator):
    """False on the processes that need a model's shapes only: under FSDP2 with fsdp_cpu_ram_efficient_loading,
    the main process reads each checkpoint and Accelerate's sharding sends every rank its shard, so the others
    build the model with its weights on the meta device and read nothing (transformers alone would have every rank
    read the whole checkpoint into host memory)."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    return not (
        accelerator.is_fsdp2
        and plugin.cpu_ram_efficient_loading
        and not accelerator.is_main_process
    )


def from_checkpoint(auto_class, name, flag, what, weights=True, **kwargs):
    """auto_class.from_pretrained(name) in float32 unless dtype= says otherwise, weights from safetensors only;
    with weights=False the same model with its parameters on the meta device (buffers, such as rotary
    frequencies, computed for real). Returns (model, the checkpoint's weights that the model had to create)."""
    check_model_path(name, flag)
    if is_adapter(
        name
    ):  # an adapter folder: its base, the adapter merged in (every rank reads the weights)
        return load_merged_adapter(auto_class, name, flag, what, **kwargs)
    path, extra = from_pretrained_args(name, flag, model=True)
    try:
        if not weights:
            from accelerate import init_empty_weights

            config = AutoConfig.from_pretrained(
                path,
                **{
                    k: v for k, v in {**extra, **kwargs}.items() if k in ("gguf_file", "num_labels")
                },
                **LOAD_OPTIONS,
            )
            with init_empty_weights(include_buffers=False):
                model = auto_class.from_config(
                    config, dtype=kwargs.get("dtype", torch.float32), **LOAD_OPTIONS
                )
            model.tie_weights()  # the meta parameters are made after from_config tied them: tie them again
            stored = checkpoint_tensor_names(
                path
            )  # so that every rank finds the same weights missing
            return model, [k for k in model.state_dict() if stored is not None and k not in stored]
        model, info = auto_class.from_pretrained(
            path,
            use_safetensors=True,
            output_loading_info=True,
            **{"dtype": torch.float32, **kwargs},
            **extra,
            **LOAD_OPTIONS,
        )
    except (OSError, ValueError) as e:
        fail(f"{flag} {name}: cannot load {what} ({str(e).splitlines()[0]})")
    if getattr(model, "is_quantized", False):
        fail(
            f"{flag} {name}: loads as a quantised model, which cannot be trained or saved; use an unquantised "
            "checkpoint"
        )
    return model, info["missing_keys"]


def checkpoint_tensor_names(path):
    """The tensor names in a local folder's safetensors files, read from their headers only; None elsewhere."""
    from glob import glob

    from safetensors import safe_open

    files = glob(os.path.join(path, "*.safetensors")) if os.path.isdir(path) else []
    names = set()
    for file in files:
        with safe_open(file, "pt") as f:
            names.update(f.keys())
    return names if files else None


def load_causal_lm(
    name, tokenizer, flag="--model_name_or_path", seed=0, dtype=torch.float32, weights=True
):
    """Any causal LM by hub id, folder or .gguf file, or `tiny` (built in float32); dropout off (PPO's ratio must
    be 1 before any update). Loaded straight into `dtype`, never held in float32 first; weights=False: shapes only
    (loads_weights)."""
    if name == TINY:
        torch.manual_seed(seed)
        return use_packed_sdpa(disable_dropout(LlamaForCausalLM(tiny_config(tokenizer))))
    model, _ = from_checkpoint(
        AutoModelForCausalLM, name, flag, "a causal LM", weights, dtype=dtype
    )
    return use_packed_sdpa(disable_dropout(model))


def load_model(
    name, tokenizer, flag, scorer=False, dtype=torch.float32, weights=True, new_head=False
):
    """A causal LM, or with scorer=True a scalar-head model."""
    if scorer:
        return load_scorer(name, tokenizer, flag, dtype, weights, new_head)
    return load_causal_lm(name, tokenizer, flag, dtype=dtype, weights=weights)


def load_scorer(name, tokenizer, flag, dtype=torch.float32, weights=True, new_head=False):
    """A scalar-head model (reward model or critic): AutoModelForSequenceClassification with num_labels=1, its head
    named `score` (head_outputs reads it). The head must come from the checkpoint unless new_head=True (a critic or
    a reward model started from a causal LM): a reward model whose head transformers does not find would otherwise
    get a random one."""
    model, missing = from_checkpoint(
        AutoModelForSequenceClassification,
        name,
        flag,
        "as a sequence-classification model",
        weights,
        num_labels=1,
        dtype=dtype,
    )
    if not isinstance(getattr(model, "score", None), torch.nn.Linear):
        fail(
            f"{flag} {name}: {type(model).__name__} has no linear head named `score`; use a reward model trained "
            "by reward_model.py, or any AutoModelForSequenceClassification whose head is `score`"
        )
    if not new_head and any(k.startswith("score.") for k in missing):
        fail(
            f"{flag} {name}: the checkpoint has no weights for the reward head `score` (a causal LM, or a head "
            "stored under another name); train one with reward_model.py, or rename the head's tensors to score.*"
        )
    model.config.pad_token_id = tokenizer.pad_token_id
    return use_packed_sdpa(disable_dropout(model))


# Attribute names of the training-mode noise that disable_dropout switches off: attention dropout is a float that
# attention modules pass to the kernel while training, not an nn.Dropout (Llama, Mistral, Qwen, GPT-NeoX), some
# models read it from the config at every forward (Falcon, GPT-Neo), and MoE routers jitter their input (Mixtral).
NOISE = ("drop", "jitter")


def disable_dropout(model):
    """Every source of training-mode noise off, so that a forward in train mode gives the numbers of one in eval mode
    (PPO's first ratio is then exactly 1): nn.Dropout modules, float dropout rates held by modules, and the
    config's (the saved config then records the 0 the model trained with)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        for name, value in vars(m).items():
            if any(word in name for word in NOISE) and type(value) is float:
                setattr(m, name, 0.0)
    configs = [model.config, *(getattr(model.config, k, None) for k in model.config.sub_configs)]
    for config in (
        c for c in configs if c is not None
    ):  # a multimodal model's text_config among them
        for name, value in vars(config).items():
            if any(word in name for word in NOISE) and type(value) is float:
                setattr(config, name, 0.0)
    return model


def frozen(model):
    model.eval().requires_grad_(False)
    return model


def place_frozen(accelerator, model):
    """Put a frozen model (reference, DPO, reward model) where it runs: under FSDP2 sharded by Accelerate's own
    code, as prepare() shards the trained models (the same units, mixed precision, offload, and under
    fsdp_cpu_ram_efficient_loading the main process's weights sent to every rank); otherwise one copy per device.
    prepare() itself refuses a model that has no optimiser under FSDP2."""
    if not accelerator.is_fsdp2:
        return model.to(accelerator.device)
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    return fsdp2_prepare_model(accelerator, model)


def load_frozen(accelerator, name, tokenizer, flag, bf16=False, scorer=False):
    """A frozen model (reference, DPO model, reward model) loaded, frozen and placed: a causal LM, or a scalar-head
    model with scorer=True. With --bf16 it is stored in bfloat16: it never trains, so it needs no fp32 master. It
    is loaded straight in that dtype, and sharded or placed before the caller loads the next model."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    model = load_model(name, tokenizer, flag, scorer, dtype, weights=loads_weights(accelerator))
    return place_frozen(accelerator, frozen(cast(model, dtype)))


def cast(model, dtype):
    """Parameters in `dtype` (the tiny random model is built in float32), buffers (rotary frequencies) in float32,
    as FSDP's mixed precision leaves them in the trained models."""
    for p in model.parameters():
        p.data = p.data.to(dtype)
    for b in model.buffers():
        b.data = b.data.float() if b.is_floating_point() else b.data
    return model


# ============================================================================ log-probs and masked means
# What a model says about tokens already chosen (data.py's batch layout): log-probs, values, scores; and
# statistics over the response tokens only.
def position_ids(attention_mask):
    """Positions counted from the first real token, so left padding does not shift them (as generate does)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def pack(batch):
    """The batch with its packed layout under 'packed', which forward() then runs: the real tokens of its sequences
    end to end in one row, positions restarting at 0 for each sequence, no padding computed. 'packed' holds:
        input_ids, position_ids: (1, L), L the batch's real tokens
        sequences: each sequence's (start, end) in the row, for packed_sdpa
        index: (B, T), where in the row each token of the padded batch is (0 on padding)
        columns: (B, R), where the column predicting each response token is (the one before it; 0 if masked)"""
    real = batch["attention_mask"].bool()  # (B, T)
    lengths = real.sum(-1)  # (B,)
    ends = lengths.cumsum(0)  # (B,): where each sequence ends in the row
    positions = position_ids(real.long())  # (B, T): from 0 at each sequence's first real token
    index = ((ends - lengths)[:, None] + positions) * real  # (B, T)
    ends = ends.tolist()  # one host sync: packed_sdpa cuts the row on the host
    P, mask = (
        batch["prompt_len"],
        batch["response_mask"],
    )  # response token j is predicted at padded column P-1+j
    columns = (index[:, P - 1 : P - 1 + mask.shape[1]] * mask).long()  # (B, R)
    return {
        **batch,
        "packed": {
            "input_ids": batch["input_ids"][real][None],
            "position_ids": positions[real][None],
            "sequences": list(zip([0] + ends[:-1], ends, strict=True)),
            "index": index,
            "columns": columns,
        },
    }


def packed_sdpa(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, sequences=None, **kwargs
):
    """transformers' sdpa attention, except in two cases. Over a packed row (forward() passes its `sequences`) each
    sequence attends causally to itself alone, one kernel call per sequence, within the layer's sliding window if it
    has one: sdpa over the whole row would compute every pair of positions in it, then mask out the pairs across
    sequences (on the CPU, and on GPUs without a variable-length kernel); the mask given alongside is not read.
    Attention that sdpa cannot express here (a position bias, attention sinks) stops the run with one line. And on
    the CPU, grouped-query attention under a
    mask (padded batches, every decoding step) is left to the kernel, which has it: transformers copies the key and
    value heads out to the query heads' number first, for GPU kernels that lack it. query (b, h, L, d), key and
    value (b, h_kv, L_kv, d)."""
    grouped = query.shape[1] != key.shape[1]
    if sequences is not None:
        unsupported = [
            k for k in ("position_bias", "s_aux", "sinks", "softcap") if kwargs.get(k) is not None
        ]
        if unsupported or kwargs.get("is_causal") is False:
            fail(
                f"packed rows: {type(module).__name__} attends with {unsupported or 'no causal mask'}, which packed "
                "attention does not compute; pass --packing false"
            )
        window = kwargs.get(
            "sliding_window"
        )  # a layer of a sliding-window model: each query sees `window` keys
        outs = []
        for s, e in sequences:
            mask = (
                sliding_causal_mask(e - s, window, query.device)
                if window and e - s > window
                else None
            )
            outs.append(
                torch.nn.functional.scaled_dot_product_attention(
                    query[:, :, s:e],
                    key[:, :, s:e],
                    value[:, :, s:e],
                    attn_mask=mask,
                    dropout_p=dropout,
                    is_causal=mask is None,
                    scale=scaling,
                    enable_gqa=grouped,
                )
            )  # (1, h, e - s, d)
        out = torch.cat(outs, dim=2)  # (1, h, L, d)
    elif (
        grouped
        and attention_mask is not None
        and query.device.type == "cpu"
        and kwargs.get("position_bias") is None
    ):
        out = torch.nn.functional.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=attention_mask,
            dropout_p=dropout,
            scale=scaling,
            enable_gqa=True,
        )
    else:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    return out.transpose(1, 2).contiguous(), None


def sliding_causal_mask(n, window, device):
    """(n, n) bool: query i sees key j when 0 <= i - j < window (transformers' sliding_window_overlay)."""
    i = torch.arange(n, device=device)
    back = i[:, None] - i[None, :]  # (n, n): how far key j lies behind query i
    return (back >= 0) & (back < window)


AttentionInterface.register("sdpa_packed", packed_sdpa)
AttentionMaskInterface.register("sdpa_packed", sdpa_mask)  # padded batches: sdpa's masks


def use_packed_sdpa(model):
    """A model that attends with sdpa attends with packed_sdpa, which is the same but for packed rows."""
    if getattr(model.config, "_attn_implementation", None) == "sdpa":
        model.set_attn_implementation("sdpa_packed")
    return model


def packed_kwargs(model, rows):
    """What a packed row runs with: its positions, and for packed_sdpa its sequences with a placeholder 4D mask
    (one is passed through as is, so transformers builds no (L, L) mask that packed_sdpa would not read)."""
    config = getattr(model, "module", model).config  # DDP
    if (
        config._attn_implementation != "sdpa_packed"
    ):  # transformers finds the sequences from the positions
        return {"input_ids": rows["input_ids"], "position_ids": rows["position_ids"]}
    return {
        "input_ids": rows["input_ids"],
        "position_ids": rows["position_ids"],
        "sequences": rows["sequences"],
        "attention_mask": torch.ones(1, 1, 1, 1, dtype=torch.bool, device=rows["input_ids"].device),
    }


def forward(model, batch, **kwargs):
    """The model over a batch of the common layout: padded, or packed if it holds a layout from pack()."""
    if "packed" in batch:
        return model(**packed_kwargs(model, batch["packed"]), use_cache=False, **kwargs)
    return model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=position_ids(batch["attention_mask"]),
        use_cache=False,
        **kwargs,
    )


LOGITS_CHUNK_BYTES = (
    2**28
)  # float32 logits of at most this size (and one temporary as large) exist at once


def response_logprobs(model, batch, temperature=1.0, with_entropy=False):
    """log pi(token | prefix) of each response token, (B, R), 0 on padding; with_entropy=True also returns the
    entropy of the distribution at each of those positions, (B, R), as a statistic (no gradient).

    The model's lm_head is asked for the R + 1 last columns only (logits_to_keep; packed: the R columns of each
    sequence that predict its response tokens), and for those it returns the
    log-probs straight from the hidden states (TokenLogprobs): the (B, R, V) logits never exist whole, in the
    forward or the backward, which at V = 128,256 would be several times the size of everything else in a micro-step.
    The swap happens inside the model's own forward, so DDP and FSDP2 see an ordinary forward of the whole model.
    A head that is not a plain bias-free linear map, or a model that changes its logits after the head
    (changes_logits: soft-capping, logit scales), gets the plain computation from the full logits instead."""
    tokens, mask = batch["input_ids"][:, batch["prompt_len"] :], batch["response_mask"]  # (B, R)
    inner = getattr(model, "module", model)  # DDP
    head, caught = inner.get_output_embeddings(), {}
    fused = (
        isinstance(head, torch.nn.Linear)
        and head.bias is None
        and not changes_logits(model, head, tokens)
    )

    packed = "packed" in batch  # rto.py --packing
    keep = batch["packed"]["columns"].flatten() if packed else tokens.shape[1] + 1

    def head_to_logprobs(
        hidden,
    ):  # padded (B, R + 1, d): the columns P - 1 .. P + R - 1, the last predicts nothing
        hidden = hidden[0] if packed else hidden[:, :-1].flatten(0, 1)  # packed: (1, B * R, d)
        logprobs, entropy = TokenLogprobs.apply(
            hidden, head.weight, tokens.flatten(), temperature, with_entropy
        )
        caught["entropy"] = entropy.view(tokens.shape) if with_entropy else None
        return logprobs.view(tokens.shape)

    if fused:
        head.forward = head_to_logprobs  # an attribute of this one module, removed below
    try:
        out = forward(model, batch, logits_to_keep=keep)
    finally:
        if fused:
            del head.forward
    if fused:
        logprobs, entropy = out.logits, caught["entropy"]
    else:  # (B, R, V) logits, the plain way
        logits = (
            out.logits.view(*tokens.shape, -1) if packed else out.logits[:, :-1]
        ).float() / temperature
        logprobs = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
        entropy = torch.cat(
            [torch.special.entr(c.detach().softmax(-1)).sum(-1) for c in logits.split(16, 1)], 1
        )
    return (logprobs * mask, entropy * mask) if with_entropy else logprobs * mask


CHANGES_LOGITS = (
    weakref.WeakKeyDictionary()
)  # output head -> whether its model changes the head's output


def changes_logits(model, head, tokens):
    """Whether the model's forward changes what its head returns (Gemma's soft-capping, Cohere's and Granite's
    scales, Falcon-H1's multiplier), in which case response_logprobs' head, which returns log-probs in place of the
    logits, must not be swapped in. Found once per model by a no-grad forward of one token whose head returns a
    marker tensor: the model hands back that very tensor, or a new one it made from it. (Under gradients a second
    forward before the backward would break DDP; the no-grad probe does not.)"""
    if head not in CHANGES_LOGITS:
        made = {}

        def marker(hidden):  # float32, as the log-probs: a model's .float() returns it unchanged
            made["marker"] = hidden[..., 0].float()
            return made["marker"]

        head.forward = marker
        try:
            with torch.no_grad():
                out = model(input_ids=tokens[:1, :1], use_cache=False, logits_to_keep=1)
        finally:
            del head.forward
        CHANGES_LOGITS[head] = out.logits is not made["marker"]
    return CHANGES_LOGITS[head]


class TokenLogprobs(torch.autograd.Function):
    """log softmax(h W^T / T)[token] for N rows of hidden states h (N, d), head weight W (V, d), tokens (N,); and,
    if asked, the entropy of each row's softmax (no gradient). It works a few rows at a time (chunks) and
    keeps only h and W for the backward, which computes each chunk's logits again:
        d logp / d logits = (onehot(token) - softmax(logits)) / T,   dh = dlogits W,   dW = dlogits^T h.
    The head computes in the dtype it would in the model: bf16 under autocast or FSDP's mixed precision."""

    @staticmethod
    def forward(ctx, h, weight, tokens, temperature, with_entropy):
        device = h.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
        # rows per chunk: as many as 256 MiB of logits hold (Llama-3-8B, 2 x 1024 tokens: 4 chunks of 523 rows).
        # Each chunk reads all of W, so fewer, larger chunks run nearer the matmul rate: W is (V, d), 113 MB for
        # SmolLM2, and a chunk of a few dozen rows spends its time reading it
        w, rows = weight.to(dtype), max(1, min(len(h), LOGITS_CHUNK_BYTES // (4 * weight.shape[0])))
        logprobs, lses, entropy = (
            h.new_empty(len(h), dtype=torch.float),
            [],
            h.new_empty(len(h), dtype=torch.float),
        )
        for i in range(0, len(h), rows):
            logits = (
                torch.nn.functional.linear(h[i : i + rows].to(dtype), w).float().div_(temperature)
            )  # (n, V)
            lse = logits.logsumexp(-1)
            logprobs[i : i + rows] = logits.gather(-1, tokens[i : i + rows, None]).squeeze(-1) - lse
            if with_entropy:  # H = lse - sum p * logits
                entropy[i : i + rows] = lse - logits.sub(lse[:, None]).exp_().mul_(logits).sum(-1)
            lses.append(lse)
        ctx.save_for_backward(h, weight, tokens, torch.cat(lses))
        ctx.temperature, ctx.dtype, ctx.rows = temperature, dtype, rows
        ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad, _):
        h, weight, tokens, lse = ctx.saved_tensors
        w, rows, grad = weight.to(ctx.dtype), ctx.rows, grad.float()
        need_w = ctx.needs_input_grad[1]  # a frozen head (LoRA) needs no (V, d) fp32 gradient
        grad_h = torch.empty_like(h)
        grad_w = (
            torch.zeros(weight.shape, dtype=torch.float, device=weight.device) if need_w else None
        )
        for i in range(0, len(h), rows):
            hi, g = h[i : i + rows].to(ctx.dtype), grad[i : i + rows]
            dlogits = (
                torch.nn.functional.linear(hi, w).float().div_(ctx.temperature)
            )  # (n, V), then in place:
            dlogits.sub_(lse[i : i + rows, None]).exp_().mul_(-g[:, None])  # - softmax * g
            dlogits.scatter_add_(1, tokens[i : i + rows, None], g[:, None]).div_(ctx.temperature)
            dlogits = dlogits.to(ctx.dtype)
            grad_h[i : i + rows] = (dlogits @ w).to(h.dtype)
            if need_w:
                grad_w += (dlogits.T @ hi).float()  # (V, d), summed in float32 over the chunks
        return grad_h, grad_w.to(weight.dtype) if need_w else None, None, None, None


def head_outputs(model, batch):
    """The scalar head's output at every position, (B, T), from a forward pass of the whole model.

    transformers' sequence-classification models apply the head to every position and then pool; we catch
    the head's output with a hook, so the forward goes through any DDP/FSDP wrapper (gradients stay in sync)."""
    head = model
    while hasattr(head, "module"):  # DDP / FSDP1 wrappers
        head = head.module
    caught = []
    hook = head.score.register_forward_hook(lambda module, inputs, output: caught.append(output))
    try:
        forward(model, batch)
    finally:
        hook.remove()
    out = (
        caught[0].squeeze(-1).float()
    )  # (B, T), packed (1, L): put back where the real tokens were
    return (
        out.flatten()[batch["packed"]["index"]] * batch["attention_mask"]
        if "packed" in batch
        else out
    )


def sequence_scores(model, batch):
    """Reward-model score read at the last real token of prompt + response, whatever the padding: (B,).

    Read from the attention mask rather than by looking for pad tokens, so it stays right when pad == EOS."""
    T = batch["attention_mask"].shape[1]
    last = T - 1 - batch["attention_mask"].flip(-1).argmax(-1)  # index of the last 1 in each row
    return head_outputs(model, batch).gather(1, last[:, None]).squeeze(1)


def masked_sum(x, mask, dim=None):
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x, mask, dim=None):
    return masked_sum(x, mask, dim) / (mask.sum() if dim is None else mask.sum(dim)).clamp(min=1e-8)


# ============================================================================ sampling
# Responses from a policy, in the batch layout, with everything after the first EOS masked out.
def truncate_at_eos(responses, eos_id):
    """Mask (B, R) that keeps tokens up to and including the first EOS; and whether an EOS was found (B,)."""
    is_eos = responses == eos_id
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0  # strictly after the first EOS
    return (~after_eos).float(), is_eos.any(-1)


def left_pad(prompts, pad_id, width=None):
    """Token-id lists -> (B, P) ids and attention mask, each prompt right-aligned at width P (default: the longest),
    so that every response starts at column P: the prompt half of data.py's batch layout, and generate's input."""
    P = width or max(map(len, prompts))
    input_ids = torch.tensor(
        [[pad_id] * (P - len(p)) + list(p) for p in prompts], dtype=torch.long
    ).view(-1, P)
    attention_mask = torch.tensor(
        [[0] * (P - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long
    ).view(-1, P)
    return input_ids, attention_mask


@torch.no_grad()
def prefill(model, input_ids, attention_mask, max_new_tokens):
    """The KV cache of left-padded prompts but their last column, from one forward pass over the prompts packed
    (pack(), packed_sdpa), so none of the padding is computed; generate() given it runs the last column and goes on.
    The cache is a StaticCache with room for max_new_tokens more: decoding writes each token's keys and values in
    place, where a DynamicCache would copy the whole cache to grow it by one column at every step. Generate with
    disable_compile=True: on GPUs transformers compiles the decoding step for a StaticCache, once per cache size.
    None, and generate() runs the padded prompts itself, for attention other than packed_sdpa, for caches that are
    not full attention in every layer (sliding windows, linear attention), and while training with gradient
    checkpointing (transformers then keeps no cache)."""
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer

    B, W = input_ids.shape
    cache = StaticCache(
        config=model.config, max_cache_len=W + max_new_tokens
    )  # allocated at its first update
    full = all(
        type(layer) is StaticLayer for layer in cache.layers
    )  # full attention in every layer
    checkpointing = model.training and getattr(model, "is_gradient_checkpointing", False)
    empty = not attention_mask[:, :-1].any()  # every prompt one token long: nothing to cache
    if not full or checkpointing or empty or model.config._attn_implementation != "sdpa_packed":
        return None
    rows = pack(
        {
            "input_ids": input_ids[:, :-1],
            "attention_mask": attention_mask[:, :-1],
            "response_mask": attention_mask[:, :0],
            "prompt_len": W - 1,
        }
    )["packed"]
    packed = model(
        **packed_kwargs(model, rows), use_cache=True, logits_to_keep=1
    ).past_key_values  # (1, h, L, d)
    index = rows[
        "index"
    ].flatten()  # (B * (W - 1),): each padded position's place in the row (padding: 0, masked)
    for i, layer in enumerate(packed.layers):
        keys, values = (
            t.transpose(1, 2).flatten(0, 1)[index].unflatten(0, (B, W - 1)).transpose(1, 2)
            for t in (layer.keys, layer.values)
        )  # (B, h, W - 1, d), left-padded as the prompts
        cache.update(keys.contiguous(), values.contiguous(), i)
    return cache


@torch.no_grad()
def sample(
    model,
    tokenizer,
    prompt_ids,
    max_new_tokens,
    temperature=1.0,
    top_p=1.0,
    synced_gpus=False,
    prompt_width=None,
):
    """Sample responses with the KV cache. prompt_ids: list of id lists.

    Returns a batch in the common layout plus 'ended' (B,): whether the response has an EOS.
    Tokens after the first EOS are padding and masked out."""
    input_ids, attention_mask = left_pad(prompt_ids, tokenizer.pad_token_id, prompt_width)  # (B, P)
    P = input_ids.shape[1]
    device = next(model.parameters()).device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    # synced_gpus: every rank must run the same forwards, and prefill skips its own on a rank whose prompts are all
    # one token long
    cache = None if synced_gpus else prefill(model, input_ids, attention_mask, max_new_tokens)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        past_key_values=cache,
        do_sample=True,
        temperature=temperature,
        top_p=top_p,
        top_k=0,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        synced_gpus=synced_gpus,
        disable_compile=True,
    )
    responses = out[:, P:]  # (B, R)
    response_mask, ended = truncate_at_eos(responses, tokenizer.eos_token_id)
    responses = responses.masked_fill(response_mask == 0, tokenizer.pad_token_id)
    return {
        "input_ids": torch.cat([input_ids, responses], 1),
        "attention_mask": torch.cat([attention_mask, response_mask.long()], 1),
        "response_mask": response_mask,
        "prompt_len": P,
        "ended": ended,
    }


# ============================================================================ the training step and resumable state
# Batch sizes, the optimiser step (clipping, non-finite guard), schedules; checkpoint-<step> folders to resume.
def batch_plan(accelerator, batch_size, micro_batch_size):
    """Micro-batch and gradient-accumulation steps so that micro × processes × accumulation = global batch."""
    num_processes = accelerator.num_processes
    micro = (
        micro_batch_size if micro_batch_size is not None else max(1, batch_size // num_processes)
    )
    if batch_size % (micro * num_processes):
        fail(
            f"--batch_size {batch_size} is not divisible by --micro_batch_size {micro} × {num_processes} processes; "
            "change one of them"
        )
    accelerator.gradient_accumulation_steps = batch_size // (micro * num_processes)
    return micro, accelerator.gradient_accumulation_steps


def total_steps(batches_per_epoch, accum, epochs, max_steps):
    """Optimiser steps of a run: the epochs, or --max_steps if that is smaller."""
    steps = batches_per_epoch // accum * epochs
    return min(steps, max_steps) if max_steps > 0 else steps


def train_batches(accelerator, loader, epochs, start_step, accum):
    """Every batch of the run, epoch after epoch; on resume, starting where step `start_step` left off."""
    skip = start_step * accum
    for epoch in range(skip // len(loader), epochs):
        loader.set_epoch(epoch)
        done = skip - epoch * len(loader) if epoch == skip // len(loader) else 0
        yield from accelerator.skip_first_batches(loader, done) if done else loader


def lr_schedule(accelerator, optimizer, name, warmup_steps, steps, **kwargs):
    """A prepared transformers schedule over `steps` optimiser steps. Accelerate steps a prepared scheduler once
    per process at every optimiser step, so its length is counted in process-steps."""
    n = accelerator.num_processes
    return accelerator.prepare(
        get_scheduler(
            name, optimizer, warmup_steps * n, steps * n, scheduler_specific_kwargs=kwargs or None
        )
    )


def optimizer_step(accelerator, models, loss, optimizers, schedulers, args, where):
    """backward; at the accumulation boundary clip, step and zero (Accelerate holds the step back before it).

    Lists of models/optimizers/schedulers, so that rto.py's actor and critic share it (separate models and
    optimisers: the summed loss only saves a backward call). A non-finite loss or gradient norm stops the run with
    one line naming `where` ("step 7", "iteration 3"), or with --skip_nonfinite drops the micro-batch (the step) and
    returns False so the caller can count it."""
    if not all_finite(accelerator, loss):
        return nonfinite(args, "loss", where, optimizers)
    accelerator.backward(loss)
    if accelerator.sync_gradients:
        norms = torch.stack([clip_grad_norm(accelerator, m, args.max_grad_norm) for m in models])
        if not all_finite(accelerator, norms):
            return nonfinite(args, "gradient norm", where, optimizers)
    for optimizer, scheduler in zip(optimizers, schedulers, strict=True):
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return True


def clip_grad_norm(accelerator, model, max_norm):
    """Clip a model's gradient to max_norm; returns its norm before clipping. Under FSDP2 torch's own clipping, which
    takes the sharded (DTensor) gradients: Accelerate's finds the model by comparing parameter lists with ==, which
    for two models with as many parameter tensors (a policy with an untied LM head and its critic) compares tensors
    elementwise and fails."""
    if accelerator.is_fsdp2:
        return torch.nn.utils.clip_grad_norm_(list(model.parameters()), max_norm)
    return accelerator.clip_grad_norm_(model.parameters(), max_norm)


def all_finite(accelerator, x):
    """True on every process iff x is finite on every process (so that all ranks take the same branch)."""
    x = x.full_tensor() if hasattr(x, "full_tensor") else x  # FSDP2's gradient norm is a DTensor
    bad = (~torch.isfinite(x.detach().float())).any().float()
    return reduce(accelerator, bad).item() == 0


def nonfinite(args, what, where, optimizers):
    """A non-finite `what` at `where`: one line and stop, or with --skip_nonfinite zero the gradients and go on."""
    if not args.skip_nonfinite:
        fail(
            f"non-finite {what} at {where}; lower the learning rate, or pass --skip_nonfinite to skip it"
        )
    for optimizer in optimizers:
        optimizer.zero_grad()
    return False


def save_state(accelerator, args, step, extra=None):
    """Models, optimisers, schedulers, RNG (+ `extra`) in <output_dir>/checkpoint-<step>, written atomically;
    only the newest --save_total_limit are kept."""
    path = os.path.join(args.output_dir, f"checkpoint-{step}")
    tmp = os.path.join(args.output_dir, ".checkpoint.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()  # every rank's files (its shards, its RNG state) are written
    if accelerator.is_main_process:
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump({"step": step, **(extra or {})}, f)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
        for old in checkpoints(args.output_dir)[: -max(1, args.save_total_limit)]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def checkpoints(output_dir):
    """Complete checkpoint folders, oldest first."""
    found = []
    for name in os.listdir(output_dir) if os.path.isdir(output_dir) else []:
        if name.startswith("checkpoint-") and os.path.exists(
            os.path.join(output_dir, name, "state.json")
        ):
            found.append(os.path.join(output_dir, name))
    return sorted(found, key=lambda p: int(p.rsplit("-", 1)[1]))


def load_state(accelerator, args):
    """With --resume: restore the newest checkpoint and return its state.json; otherwise None."""
    if not args.resume:
        return None
    found = checkpoints(args.output_dir)
    if not found:
        fail(
            f"--resume: no checkpoint-<step> folder in {args.output_dir} (save some with --save_every N)"
        )
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


# ============================================================================ checkpoints
# How stages hand off: a save_pretrained folder (model + tokenizer), written atomically.
def save_model(accelerator, model, tokenizer, out_dir, extra_config=None, merge_lora=False):
    """save_pretrained (safetensors) + tokenizer, atomically: config.json is moved in last, so a crash
    mid-save never leaves a folder that from_pretrained would load. One consolidated folder (under FSDP2 rank 0
    gathers it), in the training dtype: bfloat16 under --bf16 (the fp32 master weights rounded), else float32.
    A LoRA model (--lora_rank) is written as an adapter folder instead (save_adapter), and with merge_lora also
    merged into a plain model in <out_dir>/merged."""
    accelerator.wait_for_everyone()
    state = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return
    model = accelerator.unwrap_model(model)
    if accelerator.mixed_precision == "bf16":
        state = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()}
        model.config.dtype = torch.bfloat16  # what the saved config says
    if extra_config:
        for k, v in extra_config.items():
            setattr(model.config, k, v)
    if hasattr(model, "lora"):  # add_adapter's model: its keys as the peft wrapper names them
        state = {f"base_model.model.{k}": v for k, v in state.items()}
        save_adapter(model.lora, state, tokenizer, out_dir, extra_config)
        if not merge_lora:
            return
        model, state = plain_model(model.lora), merged_state_dict(model.lora, state)
        out_dir = os.path.join(out_dir, "merged")
    tmp = os.path.join(out_dir, ".saving")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if os.path.exists(os.path.join(out_dir, "config.json")):
        os.remove(os.path.join(out_dir, "config.json"))  # the folder stops looking complete first
    for name in sorted(os.listdir(tmp), key=lambda n: n == "config.json"):
        os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
    os.rmdir(tmp)


# ============================================================================ adapters (LoRA)
# --lora_rank: the stage trains a LoRA adapter (peft) on a frozen base; the roles that share that base are the same
# model with an adapter switched on or off (AdapterView), never a second copy of it. When models may share a base:
# when their base weights are the same, checked by fingerprint() of the weights (not by a path, which can name other
# weights tomorrow). An adapter folder records its base (the path it was trained on, and that fingerprint, in
# lora_base.json); any stage given one as a checkpoint loads that base and merges the adapter in
# (load_merged_adapter), unless rto.py can put it on a base it already holds (a second adapter).
LORA_BASE = "lora_base.json"  # in an adapter folder: {"base": path, "fingerprint": ..., "config": {extra keys}}


def peft_module():
    """peft, imported only when an adapter is used; without it, one line saying how to install it."""
    if importlib.util.find_spec("peft") is None:
        fail("--lora_rank and adapter checkpoints need the peft package (pip install peft)")
    import peft

    return peft


def is_adapter(path):
    return os.path.isfile(os.path.join(path, "adapter_config.json"))


def fingerprint(model):
    """sha256 of a model's base weights: every body tensor's name and shape and its values, rounded to bfloat16 (so
    that a float32 and a bfloat16 copy of one checkpoint agree), at up to 4096 evenly spaced positions. The output
    heads (lm_head, score) are left out: a causal LM and a reward model built on the same body share it."""
    import hashlib

    digest, state = hashlib.sha256(), model.state_dict()
    if any(t.is_meta for t in state.values()):
        return None  # shapes only (loads_weights): nothing to compare
    for name, t in sorted(state.items()):
        name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        if (
            name.startswith(("lm_head.", "score."))
            or ".lora_" in name
            or ".modules_to_save." in name
        ):
            continue
        flat = t.detach().reshape(-1)
        sample = (
            flat[:: max(1, len(flat) // 4096)][:4096].to("cpu", torch.bfloat16).view(torch.int16)
        )
        digest.update(f"{name}{tuple(t.shape)}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def add_adapter(model, args, base_path, scorer=False):
    """Put a new LoRA adapter ("default") into `model`, the only trainable parameters with, for a scorer (reward
    model, critic), a trainable copy of its head `score` (the original stays, for the adapter-off role). Returns the
    same transformers model, its layers adapted: that is what the stage trains and accelerator.prepare() wraps, so
    that under FSDP2 the root is the model generate() and the forward passes call. The peft wrapper, which switches
    adapters and saves them, is model.lora, kept off the module tree; it records the base for the adapter folder
    (save_adapter): `base_path` and the weights' fingerprint."""
    peft = peft_module()
    targets = args.lora_target_modules
    config = peft.LoraConfig(
        r=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=targets if targets == "all-linear" else targets.split(","),
        modules_to_save=["score"] if scorer else None,
    )
    base_fingerprint = fingerprint(model)
    wrapper = peft.get_peft_model(model, config)
    for p in trainable(
        model
    ):  # a bf16 base (--bf16): adapters (peft keeps them in fp32) and the head copy in fp32
        p.data = p.data.float()
    model.enable_input_require_grads()  # gradient checkpointing: the frozen embeddings' output must carry a grad
    wrapper.lora_base = {
        "base": os.path.abspath(base_path) if os.path.exists(base_path) else base_path,
        "fingerprint": base_fingerprint,
    }
    object.__setattr__(model, "lora", wrapper)  # not a submodule: no cycle in the module tree
    return model


def trainable(model):
    """The parameters the optimiser holds: all of them, or with an adapter only it (and a scorer's head copy)."""
    return [p for p in model.parameters() if p.requires_grad]


@contextlib.contextmanager
def adapter_active(model, name):
    """Run model (add_adapter's) with adapter `name` on, or with name=None with every adapter off (the bare base, whose
    reward head is the original one); the trained adapter is active again afterwards. (peft's set_adapter makes
    the active adapter's weights require grad: switching back makes the trained one's do, the other's not.)"""
    wrapper = model.lora
    if name is None:
        with wrapper.disable_adapter():
            yield model
        return
    before = wrapper.active_adapter
    wrapper.set_adapter(name)
    try:
        yield model
    finally:
        wrapper.set_adapter(before)


class AdapterView:
    """A frozen role of a LoRA model, called like a model, without gradients: adapter `name` on (None: none).
    rto.py's reference is AdapterView(policy, None), its DPO model AdapterView(policy, "dpo"), its reward model
    AdapterView(critic, None), of the unwrapped trained models. `module` is that model (common.response_logprobs and
    head_outputs read it)."""

    def __init__(self, model, name):
        self.module, self.name, self.config = model, name, model.config

    def __call__(self, **kwargs):
        with torch.no_grad(), adapter_active(self.module, self.name):
            return self.module(**kwargs)

    def modules(self):  # common.reshard
        return self.module.modules()


def add_second_adapter(model, path, flag, name):
    """Load the adapter folder at `path` into `model` (add_adapter's) as frozen adapter `name`, if it was trained
    on this base (same fingerprint); returns False when it was not, or `path` is not an adapter folder."""
    if (
        not is_adapter(path)
        or adapter_base(path, flag)["fingerprint"] != model.lora.lora_base["fingerprint"]
    ):
        return False
    model.lora.load_adapter(path, adapter_name=name, is_trainable=False)
    model.lora.set_adapter("default")
    for n, p in model.named_parameters():
        p.requires_grad_(p.requires_grad and f".{name}." not in n)
    return True


def adapter_on(accelerator, model, path, flag, model_flag):
    """Whether the checkpoint at `path` is an adapter on `model`'s base weights (the same fingerprint, whatever path
    it names); an adapter on other weights stops every process, the main one with one line."""
    if not is_adapter(path):
        return False
    mine, theirs = fingerprint(model), adapter_base(path, flag)["fingerprint"]
    other = (
        mine is not None and mine != theirs
    )  # (None: this rank holds shapes only; the main process holds weights)
    if (
        reduce(accelerator, float(other)).item() > 0
    ):  # every rank takes the branch the weights decide
        if not accelerator.is_main_process:
            raise SystemExit(1)
        fail(
            f"{flag} {path}: an adapter trained on other base weights than {model_flag}'s (fingerprint {theirs}, "
            f"not {mine}); train it from the {model_flag} model, or pass a full (merged) checkpoint"
        )
    return True


def adapter_base(path, flag):
    try:
        with open(os.path.join(path, LORA_BASE)) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        fail(
            f"{flag} {path}: an adapter folder without a readable {LORA_BASE} (its base and fingerprint; write "
            f"adapters with this project's stages): {e}"
        )


def load_merged_adapter(auto_class, path, flag, what, **kwargs):
    """An adapter folder as a plain model: its recorded base loaded (checked against the recorded fingerprint),
    the adapter merged in, the extra config keys (reward_mean, dpo_beta) set. Returns (model, missing keys)."""
    peft, record = peft_module(), adapter_base(path, flag)
    base, missing = from_checkpoint(
        auto_class, record["base"], f"{flag} {path}'s base", what, **kwargs
    )
    if fingerprint(base) != record["fingerprint"]:
        fail(
            f"{flag} {path}: its base {record['base']} now holds other weights than the adapter was trained on "
            f"(fingerprint {fingerprint(base)}, recorded {record['fingerprint']})"
        )
    model = (
        peft.PeftModel.from_pretrained(base, path).merge_and_unload().requires_grad_(True)
    )  # peft froze it
    for k, v in record.get("config", {}).items():
        setattr(model.config, k, v)
    saved = set(
        peft.PeftConfig.from_pretrained(path).modules_to_save or []
    )  # a reward head comes from the adapter
    return model, [k for k in missing if k.split(".")[0] not in saved]


def save_adapter(model, state, tokenizer, out_dir, extra_config=None):
    """The adapter folder (adapter_config.json, adapter_model.safetensors: the "default" adapter and a scorer's
    head copy), the tokenizer and lora_base.json, adapter_config.json moved in last (it marks the folder whole)."""
    tmp = os.path.join(out_dir, ".saving")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(
        tmp, state_dict=state, selected_adapters=["default"], safe_serialization=True
    )
    tokenizer.save_pretrained(tmp)
    with open(os.path.join(tmp, LORA_BASE), "w") as f:
        json.dump({**model.lora_base, "config": extra_config or {}}, f, indent=1)
    if os.path.exists(os.path.join(out_dir, "adapter_config.json")):
        os.remove(os.path.join(out_dir, "adapter_config.json"))
    for name in sorted(os.listdir(tmp), key=lambda n: n == "adapter_config.json"):
        os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
    os.rmdir(tmp)


def merged_state_dict(model, state, name="default"):
    """A peft model's state dict (gathered, any dtype) -> the plain model's, adapter `name` merged in
    (merged_weights)."""
    return dict(merged_weights(model, state, name))


def merged_weights(model, state, name="default"):
    """(name, tensor) of the plain model, one at a time, from a peft model's state dict: W + s * B A for every adapted
    weight (s: the layer's scale, alpha / r, or alpha / sqrt(r) under rsLoRA; transposed for Conv1D layers), the
    head copy in place of the original head, other adapters dropped. Computed from the tensors, so it works on a
    gathered FSDP2 state dict as on one process; FSDP2's sharded tensors (DTensor) are gathered one at a time
    (vllm_engine.push takes the merged weights this way, never a whole second copy)."""

    def full(t):
        return t.full_tensor() if hasattr(t, "full_tensor") else t

    for key, value in state.items():
        plain = key.removeprefix("base_model.model.")
        if (
            ".lora_" in plain
            or ".original_module." in plain
            or (".modules_to_save." in plain and f".modules_to_save.{name}." not in plain)
        ):
            continue
        value = full(value)
        if ".base_layer." in plain:
            module = key.split(".base_layer.")[0]
            plain = plain.replace(".base_layer.", ".")
            if plain.endswith(".weight"):
                layer = model.get_submodule(
                    module
                )  # peft's LoRA layer: its own scale and weight layout
                a, b = (
                    full(state[f"{module}.lora_A.{name}.weight"]),
                    full(state[f"{module}.lora_B.{name}.weight"]),
                )
                delta = layer.scaling[name] * (b.float() @ a.float())  # (out, in)
                if layer.fan_in_fan_out:  # GPT-2's Conv1D stores its weight as (in, out)
                    delta = delta.T
                value = (value.float() + delta).to(value.dtype)
        yield plain.replace(f".modules_to_save.{name}.", "."), value


def plain_model(model):
    """A peft model's underlying transformers model with no adapter layers, on the meta device (shapes and
    config only): what save_pretrained of a merged state dict needs."""
    from accelerate import init_empty_weights

    base = model.get_base_model()
    cls = type(base)  # FSDP2 swaps the class for FSDP<cls>, a subclass of (FSDPModule, cls)
    cls = cls.__bases__[-1] if fsdp_modules(base) and cls.__name__.startswith("FSDP") else cls
    with init_empty_weights():
        return cls(base.config)


# ============================================================================ logging and progress
# metrics.jsonl (and any tracker), and progress bars on the main process.
def log_metrics(accelerator, output_dir, metrics, step):
    """Append one JSON line to <output_dir>/metrics.jsonl and send the numbers to any tracker."""
    metrics = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}
    if accelerator.is_main_process:
        with open(os.path.join(output_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
    accelerator.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)


def progress(accelerator, total, desc, initial=0):
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        disable=not accelerator.is_local_main_process,
        dynamic_ncols=True,
    )


def progress_iter(accelerator, iterable, desc):
    return tqdm(
        iterable,
        desc=desc,
        disable=not accelerator.is_local_main_process,
        dynamic_ncols=True,
        leave=False,
    )
