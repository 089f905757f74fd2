"""The built-in tasks (toy_task.py): determinism and disjoint splits, the oracle by hand on toy and toy-long, noisy
but informative preference labels, and toy-long wired through every stage's defaults."""

import pytest

import common
import data
import toy_task


def test_task_is_deterministic_and_splits_are_disjoint():
    assert toy_task.preference_data("train", 50, seed=3) == toy_task.preference_data(
        "train", 50, seed=3
    )
    assert toy_task.sft_data("train", 50, seed=3) != toy_task.sft_data("train", 50, seed=4)
    train = {p[0]["content"] for p in toy_task.prompts("train", 500)}
    test = {p[0]["content"] for p in toy_task.prompts("test", 500)}
    assert train and test and not train & test


def test_oracle_prefers_what_it_should():
    p = "please tell me about fruit"

    def r(text):
        return toy_task.oracle_reward(p, text)

    assert r(toy_task.best_response(p)) == toy_task.best_reward() == 9.0
    assert r("apple pear .") == 3.0  # two new on-topic words + clean ending
    assert r("apple apple .") == 1.0  # a repeat costs what the first one gave
    assert r("apple pear") == 2.0  # no clean ending
    assert r("apple cat .") == 1.5  # another topic's word
    assert r("apple asdf .") == 1.0  # junk
    assert r("apple . pear .") == 1.0  # "." in the middle is junk (-1) and spoils the ending bonus
    long = (
        "apple pear plum grape mango lemon peach cherry the a and ."  # 12 words: 2 over the limit
    )
    assert r(long) == pytest.approx(8 - 0.3 + 1 - 1.0)
    assert toy_task.topic_of([{"role": "user", "content": "hi describe space now"}]) == "space"


def test_long_task_oracle_by_hand():
    """toy-long: four sections in the prompt's order, separated by ";", each word judged by its section's topic."""
    p = [{"role": "user", "content": "hi tell me about fruit then tools then space then music"}]
    assert toy_task.is_long(p) and toy_task.topics_of(p) == ["fruit", "tools", "space", "music"]

    def r(text):
        return toy_task.oracle_reward(p, text)

    best = toy_task.best_response(p)
    assert r(best) == toy_task.best_reward("toy-long") == 65.0 and len(best.split()) == 68
    assert r("apple ; hammer ; star ; drum .") == 5.0  # 4 new words + clean ending
    # drum in the space section; no clean ending (two ";")
    assert r("apple ; hammer ; star drum .") == 3 - 0.5
    # first two in the wrong sections
    assert r("hammer ; apple ; star ; drum .") == -0.5 - 0.5 + 1 + 1 + 1
    # a 4th ";", then harp and "." past the end
    assert r("apple ; hammer ; star ; drum ; harp .") == 4 - 1 - 1 - 1
    assert r("apple apple the ; hammer ; star ; drum .") == 4 - 1 - 0.1 + 1  # repeat, filler
    assert r("apple ; hammer ; star ; drum") == 4.0  # no final "."
    words = (
        "apple pear plum grape mango lemon peach cherry lime melon kiwi fig date berry olive banana the the the "
        "; hammer ; star ; drum ."
    )  # 19 words in section 1: one past SECTION_WORDS = 18
    assert r(words) == pytest.approx(16 - 0.3 - 0.5 + 3 + 1)
    credit = toy_task.token_credit(p, words.split())
    assert len(credit) == len(words.split()) and sum(credit) == pytest.approx(r(words))
    # the short task: 3.0
    assert r("apple pear .") != toy_task.oracle_reward("tell me about fruit", "apple pear .")


def test_long_task_is_wired_through_every_stage():
    """--dataset toy-long: its own prompts, vocabulary and longer default lengths; the short task is unchanged."""
    import evaluate
    import rto
    import sft

    tok = data.build_tiny_tokenizer(common.TOY_LONG)
    assert (
        ";" in tok.get_vocab()
        and "banana" in tok.get_vocab()
        and "banana" not in data.build_tiny_tokenizer(common.TOY).get_vocab()
    )
    args = common.parse_args(
        rto.Args, ["--sft_ckpt", "x", "--dataset", "toy-long", "--beta3", "0"], rto.DEFAULTS
    )
    # toy's value where toy-long has none
    assert args.max_new_tokens == 96 and args.rollout_batch_size == 64
    assert (
        common.parse_args(sft.Args, ["--dataset", "toy-long"], sft.DEFAULTS).max_response_len == 96
    )
    assert (
        common.parse_args(evaluate.Args, ["--dataset", "toy"], evaluate.DEFAULTS).max_new_tokens
        == 24
    )
    prompts = data.load_prompts("toy-long", "train", args, 5)
    assert all(toy_task.is_long(p) for p in prompts)
    stats = toy_task.task_stats(task="toy-long")
    assert stats["best_tokens"] >= 64 and 0.8 < stats["label_agreement"] < 1


def test_preference_labels_are_noisy_but_mostly_agree_with_the_oracle():
    stats = toy_task.task_stats()
    assert 0.8 < stats["label_agreement"] < 0.95  # Bradley-Terry labels: informative, not perfect
    assert stats["demo_oracle_mean"] < stats["best_oracle"] - 5  # headroom above the demonstrations
