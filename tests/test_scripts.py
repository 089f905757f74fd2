"""scripts/reward_signal.py (the analysis behind the README's findings) and scripts/reproduce.py's report."""

import json
import random
import statistics
import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import reproduce  # noqa: E402
import reward_signal  # noqa: E402
import toy_task  # noqa: E402


def test_token_credit_by_hand():
    credit, kinds = reward_signal.token_credit("tell me about fruit", "apple apple the asdf cat .".split())
    assert credit == [1.0, -1.0, -0.1, -1.0, -0.5, 1.0]  # the final "." carries the +1 of a clean ending
    assert kinds == ["on-topic, new", "on-topic, repeat", "filler", "junk or unknown", "other topic", 'final "."']
    long = ["apple", "pear", "plum", "grape", "mango", "lemon", "peach", "cherry", "the", "a", "so", "."]
    credit, _ = reward_signal.token_credit("list some fruit", long)
    assert credit[9:] == [-0.1, -0.1 - 0.5, 1.0 - 0.5]  # words 11 and 12 are past MAX_GOOD_WORDS


def test_token_credit_sums_to_the_oracle_reward():
    rng = random.Random(0)
    for prompt in toy_task.prompts("test", n=300):
        response = toy_task.behaviour_response(prompt, rng) + rng.choice(["", " . .", " apple"] + [" the"] * 12)
        credit, kinds = reward_signal.token_credit(prompt, response.split())
        assert sum(credit) == pytest.approx(toy_task.oracle_reward(prompt, response), abs=1e-9)
        assert len(kinds) == len(credit)


def test_pearson_matches_the_statistics_module():
    x, y = [1.0, 2.0, 4.0, 3.0, 7.0], [0.5, 1.0, 1.5, 3.5, 2.0]
    assert reward_signal.pearson(x, y) == pytest.approx(statistics.correlation(x, y), abs=1e-12)


def test_reward_signal_end_to_end(pipeline, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("sft", "dpo", "rm"):
        (run / name).symlink_to(pipeline[name])
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "reward_signal.py"), "--run", run, "--num_prompts",
                          "24", "--json", tmp_path / "s.json"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["responses"] == 24
    assert sum(k["tokens"] for k in s["by_kind"].values()) == s["tokens"]
    assert s["by_kind"]["EOS"]["tokens"] <= 24
    for key in ("corr_oracle_rm", "corr_oracle_dpo_sum", "corr_token_reward_credit"):
        assert -1 <= s[key] <= 1
    assert 0 <= s["token_reward_at_clip"] <= 1 and s["std_dpo_clipped_sum"] <= 0.05 * 24
    assert "| reward-model score" in out.stdout


def test_reward_signal_refuses_a_folder_without_the_models(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "reward_signal.py"), "--run", tmp_path],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode != 0 and out.stderr.strip().startswith("error:") and len(out.stderr.splitlines()) == 1


def test_reproduce_report_renders_means_and_seed_counts():
    models = ["sft", "rto"]
    per_seed = [{"models": models, "win_rates": {"sft": {"sft": .5, "rto": .3}, "rto": {"sft": .7, "rto": .5}},
                 "summary": {m: {"mean_score": v} for m, v in zip(models, (0.5, 2.0))}},
                {"models": models, "win_rates": {"sft": {"sft": .5, "rto": .6}, "rto": {"sft": .4, "rto": .5}},
                 "summary": {m: {"mean_score": v} for m, v in zip(models, (0.7, 1.0))}}]
    s = {"tune_seed": 100, "seeds": [0, 1], "tuning": {"rto": {"0.0001,0.1": 1.5}}, "best": {"rto": "0.0001,0.1"},
         "per_seed": per_seed, "ablation": {"rto_dpo_only": [1.0, 2.0]}}
    md = reproduce.report(s)
    assert "| rto | 0.550 ± 0.294 | 0.500 |" in md  # mean of 0.7 and 0.4; 1.96 * stdev / sqrt(2)
    assert "| rto | 1 | - |" in md  # rto beats sft in one seed of two
    assert "| rto_dpo_only | 1.000 | 2.000 | 1.500 |" in md
