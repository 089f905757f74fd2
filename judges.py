"""Judges: one score per sampled response, for evaluate.py's win rates and rto.py's evaluation during RL.

    oracle                    the built-in task's ground truth, toy_task.oracle_reward (built-in prompts only)
    rm:<dir>                  a sequence-classification reward model, read at the last real token
    dpo:<dpo_dir>,<ref_dir>   DPO's implicit reward beta * sum_h (log pi_dpo - log pi_ref)
    py:<file.py>:<function>   your own Python function, function(prompts, responses) -> one float per response:
                              prompts as the dataset gave them (each a list of {"role", "content"} messages),
                              responses as decoded text. The file is loaded from its path; nothing to install.

parse() checks a spec and loads nothing; load() loads the models, or imports the file and probes the function
with two prompts; score() scores a batch, and score_on_every_process() does so under several processes.
"""

import importlib.util
import math
import os

import torch

import common
import data
import speed
import toy_task
from common import TOYS

KINDS = "oracle, rm:<dir>, dpo:<dpo_dir>,<ref_dir> or py:<file.py>:<function>"
PROBE_RESPONSES = ["Yes.", "No."]  # the probe call's two responses


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
    errors = [e for e in common.gather_objects([error]) if e]
    if errors:
        if not accelerator.is_main_process:
            raise SystemExit(1)
        raise SystemExit(errors[0])
    return scores


def dpo_token_rewards(pair, batch):
    """beta * (log pi_dpo - log pi_ref) of every response token: (B, R), 0 on padding."""
    ref_logprobs = speed.response_logprobs(pair["ref"], batch)
    return pair["beta"] * (speed.response_logprobs(pair["dpo"], batch) - ref_logprobs)
