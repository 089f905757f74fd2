"""Judges: one score per sampled response, for evaluate.py's win rates; and rto.py's evaluation during RL.

    oracle                    the built-in task's ground truth, toy_task.oracle_reward (built-in prompts only)
    rm:<dir>                  a sequence-classification reward model, read at the last real token
    dpo:<dpo_dir>,<ref_dir>   DPO's implicit reward beta * sum_h (log pi_dpo - log pi_ref)
    py:<file.py>:<function>   your own Python function, function(prompts, responses) -> one float per response:
                              prompts as the dataset gave them (each a list of {"role", "content"} messages),
                              responses as decoded text. The file is loaded from its path; nothing to install.

parse() checks a spec and loads nothing; load() loads the models, or imports the file and probes the function
with two prompts; score() scores a batch, and score_on_every_process() does so under several processes.
Evaluation during RL (rto.py --eval_*): held_out() loads the prompts and the judge, evaluate_policy() samples,
scores and writes one evaluation, keep_best() keeps the best policy so far.
"""

import importlib.util
import json
import math
import os
import time
from dataclasses import dataclass

import accelerate.utils
import torch

import common
import data
import speed
import toy_task
from common import TOYS, arg

KINDS = "oracle, rm:<dir>, dpo:<dpo_dir>,<ref_dir> or py:<file.py>:<function>"
PROBE_RESPONSES = ["Yes.", "No."]  # the probe call's two responses


@dataclass
class EvalArgs:
    """rto.py's flags of the evaluation during RL (check_flags checks them)."""

    eval_every: int = arg(0, "evaluate every N iterations, and before and after (0: only those)")
    eval_prompts: str = arg(None, "held-out prompts, a file or hub id (built-in tasks: test split)")
    eval_num_prompts: int = arg(200, "held-out prompts per evaluation (0: no evaluation)")
    eval_judge: str = arg(
        None,
        "oracle | rm:<dir> | dpo:<dpo>,<ref> | py:<file.py>:<function> "
        "(default: oracle on the built-in tasks, none otherwise: no evaluation)",
    )
    keep_best: bool = arg(False, "keep the policy of the highest eval_score in <output_dir>/best")


def parse(spec, dataset, flag):
    """'oracle' | 'rm:<dir>' | 'dpo:<dpo_dir>,<ref_dir>' | 'py:<file.py>:<function>' -> a judge dict; `dataset`:
    the prompts it will score (the oracle knows only the built-in tasks' topics)."""
    kind, _, rest = spec.partition(":")
    judge = {"kind": kind, "spec": spec, "flag": flag, "path": rest}
    if kind == "oracle" and not rest:
        if dataset not in TOYS:
            common.fail(
                f"{flag} oracle: only for the built-in task's prompts (--dataset toy), not {dataset}"
            )
        return judge
    if kind == "rm" and rest or kind == "dpo" and is_pair(rest):
        return judge
    path, _, function = rest.rpartition(":")
    if kind == "py" and path and function.isidentifier():
        return {**judge, "path": path, "function": function}
    common.fail(f"{flag} {spec}: expected {KINDS}")


def is_pair(spec):
    return spec is not None and len(spec.split(",")) == 2 and all(spec.split(","))


def load(judge, tokenizer, device, dpo_beta, probe_prompts):
    """The judge ready to score: its models on `device` (reading the policies' token ids as they are), or the
    function, checked by one call with two of `probe_prompts`."""
    flag = f"{judge['flag']} {judge['kind']}:"
    if judge["kind"] == "rm":
        data.same_vocab(judge["path"], tokenizer, flag, "the policy")
        rm = common.load_scorer(judge["path"], tokenizer, flag)
        judge["rm"] = common.frozen(rm).to(device)
    if judge["kind"] == "dpo":
        judge.update(load_dpo_pair(judge["path"], tokenizer, flag, dpo_beta, device))
    if judge["kind"] == "py":
        judge["call"] = load_function(judge)
        prompts = (probe_prompts * 2)[:2]
        call(judge, prompts, PROBE_RESPONSES, "on a probe call with two prompts")
    return judge


def load_dpo_pair(spec, tokenizer, flag, dpo_beta, device):
    """{'dpo', 'ref', 'beta'} from '<dpo_dir>,<ref_dir>'; beta is the one the DPO model was trained with (else
    dpo_beta)."""
    models = []
    for path in spec.split(","):
        data.same_vocab(path, tokenizer, flag, "the policy")
        model = common.load_causal_lm(path, tokenizer, flag)
        models.append(common.frozen(model).to(device))
    dpo, ref = models
    return {"dpo": dpo, "ref": ref, "beta": getattr(dpo.config, "dpo_beta", None) or dpo_beta}


def load_function(judge):
    """The function `name` of the file at `path`, imported from its path (its folder need not be a package)."""
    where = f"{judge['flag']} {judge['spec']}"
    path, name = judge["path"], judge["function"]
    if not os.path.isfile(path):
        common.fail(f"{where}: no file {path}")
    module_name = "judge_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None:
        common.fail(f"{where}: {path} is not a Python file (name it <file>.py)")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # a user's file: any error is bad input, reported in one line
        common.fail(f"{where}: importing {path} raised {type(e).__name__}: {e}")
    function = getattr(module, name, None)
    if not callable(function):
        common.fail(f"{where}: {path} has no function {name}")
    return function


def call(judge, prompts, texts, when):
    """The user's function on (prompts, texts), its answer checked: one finite float per response."""
    where = f"{judge['flag']} {judge['spec']}"
    try:
        out = judge["call"](list(prompts), list(texts))
    except Exception as e:  # the user's code: one line, whatever it raised
        common.fail(f"{where}: the function raised {type(e).__name__}: {e} ({when})")
    try:
        scores = [float(s) for s in out if not isinstance(s, (str, bytes))]
        count = len(out)
    except (TypeError, ValueError):
        common.fail(f"{where}: expected a list of floats, got {type(out).__name__} ({when})")
    if len(scores) != count or count != len(texts):
        common.fail(
            f"{where}: expected {len(texts)} floats for {len(texts)} responses, got "
            f"{count} items of which {len(scores)} numbers ({when})"
        )
    if not all(map(math.isfinite, scores)):
        common.fail(f"{where}: returned a score that is not finite ({when})")
    return scores


@torch.no_grad()
def score(judge, batch, prompts, texts, when="while scoring"):
    """One score per response. batch: data.py's layout (prompt + sampled response ids); texts: decoded."""
    if judge["kind"] == "oracle":
        return [toy_task.oracle_reward(p, t) for p, t in zip(prompts, texts, strict=True)]
    if judge["kind"] == "rm":
        return speed.sequence_scores(judge["rm"], batch).tolist()
    if judge["kind"] == "dpo":  # DPO's sentence-level implicit reward
        return dpo_token_rewards(judge, batch).sum(-1).tolist()
    return call(judge, prompts, texts, when)


def score_on_every_process(accelerator, judge, batch, prompts, texts, when):
    """score() on each process's own responses; a judge that fails on any process stops every process, the main
    one with the first failure's line."""
    try:
        scores, error = score(judge, batch, prompts, texts, when), None
    except SystemExit as e:
        scores, error = None, str(e)
    errors = [e for e in gather_objects([error]) if e]
    if errors:
        if not accelerator.is_main_process:
            raise SystemExit(1)
        raise SystemExit(errors[0])
    return scores


def dpo_token_rewards(pair, batch):
    """beta * (log pi_dpo - log pi_ref) of every response token: (B, R), 0 on padding."""
    ref_logprobs = speed.response_logprobs(pair["ref"], batch)
    return pair["beta"] * (speed.response_logprobs(pair["dpo"], batch) - ref_logprobs)


# ============================================================================ evaluation during RL (rto.py)
def check_flags(args):
    """rto.py's --eval_* and --keep_best, checked before anything loads (a judge spec that does not parse too);
    on the built-in tasks the judge defaults to the oracle."""
    common.check_at_least(args, 0, "eval_every", "eval_num_prompts")
    if args.eval_judge is None and args.dataset in TOYS:
        args.eval_judge = "oracle"
    if args.eval_judge and args.eval_num_prompts:
        if args.dataset not in TOYS and not args.eval_prompts:
            common.fail(
                "--eval_judge needs --eval_prompts off the built-in tasks: a file of held-out prompts"
            )
        parse(args.eval_judge, args.eval_prompts or args.dataset, "--eval_judge")
    elif args.keep_best or args.eval_every:
        flag = "--keep_best" if args.keep_best else "--eval_every"
        common.fail(f"{flag} needs an evaluation: --eval_judge and --eval_num_prompts > 0")


def held_out(accelerator, tokenizer, args):
    """The held-out prompts, a sampling seed for each and the judge, checked by a probe call before training starts;
    None when there is no evaluation (--eval_judge unset, or --eval_num_prompts 0)."""
    if not (args.eval_judge and args.eval_num_prompts):
        return None
    dataset = args.eval_prompts or args.dataset
    prompts, _ = data.held_out_prompts(tokenizer, dataset, "test", args.eval_num_prompts, args)
    judge = parse(args.eval_judge, dataset, "--eval_judge")
    judge = load(judge, tokenizer, accelerator.device, 0.1, prompts)
    # the stream evaluate.py gives a model named "policy": it samples these same responses
    seeds = common.prompt_seeds(args.seed, "policy", len(prompts))
    return {"prompts": prompts, "seeds": seeds, "judge": judge}


def gather_objects(objects):
    """Every process's list of picklable objects (numbers and text, no tensors: NCCL's device rule does not apply,
    unlike common.reduce and gather), joined in process order."""
    return accelerate.utils.gather_object(objects)


@torch.no_grad()
def evaluate_policy(accelerator, evaluation, tokenizer, sample, kl, policy, args, step, best):
    """One response per held-out prompt, prompt k drawn with its own seed at every evaluation (never from the
    training's random state), scored by the judge. sample(prompts, seeds) -> a batch; kl(batch) -> (b,), the
    response's log pi - log pi_ref. The prompts are split across processes and the rows gathered. Writes
    <output_dir>/eval/iteration_<step>.jsonl, one line per prompt, and the eval row of metrics.jsonl; with
    --keep_best the policy in <output_dir>/best when it scores best so far (`best`). Returns the best score."""
    began = time.perf_counter()
    n = len(evaluation["prompts"])
    per = math.ceil(n / accelerator.num_processes)
    first = accelerator.process_index * per
    # the last process repeats the last prompt
    mine = [min(k, n - 1) for k in range(first, first + per)]
    prompts = [evaluation["prompts"][k] for k in mine]
    seeds = [evaluation["seeds"][k] for k in mine]
    batch = sample(prompts, seeds)
    texts = data.decode_responses(tokenizer, batch)
    when = f"at the evaluation of iteration {step}; the checkpoints so far are kept: fix it, rerun with --resume"
    scores = score_on_every_process(accelerator, evaluation["judge"], batch, prompts, texts, when)
    columns = {
        "prompt": prompts,
        "response": texts,
        "score": scores,
        "kl": kl(batch).tolist(),
        "length": batch["response_mask"].sum(-1).int().tolist(),
        "ended": batch["ended"].tolist(),
    }
    rows = [
        dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)
    ]
    rows = gather_objects(rows)[:n]  # every process: all rows, in prompt order
    if accelerator.is_main_process:
        path = os.path.join(args.output_dir, "eval", f"iteration_{step}.jsonl")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        os.replace(path + ".tmp", path)

    def mean(key):
        return sum(r[key] for r in rows) / n

    metrics = {
        "phase": "eval",
        "eval_score": mean("score"),
        "eval_kl_per_response": mean("kl"),
        "eval_response_length": mean("length"),
        "eval_eos_rate": mean("ended"),
        "eval_seconds": time.perf_counter() - began,
    }
    common.log_metrics(accelerator, args.output_dir, metrics, step)
    accelerator.print(f"eval_score {metrics['eval_score']:.4f} at iteration {step}")
    return keep_best(accelerator, policy, tokenizer, args, step, metrics["eval_score"], best)


def keep_best(accelerator, policy, tokenizer, args, step, score, best):
    """With --keep_best: the policy in <output_dir>/best, with best.json, whenever its eval_score beats the best so
    far (`best`, None at first). Returns the best score."""
    if not args.keep_best or best is not None and score <= best:
        return best
    record = json.dumps({"iteration": step, "eval_score": score})
    out = os.path.join(args.output_dir, "best")
    common.save_model(
        accelerator, policy, tokenizer, out, merge_lora=args.merge_lora, files={"best.json": record}
    )
    return score


def best_so_far(args):
    """The eval_score kept in <output_dir>/best (a resumed run's), or None."""
    path = os.path.join(args.output_dir, "best", "best.json")
    if not (args.keep_best and args.resume and os.path.exists(path)):
        return None
    with open(path) as f:
        return json.load(f)["eval_score"]
