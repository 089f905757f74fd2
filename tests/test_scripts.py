"""scripts/: reward_signal.py (the analysis behind docs/results.md's findings), reproduce.py's report, the
oracle_credit.py fork of rto.py, and pipeline.sh's command lines. The scripts run in this process
(conftest.as_if_a_process); pipeline.sh is run with a stand-in for Python that records each command line, which is
then parsed by its stage's own parser (the stages themselves run end to end in test_stages.py, test_rollout.py and
test_evaluate.py)."""

import json
import os
import random
import runpy
import shlex
import statistics
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

import common
import data
import dpo
import evaluate
import judges
import reward_model
import rto
import sft
from conftest import ROOT, as_if_a_process, run_main

sys.path.insert(0, str(ROOT / "scripts"))
import byte_level_check  # noqa: E402
import oracle_credit  # noqa: E402
import reproduce  # noqa: E402
import reward_signal  # noqa: E402

import toy_task  # noqa: E402


def test_token_credit_by_hand():
    credit, kinds = reward_signal.token_credit(
        "tell me about fruit", "apple apple the asdf cat .".split()
    )
    assert credit == [
        1.0,
        -1.0,
        -0.1,
        -1.0,
        -0.5,
        1.0,
    ]  # the final "." carries the +1 of a clean ending
    assert kinds == [
        "on-topic, new",
        "on-topic, repeat",
        "filler",
        "junk or unknown",
        "other topic",
        'final "."',
    ]
    long = [
        "apple",
        "pear",
        "plum",
        "grape",
        "mango",
        "lemon",
        "peach",
        "cherry",
        "the",
        "a",
        "so",
        ".",
    ]
    credit, _ = reward_signal.token_credit("list some fruit", long)
    assert credit[9:] == [-0.1, -0.1 - 0.5, 1.0 - 0.5]  # words 11 and 12 are past MAX_GOOD_WORDS


def test_token_credit_sums_to_the_oracle_reward():
    rng = random.Random(0)
    for prompt in toy_task.prompts("test", n=300):
        response = toy_task.behaviour_response(prompt, rng) + rng.choice(
            ["", " . .", " apple"] + [" the"] * 12
        )
        credit, kinds = reward_signal.token_credit(prompt, response.split())
        assert sum(credit) == pytest.approx(toy_task.oracle_reward(prompt, response), abs=1e-9)
        assert len(kinds) == len(credit)


def test_pearson_matches_the_statistics_module():
    x, y = [1.0, 2.0, 4.0, 3.0, 7.0], [0.5, 1.0, 1.5, 3.5, 2.0]
    assert reward_signal.pearson(x, y) == pytest.approx(statistics.correlation(x, y), abs=1e-12)


def run_reward_signal(monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", ["reward_signal.py", *map(str, argv)])
    with as_if_a_process():
        reward_signal.main()


def test_reward_signal_end_to_end(pipeline, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("sft", "dpo", "rm"):
        (run / name).symlink_to(pipeline[name])
    run_reward_signal(monkeypatch, "--run", run, "--num_prompts", 24, "--json", tmp_path / "s.json")
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["responses"] == 24
    assert sum(k["tokens"] for k in s["by_kind"].values()) == s["tokens"]
    assert s["by_kind"]["EOS"]["tokens"] <= 24
    assert all(
        key in s for key in ("corr_oracle_rm", "corr_oracle_dpo_sum", "corr_token_reward_credit")
    )
    assert 0 <= s["token_reward_at_clip"] <= 1 and s["std_dpo_clipped_sum"] <= 0.05 * 24
    assert "| reward-model score" in capsys.readouterr().out


def test_reward_signal_refuses_a_folder_without_the_models(tmp_path, monkeypatch):
    with pytest.raises(SystemExit) as e:
        run_reward_signal(monkeypatch, "--run", tmp_path)
    assert (
        e.value.code.startswith(f"error: {tmp_path}/sft is not a checkpoint folder")
        and "\n" not in e.value.code
    )


def test_reproduce_report_renders_means_and_seed_counts():
    models = ["sft", "rto"]
    per_seed = [
        {
            "models": models,
            "win_rates": {"sft": {"sft": 0.5, "rto": 0.3}, "rto": {"sft": 0.7, "rto": 0.5}},
            "summary": {m: {"mean_score": v} for m, v in zip(models, (0.5, 2.0), strict=True)},
        },
        {
            "models": models,
            "win_rates": {"sft": {"sft": 0.5, "rto": 0.6}, "rto": {"sft": 0.4, "rto": 0.5}},
            "summary": {m: {"mean_score": v} for m, v in zip(models, (0.7, 1.0), strict=True)},
        },
    ]
    s = {
        "tune_seed": 100,
        "seeds": [0, 1],
        "tuning": {"rto": {"0.0001,0.1": 1.5}},
        "best": {"rto": "0.0001,0.1"},
        "per_seed": per_seed,
        "ablation": {"rto_dpo_only": [1.0, 2.0]},
        "dataset": "toy-long",
        "control": {"oracle credit, dense": [3.0, 4.0], "oracle credit, sparse": [1.0, 3.0]},
    }
    diff = [2.0, 1.0]
    s["control_difference"] = {"mean": 1.5, "ci95": reproduce.ci95(diff)}
    md = reproduce.report(s)
    assert (
        "# The built-in task 'toy-long'" in md
        and "| oracle credit, sparse | 1.000 | 3.000 | 2.000 |" in md
    )
    assert "dense − sparse, paired by seed: +1.500 ± 0.980 (95%)" in md  # 1.96 * 0.7071 / sqrt(2)
    assert "| rto | 0.550 ± 0.294 | 0.500 |" in md  # mean of 0.7 and 0.4; 1.96 * stdev / sqrt(2)
    assert "| rto | 1 | - |" in md  # rto beats sft in one seed of two
    assert "| rto_dpo_only | 1.000 | 2.000 | 1.500 |" in md


def test_reproduce_runs_in_parallel_keeps_order_and_stops_at_a_failure():
    import threading

    started, gate = [], threading.Barrier(2, timeout=10)

    def call(i):
        started.append(i)
        if i < 2:
            gate.wait()  # the first two run at the same time, or this times out
        if i == 2:
            raise RuntimeError("run 2 failed")
        return i * i

    assert reproduce.parallel(2, [lambda i=i: call(i) for i in range(2)]) == [0, 1]
    started.clear()
    gate.reset()
    with pytest.raises(RuntimeError, match="run 2 failed"):
        reproduce.parallel(1, [lambda i=i: call(i) for i in (5, 2, 6, 7)])
    assert started == [5, 2]  # the calls after the failure never start


def test_reproduce_end_to_end_with_stand_in_runs(tmp_path, monkeypatch, capsys):
    """Every step of reproduce.py, each command replaced by a stand-in that writes what the real one would (a run's
    score is its actor lr, so the tuning must pick 1e-4); the summary holds every table, and a second call reuses
    every run."""
    calls = []

    def fake_run(script, *args):
        calls.append(script)
        argv = list(map(str, args))

        def flag(name, default=None):
            return argv[argv.index(name) + 1] if name in argv else default

        out = Path(flag("--output_dir") or flag("--json"))
        if script == "scripts/reward_signal.py":
            keys = [
                "corr_oracle_rm",
                "corr_oracle_dpo_sum",
                "corr_oracle_dpo_clipped_sum",
                "corr_token_reward_credit",
                "token_reward_at_clip",
                "std_rm_score",
                "std_dpo_clipped_sum",
            ]
            out.write_text(
                json.dumps(
                    {
                        **dict.fromkeys(keys, 0.5),
                        "by_kind": {
                            "new": {"mean_reward": 0.1},
                            ";": {"mean_reward": float("nan")},
                        },
                    }
                )
            )
            return
        out.mkdir(parents=True, exist_ok=True)
        if script == "evaluate.py":
            names = [
                m.split("=")[0] for m in argv[argv.index("--models") + 1 : argv.index("--judge")]
            ]
            (out / "winrates.json").write_text(
                json.dumps(
                    {
                        "models": names,
                        "win_rates": {a: {b: 0.5 for b in names} for a in names},
                        "summary": {m: {"mean_score": 1.0} for m in names},
                    }
                )
            )
            return
        (out / "config.json").write_text("{}")
        if script in ("rto.py", "scripts/oracle_credit.py"):
            score = float(flag("--actor_lr")) * 1e4 + (script != "rto.py") * float(
                flag("--credit") == "dense"
            )
            rows = [{"policy_loss": 0, "oracle_reward": score}] * 5 + [
                {"phase": "eval", "eval_score": score}
            ]
            (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            (out / "args.json").write_text(
                json.dumps({k[2:]: v for k, v in zip(argv[::2], argv[1::2], strict=False)})
            )

    monkeypatch.setattr(reproduce, "run", fake_run)
    monkeypatch.setattr(
        sys,
        "argv",
        ["reproduce.py", "--out", str(tmp_path), "--datasets", "toy-long", "--seeds", "0", "1"],
    )
    reproduce.main()
    s = json.load(open(tmp_path / "toy-long" / "summary.json"))
    # the first of the two best-scoring points
    assert s["best"] == {m: "0.0001,0.05" for m in reproduce.METHODS}
    assert s["budget"]["rto 1/8"] == [1.0, 1.0] and s["control_difference"]["mean"] == 1.0
    assert (
        set(s["ablation"]) == {*reproduce.VARIANTS, *reproduce.METHODS}
        and len(s["signal"]["rto"]) == 2
    )
    assert "toy-long: reproduction took" in capsys.readouterr().out
    md = (tmp_path / "toy-long" / "summary.md").read_text()
    # a kind of word the task never produced
    assert "| new | +0.1000 | +0.1000 |" in md and "| ; |" not in md
    # 3 seeds x 3 stages + 12 tuning + 6 + 2 evaluations + 12 budget + 4 signals + 8 ablations
    n = len(calls)
    assert n == 9 + 12 + 6 + 2 + 12 + 4 + 8
    reproduce.main()
    assert calls[n:] == ["scripts/reward_signal.py"] * 4  # only the analyses are redone


def test_oracle_credit_pays_the_same_total_densely_or_at_the_end(monkeypatch):
    credit = torch.tensor([[1.0, -0.5, 2.0, 0.0], [-1.0, 0.5, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 0, 0]])
    lp, ref = (
        torch.tensor([[-1.0, -2, -1, -1], [-1, -1, 0, 0]]),
        torch.tensor([[-1.5, -2, -1, -0.5], [-1, -2, 0, 0]]),
    )
    ro = {
        "credit": credit * mask,
        "response_mask": mask,
        "logprobs": lp * mask,
        "ref_logprobs": ref * mask,
    }
    kl = -0.1 * (lp - ref) * mask
    monkeypatch.setattr(oracle_credit, "CREDIT", "dense")
    torch.testing.assert_close(oracle_credit.token_rewards(ro, None, 0.1), kl + credit * mask)
    monkeypatch.setattr(oracle_credit, "CREDIT", "sparse")
    sparse = oracle_credit.token_rewards(ro, None, 0.1)
    torch.testing.assert_close(sparse, kl + torch.tensor([[0, 0, 0, 2.5], [0, -0.5, 0, 0]]))


def test_oracle_credit_run_pays_each_response_its_oracle_reward(pipeline, tmp_path, monkeypatch):
    rows = []

    # what each rollout's credit adds up to
    def spy(accelerator, policy, tokenizer, prompts, seeds, args):
        ro = rollout(accelerator, policy, tokenizer, prompts, seeds, args)
        for p, text, credit in zip(
            prompts, data.decode_responses(tokenizer, ro), ro["credit"], strict=True
        ):
            rows.append([float(credit.sum()), toy_task.oracle_reward(p, text)])
        return ro

    rollout = oracle_credit.rollout
    monkeypatch.setattr(oracle_credit, "rollout", spy)
    # oracle_credit.main patches rto's: put them back afterwards
    for name in ("rollout", "token_rewards"):
        monkeypatch.setattr(rto, name, getattr(rto, name))
    monkeypatch.setattr(oracle_credit, "CREDIT", None)
    run_main(
        "scripts/oracle_credit.py",
        "--credit",
        "sparse",
        "--sft_ckpt",
        pipeline["sft"],
        "--rm_ckpt",
        pipeline["rm"],
        "--output_dir",
        tmp_path / "run",
        "--num_iterations",
        "1",
        "--rollout_batch_size",
        "16",
        "--eval_num_prompts",
        "0",  # the spy sees the training rollout alone
        "--sample_every",
        "0",
    )
    assert len(rows) == 16
    for paid, oracle in rows:
        assert paid == pytest.approx(oracle, abs=1e-5)
    assert json.loads((tmp_path / "run" / "args.json").read_text())["reward_mode"] == "ppo"


def test_oracle_credit_refuses_a_run_without_a_credit_mode(tmp_path):
    with pytest.raises(SystemExit) as e:
        run_main("scripts/oracle_credit.py", "--sft_ckpt", tmp_path)
    assert e.value.code.startswith("error: --credit")


# ---------------------------------------------------------------------------- scripts/pipeline.sh
RECORDER = """#!/usr/bin/env bash
for a in "$@"; do printf '%q ' "$a"; done >> "$RECORD"
echo >> "$RECORD"
"""
STAGES = {
    "sft.py": sft,
    "dpo.py": dpo,
    "reward_model.py": reward_model,
    "rto.py": rto,
    "evaluate.py": evaluate,
}


def pipeline_commands(tmp_path, quick):
    """Run scripts/pipeline.sh with PY a stand-in that records its arguments: [[script, *argv], ...]."""
    py = tmp_path / "py"
    py.write_text(RECORDER)
    py.chmod(0o755)
    record, out = tmp_path / f"commands{quick}.txt", tmp_path / "out"
    env = {**os.environ, "PY": str(py), "OUT": str(out), "RECORD": str(record), "SEED": "3"}
    env.pop("QUICK", None)
    env.update({"QUICK": "1"} if quick else {})
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "pipeline.sh")], env=env, check=True, capture_output=True
    )
    return [shlex.split(line) for line in record.read_text().splitlines() if line.strip()], out


@pytest.mark.parametrize("quick", [True, False], ids=["QUICK=1", "full"])
def test_pipeline_script_runs_valid_command_lines_that_hand_on_each_checkpoint(
    tmp_path, quick, capsys
):
    commands, out = pipeline_commands(tmp_path, quick)
    assert [c[0] for c in commands] == [
        "toy_task.py",
        "sft.py",
        "dpo.py",
        "reward_model.py",
        "rto.py",
        "rto.py",
        "rto.py",
        "evaluate.py",
    ]
    assert commands[0] == ["toy_task.py"]
    written = set()  # output folders of the commands so far
    for script, *argv in commands[1:]:
        module = STAGES[script]
        # an unknown flag exits here
        args = module.validate(common.parse_args(module.Args, argv, module.DEFAULTS))
        assert args.dataset == common.TOY and args.seed == 3 and args.overwrite, (script, argv)
        if script == "evaluate.py":
            models = evaluate.parse_models(args.models)
            assert list(models) == ["sft", "dpo", "ppo", "dppo", "rto"] and args.judge == "oracle"
            judges.parse(args.judge, args.dataset, "--judge")
            needs = [*models.values(), *args.curves, *args.token_reward_dpo.split(",")]
            assert args.show_token_rewards > 0 and args.num_prompts == (16 if quick else 400)
        else:
            needs = [
                getattr(args, f)
                for f in ("sft_ckpt", "dpo_ckpt", "rm_ckpt")
                if getattr(args, f, None)
            ]
        if script == "rto.py":
            rto.batch_sizes(args, 1)
            # None: one pass over the prompts
            assert args.num_iterations == (1 if quick else None), argv
        elif script != "evaluate.py":
            # QUICK: a few steps; otherwise the defaults
            assert args.max_steps == (3 if quick else -1), argv
        assert set(needs) <= written, (
            script,
            set(needs) - written,
        )  # each input is an earlier command's output
        assert args.output_dir.startswith(str(out)) and args.output_dir not in written
        written.add(args.output_dir)
    assert [c[c.index("--reward_mode") + 1] for c in commands if c[0] == "rto.py"] == [
        "rto",
        "ppo",
        "dppo",
    ]
    # the first command: the task's numbers
    with as_if_a_process(), mock.patch.object(sys, "argv", commands[0]):
        runpy.run_path(str(ROOT / "toy_task.py"), run_name="__main__")
    assert "label_agreement: " in capsys.readouterr().out


# ---------------------------------------------------------------------------- scripts/byte_level_check.py
def test_byte_level_check_wires_the_task_through_the_dataset_file_path(
    tmp_path, monkeypatch, capsys
):
    """Its commands parse with each stage's own parser, read the pairs file as a user's dataset (no built-in
    task defaults), and train plain DPO and RPO from its SFT model; the judge's table is printed and saved."""
    commands = []
    monkeypatch.setattr(
        byte_level_check, "run", lambda script, *a: commands.append([script, *map(str, a)])
    )
    judged = []

    def fake_judge(folder, prompts, seed, max_new_tokens):
        judged.append((Path(folder).name, len(prompts), max_new_tokens))
        return {
            "oracle": 1.0,
            "ci95": 0.1,
            "well_formed": 0.5,
            "eos_rate": 1.0,
            "example": "apple .",
        }

    monkeypatch.setattr(byte_level_check, "judge", fake_judge)
    monkeypatch.setattr(
        sys, "argv", ["byte_level_check.py", "--out", str(tmp_path), "--num_prompts", "6"]
    )
    byte_level_check.main()
    pairs = (tmp_path / "pairs.jsonl").read_text().splitlines()
    assert len(pairs) == 4000 and set(json.loads(pairs[0])) == {"prompt", "chosen", "rejected"}
    assert [c[0] for c in commands] == ["sft.py", "dpo.py", "dpo.py", "dpo.py"]
    parsed = [
        STAGES[script].validate(
            common.parse_args(STAGES[script].Args, argv + ["--overwrite"], STAGES[script].DEFAULTS)
        )
        for script, *argv in commands
    ]
    assert all(
        a.dataset == str(tmp_path / "pairs.jsonl") and a.max_response_len == 160 for a in parsed
    )
    assert [a.nll_coef for a in parsed[1:]] == [0.0, 0.2, 1.0]
    assert {a.sft_ckpt for a in parsed[1:]} == {parsed[0].output_dir}
    assert judged == [
        ("sft", 6, 160),
        ("dpo_nll0", 6, 160),
        ("dpo_nll0.2", 6, 160),
        ("dpo_nll1", 6, 160),
    ]
    assert set(json.load(open(tmp_path / "summary.json"))) == {
        "sft",
        "dpo (plain, --nll_coef 0)",
        "dpo (RPO, --nll_coef 0.2)",
        "dpo (RPO, --nll_coef 1)",
    }
    assert "| dpo (RPO, --nll_coef 0.2) | 1.000 ± 0.100 | 0.500 |" in capsys.readouterr().out


def test_byte_level_check_counts_only_the_tasks_words_as_well_formed():
    assert byte_level_check.well_formed("apple plum .")
    assert not byte_level_check.well_formed("apple  plum .")  # a stray space
    assert not byte_level_check.well_formed(
        "apple pl\xe2um ."
    ) and not byte_level_check.well_formed("user: apple")
