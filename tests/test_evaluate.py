"""evaluate.py: win-rate and interval arithmetic by hand, each judge against a naive computation, the token-reward
page, the curves, then one end-to-end run and the checks of --models, in this process (conftest.run_main; tiny
random checkpoints, 16 prompts). A bad --judge or --models line is in test_bad_input.py; scripts/pipeline.sh's
command lines are checked in test_scripts.py."""

import json
import math
import sys
from types import SimpleNamespace

import pytest
import torch

import common
import data
import evaluate
import judges
import speed
import toy_task
from conftest import run_main


@pytest.fixture
def one_thread():
    """Token-by-token generation of a tiny model is slower with 2 busy threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Two tiny random causal LMs (seeds 1 and 2) saved as checkpoints; 'a' carries dpo_beta 0.25 in its config;
    and 'a' with a new reward head (a random reward model)."""
    root, tok = tmp_path_factory.mktemp("tiny"), data.build_tiny_tokenizer("toy")
    for name, seed in (("a", 1), ("b", 2)):
        model = common.load_causal_lm("tiny", tok, seed=seed)
        if name == "a":
            model.config.dpo_beta = 0.25
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    common.load_scorer(str(root / "a"), tok, "--judge rm:", new_head=True).save_pretrained(
        root / "rm"
    )
    tok.save_pretrained(root / "rm")
    return SimpleNamespace(tok=tok, a=root / "a", b=root / "b", rm=root / "rm")


def hand_batch(tok):
    """Two toy prompts with responses of different lengths, in data.py's batch layout; and the unpadded sequences."""
    prompts = [data.encode_prompt(tok, p) for p in toy_task.prompts("test", 2)]
    responses = [
        tok.convert_tokens_to_ids(["apple", "pear", ".", "</s>"]),
        tok.convert_tokens_to_ids(["cat", "</s>"]),
    ]
    return data.collate(prompts, responses, tok.pad_token_id), list(
        zip(prompts, responses, strict=True)
    )


# ---------------------------------------------------------------------------- arithmetic by hand
def test_win_rates_by_hand():
    scores = {
        "a": [1.0, 2.0, 3.0, 0.0],
        "b": [1.0, 1.0, 4.0, 2.0],
        "c": [0.0, 5.0, 3.0 + 1e-9, 1.0],
    }
    w = evaluate.win_rates(scores)
    # a vs b: tie, win, loss, loss -> 1.5/4; a vs c: win, loss, tie (within 1e-6), loss -> 1.5/4;
    # b vs c: win, loss, win, win -> 3/4
    assert w["a"]["b"] == 0.375 and w["a"]["c"] == 0.375 and w["b"]["c"] == 0.75
    assert evaluate.win_rates({"a": [1, 1], "b": [1, 1]})["a"]["b"] == 0.5  # all ties: half each


def test_confidence_interval_by_hand():
    mean, ci = evaluate.mean_ci([1.0, 2.0, 3.0, 4.0])
    # sample variance ((1.5^2 + 0.5^2) * 2) / 3 = 5/3; 1.96 * sqrt(5/3) / sqrt(4)
    assert mean == 2.5 and ci == pytest.approx(1.96 * math.sqrt(5 / 3) / 2)
    assert evaluate.mean_ci([7.0]) == (7.0, 0.0)


# ---------------------------------------------------------------------------- judges
def test_oracle_judge():
    prompts = [[{"role": "user", "content": "tell me about fruit"}]] * 2
    judge = judges.parse("oracle", "toy", "--judge")
    scores = judges.score(judge, None, prompts, ["apple pear .", "apple apple asdf"])
    assert scores == [3.0, -1.0]  # +1 +1 and a clean end +1;  +1, repeat -1, junk -1


@torch.no_grad()
def test_rm_judge(tiny):
    judge = judges.load(judges.parse(f"rm:{tiny.rm}", "toy", "--judge"), tiny.tok, "cpu", 0.1, [])
    batch, seqs = hand_batch(tiny.tok)
    scores = judges.score(judge, batch, None, None)
    assert scores == speed.sequence_scores(judge["rm"], batch).tolist()
    # the head read at the last token of the unpadded sequence
    for score, (p, r) in zip(scores, seqs, strict=True):
        alone = judge["rm"](input_ids=torch.tensor([p + r])).logits[0, -1].item()
        assert score == pytest.approx(alone, abs=1e-4)


@torch.no_grad()
def test_dpo_judge_is_beta_times_sequence_log_ratio(tiny):
    judge = judges.parse(f"dpo:{tiny.a},{tiny.b}", "toy", "--judge")
    judge = judges.load(judge, tiny.tok, "cpu", 0.1, [])
    assert judge["beta"] == 0.25  # from the DPO checkpoint's config, not --dpo_beta
    batch, seqs = hand_batch(tiny.tok)
    scores = judges.score(judge, batch, None, None)

    # naive: one unpadded sequence, sum of log-probs of the response tokens
    def seq_logp(model, p, r):
        logp = model(input_ids=torch.tensor([p + r])).logits[0].log_softmax(-1)
        return sum(logp[len(p) - 1 + j, t].item() for j, t in enumerate(r))

    for score, (p, r) in zip(scores, seqs, strict=True):
        naive = 0.25 * (seq_logp(judge["dpo"], p, r) - seq_logp(judge["ref"], p, r))
        assert score == pytest.approx(naive, abs=1e-4)


def test_token_reward_page_has_one_span_per_token_and_escapes():
    items = [
        {
            "model": "m<1>",
            "prompt": "tell me",
            "tokens": ["apple", " <script>", " </s>"],
            "values": [0.3, -0.2, 0.0],
        },
        {"model": "m2", "prompt": "hi & bye", "tokens": ["x"], "values": [-1.0]},
    ]
    page = evaluate.token_rewards_html(items, scale=1.0, beta=0.1)
    assert page.count("<span") == 4 and page.count('title="') == 4
    assert (
        "<script>" not in page
        and "&lt;script&gt;" in page
        and "&lt;/s&gt;" in page
        and "m&lt;1&gt;" in page
    )
    assert 'title="+0.3000"' in page and "rgb(225, 70, 70)" in page  # full red at |value| = scale


# ---------------------------------------------------------------------------- curves
def fake_runs(tmp_path):
    """Two rto.py-like metrics.jsonl files: a 'before' line, 2 iteration lines (one run has no oracle), 'after'."""
    dirs = []
    for name, oracle in (("rto", True), ("ppo", False)):
        d = tmp_path / "runs" / name
        d.mkdir(parents=True)
        lines = [{"step": 0, "phase": "eval", "eval_score": 1.0, "eval_kl_per_response": 0.0}]
        for step in (1, 2):
            line = {
                "step": step,
                "policy_loss": 0.1,
                "kl_per_token": 0.01 * step,
                "response_length": 9.0 + step,
            }
            lines.append({**line, "oracle_reward": 0.5 * step} if oracle else line)
        lines.append({"step": 2, "phase": "eval", "eval_score": 2.0, "eval_kl_per_response": 0.5})
        (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        dirs.append(str(d))
    return dirs


def test_curves_csv_without_matplotlib(tmp_path, monkeypatch, capsys):
    # `import matplotlib` now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    path = evaluate.plot_curves(evaluate.read_curves(fake_runs(tmp_path)), str(tmp_path))
    assert path.endswith("curves.csv") and "matplotlib is not installed" in capsys.readouterr().out
    rows = [line.split(",") for line in open(path).read().splitlines()]
    assert rows[0] == ["run", "step", "metric", "value"]
    assert ["rto", "2", "oracle_reward", "1.0"] in rows and [
        "ppo",
        "1",
        "kl_per_token",
        "0.01",
    ] in rows
    assert ["rto", "0", "eval_score", "1.0"] in rows and [
        "ppo",
        "2",
        "eval_kl_per_response",
        "0.5",
    ] in rows
    # rto: 3 metrics x 2 iterations; ppo: 2 x 2; each: 2 evaluations x (eval_score, eval_kl_per_response)
    assert len(rows) == 1 + 2 * 3 + 2 * 2 + 2 * 2 * 2


def test_curves_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = evaluate.plot_curves(evaluate.read_curves(fake_runs(tmp_path)), str(tmp_path))
    assert path.endswith("curves.png") and open(path, "rb").read(4) == b"\x89PNG"


# ---------------------------------------------------------------------------- end to end, and bad input
def test_end_to_end(tiny, tmp_path, one_thread):
    out = tmp_path / "eval"
    run_main(
        "evaluate.py",
        "--models",
        f"a={tiny.a}",
        f"b={tiny.b}",
        "--judge",
        "oracle",
        "--num_prompts",
        16,
        "--show_token_rewards",
        2,
        "--token_reward_dpo",
        f"{tiny.a},{tiny.b}",
        "--curves",
        *fake_runs(tmp_path),
        "--output_dir",
        out,
    )
    for name in ("winrates.md", "winrates.json", "responses.jsonl", "token_rewards.html"):
        assert (out / name).exists(), name
    assert (out / "curves.png").exists() or (out / "curves.csv").exists()
    w = json.loads((out / "winrates.json").read_text())["win_rates"]
    rows = [json.loads(line) for line in open(out / "responses.jsonl")]
    assert len(rows) == 32 and {r["model"] for r in rows} == {"a", "b"}
    # the table from the responses
    a, b = ([r["score"] for r in rows if r["model"] == m] for m in ("a", "b"))
    by_hand = (
        sum(0.5 if abs(x - y) <= 1e-6 else float(x > y) for x, y in zip(a, b, strict=True)) / 16
    )
    assert w["a"]["b"] == pytest.approx(by_hand)
    # 2 responses of each model, token by token
    shown = sum(r["length"] for r in rows if r["prompt_index"] < 2)
    assert (out / "token_rewards.html").read_text().count("<span") == shown


def test_models_and_vocabulary_checks(tiny, tmp_path):
    assert evaluate.parse_models(["sft=runs/sft", "rto=x=y"]) == {"sft": "runs/sft", "rto": "x=y"}
    for entries, says in (
        (["a=x", "a=y"], "given twice"),
        (["=x"], "expected name=checkpoint_dir"),
    ):
        with pytest.raises(SystemExit, match=says):
            evaluate.parse_models(entries)
    byte_level = data.build_tiny_tokenizer("other")  # another vocabulary
    byte_level.save_pretrained(tmp_path / "other")
    with pytest.raises(SystemExit, match="tokenizer differs"):
        data.same_vocab(str(tmp_path / "other"), tiny.tok, "--judge rm:", "the first model")


def test_eval_prompts_are_the_first_num_prompts_that_fit(tmp_path, capsys):
    """--num_prompts counts prompts that are evaluated: over-long ones are skipped, not counted against it."""
    path = tmp_path / "prompts.jsonl"
    texts = ["long " * 20, "one", "long " * 20, "two", "three", "four"]
    path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    argv = ["--models", "a=x", "--judge", "rm:x", "--dataset", str(path), "--max_prompt_len", "30"]
    tok = data.build_tiny_tokenizer("bytes")
    args = evaluate.validate(
        common.parse_args(evaluate.Args, argv + ["--num_prompts", "3"], evaluate.DEFAULTS)
    )
    prompts, ids = data.held_out_prompts(tok, args.dataset, args.split, args.num_prompts, args)
    assert [p[-1]["content"] for p in prompts] == ["one", "two", "three"] and all(
        len(i) <= 30 for i in ids
    )
    assert "skipped 2 prompts over 30 tokens" in capsys.readouterr().err
    args = evaluate.validate(
        common.parse_args(evaluate.Args, argv + ["--num_prompts", "9"], evaluate.DEFAULTS)
    )
    assert len(data.held_out_prompts(tok, args.dataset, args.split, 9, args)[0]) == 4
    assert "only 4 of the 9 prompts asked for fit" in capsys.readouterr().err
    args = evaluate.validate(
        common.parse_args(
            evaluate.Args,
            argv + ["--num_prompts", "1", "--long_prompts", "fail"],
            evaluate.DEFAULTS,
        )
    )
    with pytest.raises(SystemExit, match="tokens > --max_prompt_len 30"):
        data.held_out_prompts(tok, args.dataset, args.split, 1, args)
