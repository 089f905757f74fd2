"""Plumbing two or more stages share: flags, set-up and collectives, loading and saving, the optimiser step and
resumable state, logging. The fast paths are in speed.py, the LoRA adapters in lora.py (docs/design.md).

Sections, in this order:
    errors and arguments           fail(); the flag dataclasses; a stage's DEFAULTS table applied; shared checks
    set-up and distributed         the Accelerator and seed; the output folder and args.json; ending a run
    models and tokenizers          any checkpoint (hub id, folder, .gguf, the tiny Llama); the vocabulary check;
                                   training-mode noise off
    masked means and sampling      the mean over response tokens; generate with the KV cache, the EOS cut
    training step, resumable state batch sizes, the optimiser step, schedules, checkpoint-<step> save/resume
    checkpoints                    the save_pretrained hand-off between stages
    logging                        metrics.jsonl and trackers

The dataset layouts and the batch layout (prompt left-padded, response right-padded) are in data.py, the built-in
task in toy_task.py; common.py imports neither.
"""

import argparse
import dataclasses
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import sys
from argparse import ArgumentDefaultsHelpFormatter
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any, NamedTuple

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DataLoaderConfiguration,
    InitProcessGroupKwargs,
    set_seed,
)
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    HfArgumentParser,
    LlamaConfig,
    LlamaForCausalLM,
    get_scheduler,
)

import lora
import speed

# --dataset names of the built-in task and its long variant (toy_task.py)
TOY = "toy"
TOY_LONG = "toy-long"
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
    """The checks of the shared flags (RunArgs, TrainArgs, OfflineTrainArgs, LoraArgs); every stage's
    validate calls it."""
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
        lora.validate(args)
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
            InitProcessGroupKwargs(timeout=timedelta(seconds=args.collective_timeout))
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
    # reads the launcher's FSDP_* variables
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()
    # as Accelerate does on GPUs: bf16 compute, fp32 master weights
    if accelerator.mixed_precision != "no":
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
    # an adapter folder: its base, the adapter merged in (every rank reads the weights)
    if lora.is_adapter(name):
        return lora.load_merged_adapter(auto_class, name, flag, what, **kwargs)
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
            # so that every rank finds the same weights missing
            stored = checkpoint_tensor_names(path)
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
        return speed.use_packed_sdpa(disable_dropout(LlamaForCausalLM(tiny_config(tokenizer))))
    model, _ = from_checkpoint(
        AutoModelForCausalLM, name, flag, "a causal LM", weights, dtype=dtype
    )
    return speed.use_packed_sdpa(disable_dropout(model))


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
    return speed.use_packed_sdpa(disable_dropout(model))


# Attribute names of the training-mode noise that disable_dropout switches off: attention dropout is a float that
# attention modules pass to the kernel while training, not an nn.Dropout (Llama, Mistral, Qwen, GPT-NeoX), some
# models read it from the config at every forward (Falcon, GPT-Neo), and MoE routers jitter their input (Mixtral).
NOISE = ("drop", "jitter")


def disable_dropout(model):
    """Every source of training-mode noise off, so that a forward in train mode gives the numbers of one in eval mode
    (PPO's first ratio is then exactly 1): nn.Dropout modules, float dropout rates held by modules, and the
    config's (the saved config then records the 0 the model trained with)."""
    configs = [model.config, *(getattr(model.config, k, None) for k in model.config.sub_configs)]
    holders = [*model.modules(), *(c for c in configs if c is not None)]  # a text_config among them
    for holder in holders:
        if isinstance(holder, torch.nn.Dropout):
            holder.p = 0.0
        for name, value in vars(holder).items():
            if type(value) is float and any(word in name for word in NOISE):
                setattr(holder, name, 0.0)
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


def trainable(model):
    """The parameters the optimiser holds: all of them, or with an adapter only it (and a scorer's head copy)."""
    return [p for p in model.parameters() if p.requires_grad]


def cast(model, dtype):
    """Parameters in `dtype` (the tiny random model is built in float32), buffers (rotary frequencies) in float32,
    as FSDP's mixed precision leaves them in the trained models."""
    for p in model.parameters():
        p.data = p.data.to(dtype)
    for b in model.buffers():
        b.data = b.data.float() if b.is_floating_point() else b.data
    return model


# ============================================================================ masked means and sampling
# Statistics over response tokens; responses from a policy, in the batch layout, everything after the first EOS
# masked out.
def masked_mean(x, mask, dim=None):
    """The mean of x over the entries where mask is 1: all of them (dim=None) or along dim."""
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1e-8)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1e-8)


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
def response_batch(input_ids, attention_mask, responses, tokenizer, logprobs=None):
    """Sampled responses (b, R) after their left-padded prompts (b, P), in data.py's layout, cut at the first EOS
    (a response without one keeps its last token), with "ended" (b,): the response has an EOS; and, given the
    log-probs of the drawn tokens (a list of (b,) tensors, one per step), "logprobs" (b, R)."""
    response_mask, ended = truncate_at_eos(responses, tokenizer.eos_token_id)  # (b, R), (b,)
    responses = responses.masked_fill(response_mask == 0, tokenizer.pad_token_id)
    batch = {
        "input_ids": torch.cat([input_ids, responses], 1),
        "attention_mask": torch.cat([attention_mask, response_mask.long()], 1),
        "response_mask": response_mask,
        "ended": ended,
        "prompt_len": input_ids.shape[1],
    }
    if logprobs is not None:
        batch["logprobs"] = torch.stack(logprobs, 1) * response_mask  # (b, R)
    return batch


def prompt_seeds(seed, stream, n):
    """The sampling seeds of n held-out prompts (speed.sample's seeds): prompt k's seed depends on (seed, stream, k)
    alone, so it draws the same response at every evaluation whatever its batch or process, and each stream (a
    model's name in evaluate.py) draws independently of the others. 63-bit, as torch and vLLM generators take."""
    seeds = []
    for k in range(n):
        digest = hashlib.sha256(f"{seed}/{stream}/{k}".encode()).digest()
        seeds.append(int.from_bytes(digest[:8], "big") >> 1)
    return seeds


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
def save_model(
    accelerator, model, tokenizer, out_dir, extra_config=None, merge_lora=False, files=None
):
    """save_pretrained (safetensors) + tokenizer, atomically: config.json is moved in last, so a crash
    mid-save never leaves a folder that from_pretrained would load. One consolidated folder (under FSDP2 rank 0
    gathers it), in the training dtype: bfloat16 under --bf16 (the fp32 master weights rounded), else float32.
    A LoRA model (--lora_rank) is written as an adapter folder instead (save_adapter), and with merge_lora also
    merged into a plain model in <out_dir>/merged. `files`: {name: text} written into the folder with the model."""
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
        lora.save_adapter(model.lora, state, tokenizer, out_dir, extra_config, files)
        if not merge_lora:
            return
        model, state = lora.plain_model(model.lora), lora.merged_state_dict(model.lora, state)
        out_dir = os.path.join(out_dir, "merged")
    tmp = os.path.join(out_dir, ".saving")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    write_files(tmp, files)
    if os.path.exists(os.path.join(out_dir, "config.json")):
        os.remove(os.path.join(out_dir, "config.json"))  # the folder stops looking complete first
    for name in sorted(os.listdir(tmp), key=lambda n: n == "config.json"):
        os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
    os.rmdir(tmp)


def write_files(folder, files):
    """{name: text} into folder."""
    for name, text in (files or {}).items():
        with open(os.path.join(folder, name), "w") as f:
            f.write(text)


# ============================================================================ logging
# metrics.jsonl, and any tracker.
def log_metrics(accelerator, output_dir, metrics, step):
    """Append one JSON line to <output_dir>/metrics.jsonl and send the numbers to any tracker."""
    metrics = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}
    if accelerator.is_main_process:
        with open(os.path.join(output_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
    accelerator.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
