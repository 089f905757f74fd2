"""scripts/reward_signal.py (the analysis behind the README's findings) and scripts/reproduce.py's report."""

import json
import random
import statistics
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import oracle_credit  # noqa: E402
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


def test_oracle_credit_pays_the_same_total_densely_or_at_the_end(monkeypatch):
    credit = torch.tensor([[1.0, -0.5, 2.0, 0.0], [-1.0, 0.5, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 0, 0]])
    lp, ref = torch.tensor([[-1.0, -2, -1, -1], [-1, -1, 0, 0]]), torch.tensor([[-1.5, -2, -1, -0.5], [-1, -2, 0, 0]])
    ro = {"credit": credit * mask, "response_mask": mask, "logprobs": lp * mask, "ref_logprobs": ref * mask}
    kl = -0.1 * (lp - ref) * mask
    monkeypatch.setattr(oracle_credit, "CREDIT", "dense")
    torch.testing.assert_close(oracle_credit.token_rewards(ro, None, 0.1), kl + credit * mask)
    monkeypatch.setattr(oracle_credit, "CREDIT", "sparse")
    sparse = oracle_credit.token_rewards(ro, None, 0.1)
    torch.testing.assert_close(sparse, kl + torch.tensor([[0, 0, 0, 2.5], [0, -0.5, 0, 0]]))


DRIVER = """
import json, sys
sys.path[:0] = [{scripts!r}, {root!r}]
import common, data, oracle_credit, toy_task
rows, rollout = [], oracle_credit.rollout
def spy(accelerator, policy, tokenizer, prompts, seeds, args):  # what each rollout's credit adds up to, per response
    ro = rollout(accelerator, policy, tokenizer, prompts, seeds, args)
    for p, text, credit in zip(prompts, data.decode_responses(tokenizer, ro), ro["credit"]):
        rows.append([float(credit.sum()), toy_task.oracle_reward(p, text)])
    return ro
oracle_credit.rollout = spy
oracle_credit.main(sys.argv[1:])
json.dump(rows, open({out!r}, "w"))
"""


def test_oracle_credit_run_pays_each_response_its_oracle_reward(pipeline, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(scripts=str(ROOT / "scripts"), root=str(ROOT), out=str(tmp_path / "rows.json")))
    out = subprocess.run([sys.executable, driver, "--credit", "sparse", "--sft_ckpt", pipeline["sft"], "--rm_ckpt",
                          pipeline["rm"], "--output_dir", tmp_path / "run", "--num_iterations", "1",
                          "--rollout_batch_size", "16", "--oracle_prompts", "8", "--sample_every", "0"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert len(rows) == 16
    for paid, oracle in rows:
        assert paid == pytest.approx(oracle, abs=1e-5)
    assert json.loads((tmp_path / "run" / "args.json").read_text())["reward_mode"] == "ppo"


def test_oracle_credit_refuses_a_run_without_a_credit_mode(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "oracle_credit.py"), "--sft_ckpt", tmp_path],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode != 0 and out.stderr.strip().startswith("error: --credit")
