"""rto.py's evaluation during RL (--eval_every, --eval_judge, --keep_best) and the judges of judges.py, evaluate.py's
too: what is logged agrees with what is written, a py: judge scores what the function returns, evaluation leaves
the training run unchanged, best/ holds the best evaluation's policy, and bad input stops the run with one line."""

import json

import pytest
import torch
from safetensors.torch import load_file

import judges
from conftest import iteration_metrics, read_jsonl, read_metrics, rto_cmd, run_main

# a judge of its own: position-independent, so one response's score is the function of it alone
JUDGE = """
def score(prompts, responses):
    assert all(isinstance(p, list) and p[-1]["role"] == "user" for p in prompts)
    return [len(r) / 10 - r.count("e") for r in responses]
"""
SMALL = [
    "--num_iterations",
    4,
    "--rollout_batch_size",
    16,
    "--mini_batch_size",
    8,
    "--max_new_tokens",
    12,
    "--eval_num_prompts",
    12,
]


def score(prompts, responses):  # JUDGE's function, here
    return [len(r) / 10 - r.count("e") for r in responses]


def judge_file(tmp_path, text=JUDGE):
    path = tmp_path / "my_judge.py"
    path.write_text(text)
    return path


def evals(folder):
    return [m for m in read_metrics(folder) if m.get("phase") == "eval"]


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def with_eval(pipeline, tmp_path_factory):
    """A run evaluated by a py: judge before, at every iteration and after, keeping the best policy."""
    tmp = tmp_path_factory.mktemp("with_eval")
    spec = f"py:{judge_file(tmp)}:score"
    out = tmp / "run"
    run_main(
        "rto.py",
        *rto_cmd(pipeline, out, *SMALL, "--eval_every", 1, "--eval_judge", spec, "--keep_best"),
    )
    return out, spec


def test_each_eval_row_is_the_mean_of_its_file_and_a_py_judge_scores_what_the_function_returns(
    with_eval,
):
    out, _ = with_eval
    rows = evals(out)
    assert [m["step"] for m in rows] == [0, 1, 2, 3, 4]
    for m in rows:
        lines = read_jsonl(out / "eval" / f"iteration_{m['step']}.jsonl")
        assert len(lines) == 12
        assert m["eval_score"] == pytest.approx(sum(r["score"] for r in lines) / 12, abs=1e-6)
        assert m["eval_kl_per_response"] == pytest.approx(
            sum(r["kl"] for r in lines) / 12, abs=1e-6
        )
        assert m["eval_response_length"] == pytest.approx(
            sum(r["length"] for r in lines) / 12, abs=1e-6
        )
        assert m["eval_eos_rate"] == pytest.approx(sum(r["ended"] for r in lines) / 12, abs=1e-6)
        assert m["eval_seconds"] > 0
        # the function's own numbers, exactly
        assert [r["score"] for r in lines] == score(
            [r["prompt"] for r in lines], [r["response"] for r in lines]
        )
    assert rows[0]["eval_kl_per_response"] == 0  # the policy is the reference before training
    assert rows[-1]["eval_kl_per_response"] != 0
    first, last = (read_jsonl(out / "eval" / f"iteration_{k}.jsonl") for k in (0, 4))
    assert [r["prompt"] for r in first] == [r["prompt"] for r in last]  # the same held-out prompts
    assert [r["response"] for r in first] != [r["response"] for r in last]


def test_best_holds_the_policy_of_the_highest_score_and_evaluate_py_scores_it_as_the_run_did(
    with_eval, tmp_path
):
    out, spec = with_eval
    rows = evals(out)
    top = max(
        rows, key=lambda m: m["eval_score"]
    )  # the first of equals: a later tie does not replace it
    best = json.loads((out / "best" / "best.json").read_text())
    assert best["iteration"] == top["step"] and best["eval_score"] == pytest.approx(
        top["eval_score"], abs=1e-6
    )
    # evaluate.py, a model named policy with the run's seed: the run's responses and scores of that iteration
    run_main(
        "evaluate.py",
        "--models",
        f"policy={out / 'best'}",
        "--judge",
        spec,
        "--num_prompts",
        12,
        "--max_new_tokens",
        12,
        "--output_dir",
        tmp_path / "eval",
    )
    mine = read_jsonl(tmp_path / "eval" / "responses.jsonl")
    theirs = read_jsonl(out / "eval" / f"iteration_{top['step']}.jsonl")
    assert [r["response"] for r in mine] == [r["response"] for r in theirs]
    assert [r["score"] for r in mine] == [r["score"] for r in theirs]
    if top["step"] == 4:  # best/ then holds the final weights
        final, kept = weights(out), weights(out / "best")
        assert all(torch.equal(final[k], kept[k]) for k in final)


def test_evaluation_on_or_off_trains_the_same_run(with_eval, pipeline, tmp_path):
    out, _ = with_eval
    off = tmp_path / "off"
    run_main("rto.py", *rto_cmd(pipeline, off, *SMALL[:-2], "--eval_num_prompts", 0))
    assert not evals(off) and not (off / "eval").exists()
    assert iteration_metrics(off) == iteration_metrics(out)
    on, no = weights(out), weights(off)
    assert on.keys() == no.keys() and all(torch.equal(on[k], no[k]) for k in on)


# ---------------------------------------------------------------------------- bad input: one line, nothing written
@pytest.mark.parametrize(
    "text, spec, message",
    [
        (None, "py:nofile", "--eval_judge py:nofile: expected oracle, rm:<dir>"),
        (None, "judge", "--eval_judge judge: expected oracle"),
        (None, "py:{dir}/missing.py:score", "no file {dir}/missing.py"),
        (JUDGE, "py:{path}:scorer", "{path} has no function scorer"),
        ("import nothing_here\n", "py:{path}:score", "importing {path} raised ModuleNotFoundError"),
        ("def score(p, r):\n    return 1 / 0\n", "py:{path}:score", "raised ZeroDivisionError"),
        (
            "def score(p, r):\n    return [1.0]\n",
            "py:{path}:score",
            "expected 2 floats for 2 responses",
        ),
        (
            "def score(p, r):\n    return 3.0\n",
            "py:{path}:score",
            "expected a list of floats, got float",
        ),
        ("def score(p, r):\n    return ['a', 'b']\n", "py:{path}:score", "expected 2 floats"),
        ("def score(p, r):\n    return [float('nan')] * 2\n", "py:{path}:score", "not finite"),
    ],
)
def test_a_bad_judge_stops_the_run_before_training_with_one_line(
    pipeline, tmp_path, text, spec, message
):
    path = judge_file(tmp_path, text) if text else tmp_path / "none.py"
    spec, message = (s.format(path=path, dir=tmp_path) for s in (spec, message))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        run_main("rto.py", *rto_cmd(pipeline, out, *SMALL, "--eval_judge", spec))
    assert str(e.value).startswith("error: --eval_judge") and message in str(e.value), e.value
    assert "\n" not in str(e.value) and not out.exists()
    if text and "probe" not in message and spec.endswith(":score") and "def score" in text:
        assert "on a probe call with two prompts" in str(e.value)


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--dataset", "{prompts}", "--eval_judge", "py:{path}:score"],
            "--eval_judge needs --eval_prompts",
        ),
        (
            ["--eval_prompts", "{prompts}", "--eval_judge", "oracle"],
            "--eval_judge oracle: only for the built-in",
        ),
        (["--eval_num_prompts", 0, "--keep_best"], "--keep_best needs an evaluation"),
        (["--eval_num_prompts", 0, "--eval_every", 2], "--eval_every needs an evaluation"),
        (["--eval_every", -1], "--eval_every"),
    ],
)
def test_evaluation_flags_that_cannot_work_stop_with_one_line(pipeline, tmp_path, argv, message):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": f"tell me about fruit {k}"}) + "\n" for k in range(4))
    )
    argv = [str(a).format(prompts=prompts, path=judge_file(tmp_path)) for a in argv]
    with pytest.raises(SystemExit, match=message):
        run_main("rto.py", *rto_cmd(pipeline, tmp_path / "out", *argv))
    assert not (tmp_path / "out").exists()


def test_a_judge_that_fails_mid_run_stops_with_one_line_and_the_run_resumes(pipeline, tmp_path):
    """The judge passes its probe and the first evaluation, then raises at the second (iteration 2): one line, the
    checkpoint of iteration 1 kept, and --resume with a working judge finishes the run."""
    flaky = judge_file(
        tmp_path,
        "calls = []\n"
        "def score(prompts, responses):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 3:\n"
        "        raise RuntimeError('the judge server went away')\n"
        "    return [0.0] * len(responses)\n",
    )
    out = tmp_path / "run"
    argv = [*SMALL, "--eval_every", 2, "--save_every", 1]
    with pytest.raises(SystemExit) as e:
        run_main("rto.py", *rto_cmd(pipeline, out, *argv, "--eval_judge", f"py:{flaky}:score"))
    assert "RuntimeError: the judge server went away" in str(e.value)
    assert "evaluation of iteration 2" in str(e.value) and "--resume" in str(e.value)
    assert (out / "checkpoint-2" / "state.json").exists() is False and (
        out / "checkpoint-1"
    ).exists()
    good = judge_file(
        tmp_path, "def score(prompts, responses):\n    return [0.0] * len(responses)\n"
    )
    run_main(
        "rto.py", *rto_cmd(pipeline, out, *argv, "--eval_judge", f"py:{good}:score", "--resume")
    )
    assert [m["step"] for m in evals(out)] == [0, 2, 4]


def test_judge_specs_parse_into_their_kinds():
    assert (
        judges.parse("py:dir/my.judge.py:fn", "prompts.jsonl", "--judge")["path"]
        == "dir/my.judge.py"
    )
    assert judges.parse("dpo:a,b", "toy", "--judge")["kind"] == "dpo"
    with pytest.raises(SystemExit, match="expected oracle, rm"):
        judges.parse("py:file.py:not-a-name", "toy", "--judge")


def test_held_out_prompts_from_a_file_are_its_first_that_fit(pipeline, tmp_path):
    prompts = tmp_path / "held_out.jsonl"
    texts = ["tell me about fruit", "tell me " * 30, "list some space now", "hello describe music"]
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    out = tmp_path / "run"
    spec = f"py:{judge_file(tmp_path)}:score"
    run_main(
        "rto.py",
        *rto_cmd(pipeline, out, *SMALL[:-2], "--num_iterations", 1, "--eval_num_prompts", 2),
        *["--eval_prompts", prompts, "--eval_judge", spec],
    )
    rows = read_jsonl(out / "eval" / "iteration_1.jsonl")
    assert [r["prompt"][-1]["content"] for r in rows] == [
        texts[0],
        texts[2],
    ]  # the long one skipped
