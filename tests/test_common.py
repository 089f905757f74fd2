"""common.py's numerical pieces and the built-in task, against hand computations and naive references."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import common
import data
import toy_task


@pytest.fixture(scope="module")
def tiny():
    tok = data.build_tiny_tokenizer(common.TOY)
    return tok, common.load_causal_lm(common.TINY, tok, seed=0).eval()


def encode(tok, prompt, response):
    return data.encode_prompt(tok, [{"role": "user", "content": prompt}]), \
        data.encode_response(tok, response, 64)[0]


# ---------------------------------------------------------------------------- the built-in task
def test_task_is_deterministic_and_splits_are_disjoint():
    assert toy_task.preference_data("train", 50, seed=3) == toy_task.preference_data("train", 50, seed=3)
    assert toy_task.sft_data("train", 50, seed=3) != toy_task.sft_data("train", 50, seed=4)
    train = {p[0]["content"] for p in toy_task.prompts("train", 500)}
    test = {p[0]["content"] for p in toy_task.prompts("test", 500)}
    assert train and test and not train & test


def test_oracle_prefers_what_it_should():
    p = "please tell me about fruit"
    r = lambda text: toy_task.oracle_reward(p, text)
    assert r(toy_task.best_response(p)) == toy_task.best_reward() == 9.0
    assert r("apple pear .") == 3.0  # two new on-topic words + clean ending
    assert r("apple apple .") == 1.0  # a repeat costs what the first one gave
    assert r("apple pear") == 2.0  # no clean ending
    assert r("apple cat .") == 1.5  # another topic's word
    assert r("apple asdf .") == 1.0  # junk
    assert r("apple . pear .") == 1.0  # "." in the middle is junk (-1) and spoils the ending bonus
    long = "apple pear plum grape mango lemon peach cherry the a and ."  # 12 words: 2 over the limit
    assert r(long) == pytest.approx(8 - 0.3 + 1 - 1.0)
    assert toy_task.topic_of([{"role": "user", "content": "hi describe space now"}]) == "space"


def test_long_task_oracle_by_hand():
    """toy-long: four sections in the prompt's order, separated by ";", each word judged by its section's topic."""
    p = [{"role": "user", "content": "hi tell me about fruit then tools then space then music"}]
    assert toy_task.is_long(p) and toy_task.topics_of(p) == ["fruit", "tools", "space", "music"]
    r = lambda text: toy_task.oracle_reward(p, text)
    best = toy_task.best_response(p)
    assert r(best) == toy_task.best_reward("toy-long") == 65.0 and len(best.split()) == 68
    assert r("apple ; hammer ; star ; drum .") == 5.0  # 4 new words + clean ending
    assert r("apple ; hammer ; star drum .") == 3 - 0.5  # drum in the space section; no clean ending (two ";")
    assert r("hammer ; apple ; star ; drum .") == -0.5 - 0.5 + 1 + 1 + 1  # first two in the wrong sections
    assert r("apple ; hammer ; star ; drum ; harp .") == 4 - 1 - 1 - 1  # a 4th ";", then harp and "." past the end
    assert r("apple apple the ; hammer ; star ; drum .") == 4 - 1 - 0.1 + 1  # repeat, filler
    assert r("apple ; hammer ; star ; drum") == 4.0  # no final "."
    words = ("apple pear plum grape mango lemon peach cherry lime melon kiwi fig date berry olive banana the the the "
             "; hammer ; star ; drum .")  # 19 words in section 1: one past SECTION_WORDS = 18
    assert r(words) == pytest.approx(16 - 0.3 - 0.5 + 3 + 1)
    credit = toy_task.token_credit(p, words.split())
    assert len(credit) == len(words.split()) and sum(credit) == pytest.approx(r(words))
    assert r("apple pear .") != toy_task.oracle_reward("tell me about fruit", "apple pear .")  # the short task: 3.0


def test_long_task_is_wired_through_every_stage():
    """--dataset toy-long: its own prompts, vocabulary and longer default lengths; the short task is unchanged."""
    import evaluate
    import rto
    import sft
    tok = data.build_tiny_tokenizer(common.TOY_LONG)
    assert ";" in tok.get_vocab() and "banana" in tok.get_vocab() and "banana" not in data.build_tiny_tokenizer(
        common.TOY).get_vocab()
    args = common.parse_args(rto.Args, ["--sft_ckpt", "x", "--dataset", "toy-long", "--beta3", "0"], rto.DEFAULTS)
    assert args.max_new_tokens == 96 and args.rollout_batch_size == 64  # toy's value where toy-long has none
    assert common.parse_args(sft.Args, ["--dataset", "toy-long"], sft.DEFAULTS).max_response_len == 96
    assert common.parse_args(evaluate.Args, ["--dataset", "toy"], evaluate.DEFAULTS).max_new_tokens == 24
    prompts = data.load_prompts("toy-long", "train", args, 5)
    assert all(toy_task.is_long(p) for p in prompts)
    stats = toy_task.task_stats(task="toy-long")
    assert stats["best_tokens"] >= 64 and 0.8 < stats["label_agreement"] < 1


def test_preference_labels_are_noisy_but_mostly_agree_with_the_oracle():
    stats = toy_task.task_stats()
    assert 0.8 < stats["label_agreement"] < 0.95  # Bradley-Terry labels: informative, not perfect
    assert stats["demo_oracle_mean"] < stats["best_oracle"] - 5  # headroom above the demonstrations


# ---------------------------------------------------------------------------- batches and log-probs
def naive_logprobs(model, batch, temperature):
    """Reference: the full (B, T, V) logits of an ordinary forward, log-softmax and entropy position by position."""
    P, mask = batch["prompt_len"], batch["response_mask"]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=common.position_ids(batch["attention_mask"])).logits.float() / temperature
    lp, ent = torch.zeros(mask.shape), torch.zeros(mask.shape)
    for i in range(mask.shape[0]):
        for h in range(mask.shape[1]):
            if mask[i, h]:
                dist = logits[i, P + h - 1].log_softmax(-1)
                lp[i, h] = dist[batch["input_ids"][i, P + h]]
                ent[i, h] = -(dist.exp() * dist).sum().detach()
    return lp, ent


@pytest.mark.parametrize("tied", [True, False])
def test_chunked_logprobs_entropy_and_gradients_match_the_full_logits(monkeypatch, tied):
    """common.response_logprobs never builds the (B, R, V) logits: its log-probs, entropies and the gradients of
    every parameter equal a naive loop over the full logits, with chunks of 3 rows (several per sequence)."""
    tok = data.build_tiny_tokenizer(common.TOY)
    torch.manual_seed(0)
    model = common.load_causal_lm(common.TINY, tok, seed=0)
    if not tied:
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight) * 0.1)
    monkeypatch.setattr(common, "LOGITS_CHUNK_BYTES", 4 * len(tok) * 3)
    pairs = [encode(tok, "tell me about fruit", "apple pear ."),
             encode(tok, "hello what do you know about animals thanks", "cat dog horse sheep goat mouse .")]
    batch = data.collate([p for p, _ in pairs], [r for _, r in pairs], tok.pad_token_id)
    weights = torch.randn(batch["response_mask"].shape, generator=torch.Generator().manual_seed(1))
    grads = []
    for fn in (lambda: common.response_logprobs(model, batch, 0.7, with_entropy=True),
               lambda: naive_logprobs(model, batch, 0.7)):
        model.zero_grad()
        lp, ent = fn()
        (lp * weights).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        grads[-1]["values"] = (lp.detach(), ent)
    for name, got in grads[0].items():
        torch.testing.assert_close(got, grads[1][name], atol=1e-4, rtol=1e-5, msg=name)  # gradients up to ~50
    assert not grads[0]["values"][1].requires_grad


def test_chunked_logprobs_compute_in_the_models_dtype_under_autocast(tiny):
    """--bf16 without FSDP: the model computes under autocast, and so does the fused head (bf16 logits, upcast):
    the same numbers as the model's own bf16 logits, not the float32 ones."""
    tok, model = tiny
    a = encode(tok, "hello what do you know about animals thanks", "cat dog horse sheep goat mouse .")
    batch = data.collate([a[0]], [a[1]], tok.pad_token_id)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = common.response_logprobs(model, batch)
        plain, _ = naive_logprobs(model, batch, 1.0)
    full, _ = naive_logprobs(model, batch, 1.0)
    torch.testing.assert_close(fused, plain, atol=1e-6, rtol=0)
    assert (fused - full).abs().max() > 1e-4  # bf16 is visibly not float32 here


def test_heads_that_rescale_logits_take_the_plain_path(tiny, monkeypatch):
    """A model that changes its logits after the head (Gemma's soft-capping) gets the full-logits computation."""
    tok, model = tiny
    a = encode(tok, "tell me about fruit", "apple pear .")
    batch = data.collate([a[0]], [a[1]], tok.pad_token_id)
    monkeypatch.setattr(model.config, "final_logit_softcapping", 30.0, raising=False)
    calls = []
    monkeypatch.setattr(common.TokenLogprobs, "apply", lambda *a: calls.append(a))
    lp, ent = common.response_logprobs(model, batch, with_entropy=True)
    assert not calls and lp.shape == ent.shape == batch["response_mask"].shape
    torch.testing.assert_close((lp, ent), naive_logprobs(model, batch, 1.0), atol=1e-5, rtol=0)


def test_logprobs_do_not_depend_on_padding(tiny):
    """A sequence alone, left-padded among longer prompts, right-padded among longer responses: same numbers."""
    tok, model = tiny
    a = encode(tok, "tell me about fruit", "apple pear .")
    b = encode(tok, "hello what do you know about animals thanks", "cat dog horse sheep goat mouse .")
    alone = common.response_logprobs(model, data.collate([a[0]], [a[1]], tok.pad_token_id))
    both = common.response_logprobs(model, data.collate([a[0], b[0]], [a[1], b[1]], tok.pad_token_id))
    n = len(a[1])
    torch.testing.assert_close(both[0, :n], alone[0], atol=1e-5, rtol=0)
    assert (both[0, n:] == 0).all()
    # the same numbers from a naive forward pass of the unpadded sequence
    ids = torch.tensor([a[0] + a[1]])
    naive = model(ids).logits.log_softmax(-1)[0, len(a[0]) - 1:-1].gather(-1, torch.tensor(a[1])[:, None])[:, 0]
    torch.testing.assert_close(alone[0], naive, atol=1e-5, rtol=0)


def test_position_ids_count_from_the_first_real_token():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    assert common.position_ids(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 3]]


def test_truncate_at_eos():
    eos = 9
    mask, ended = common.truncate_at_eos(torch.tensor([[1, 9, 2, 9], [1, 2, 3, 4], [9, 1, 1, 1]]), eos)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]  # the EOS itself is kept
    assert ended.tolist() == [True, False, True]  # row 1 was cut by the length limit: its last token stays


def test_masked_statistics_against_hand_values():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 100.0, 100.0]])
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert common.masked_mean(x, m).item() == pytest.approx(2.0)
    assert common.masked_mean(x, m, -1).tolist() == pytest.approx([1.5, 3.0])


def test_sample_masks_everything_after_the_first_eos(tiny):
    tok, model = tiny
    torch.manual_seed(0)
    prompts = [encode(tok, "tell me about fruit", "")[0], encode(tok, "hi list some space now", "")[0]]
    b = common.sample(model, tok, prompts, max_new_tokens=12)
    resp = b["input_ids"][:, b["prompt_len"]:]
    for row, m, ended in zip(resp, b["response_mask"], b["ended"]):
        n = int(m.sum())
        assert m[:n].all() and not m[n:].any()  # one contiguous run from the first token
        assert (row[n:] == tok.pad_token_id).all()
        assert ended == (row[n - 1] == tok.eos_token_id) and (row[:n - 1] != tok.eos_token_id).all()


# ---------------------------------------------------------------------------- scores and checkpoints
def test_sequence_score_is_read_at_the_last_real_token_whatever_the_padding(tiny, tmp_path):
    tok, model = tiny
    model.save_pretrained(tmp_path)
    rm = common.load_scorer(str(tmp_path), tok, "--rm_ckpt", new_head=True).eval()
    a = encode(tok, "tell me about fruit", "apple .")
    b = encode(tok, "hello what do you know about animals thanks", "cat dog horse sheep goat mouse .")
    alone = common.sequence_scores(rm, data.collate([a[0]], [a[1]], tok.pad_token_id))
    batch = data.collate([b[0], a[0]], [b[1], a[1]], tok.pad_token_id)  # a: left- and right-padded
    torch.testing.assert_close(common.sequence_scores(rm, batch)[1], alone[0], atol=1e-5, rtol=0)
    # all-right-padded layout (prompt+response packed to the left) gives the same score
    ids = a[0] + a[1]
    right = {"input_ids": torch.tensor([ids + [tok.pad_token_id] * 3]),
             "attention_mask": torch.tensor([[1] * len(ids) + [0] * 3]), "response_mask": None, "prompt_len": 1}
    torch.testing.assert_close(common.sequence_scores(rm, right)[0], alone[0], atol=1e-5, rtol=0)
    # and it is what transformers' own pooling gives when pad != EOS
    hf = rm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
            position_ids=common.position_ids(batch["attention_mask"])).logits[:, 0]
    torch.testing.assert_close(hf, common.sequence_scores(rm, batch), atol=1e-5, rtol=0)


def test_a_reward_model_whose_head_is_not_in_the_checkpoint_is_refused_not_given_a_random_one(tiny, tmp_path):
    from safetensors.torch import load_file, save_file
    tok, model = tiny
    model.save_pretrained(tmp_path / "lm")  # a causal LM: no head at all
    with pytest.raises(SystemExit, match=r"--rm_ckpt .*lm: the checkpoint has no weights for the reward head `score`"):
        common.load_scorer(str(tmp_path / "lm"), tok, "--rm_ckpt")
    scorer = common.load_scorer(str(tmp_path / "lm"), tok, "--sft_ckpt", new_head=True)  # a critic's new head
    scorer.save_pretrained(tmp_path / "rm")
    assert torch.equal(common.load_scorer(str(tmp_path / "rm"), tok, "--rm_ckpt").score.weight, scorer.score.weight)
    weights = load_file(tmp_path / "rm" / "model.safetensors")  # the head stored under another name
    weights["classifier.weight"] = weights.pop("score.weight")
    save_file(weights, tmp_path / "rm" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SystemExit, match="no weights for the reward head `score`"):
        common.load_scorer(str(tmp_path / "rm"), tok, "--rm_ckpt")


def test_checkpoint_round_trip_reloads_identical_logits(tiny, tmp_path):
    from accelerate import Accelerator

    tok, model = tiny
    common.save_model(Accelerator(cpu=True), model, tok, str(tmp_path / "ck"))
    assert not (tmp_path / "ck" / ".saving").exists()
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "ck").eval()
    tok2 = AutoTokenizer.from_pretrained(tmp_path / "ck")
    ids = torch.tensor([encode(tok, "tell me about fruit", "apple pear .")[0]])
    assert tok2.get_vocab() == tok.get_vocab() and tok2.chat_template == tok.chat_template
    assert torch.equal(model(ids).logits, again(ids).logits)


def test_byte_level_tiny_tokenizer_round_trips_any_text():
    tok = data.build_tiny_tokenizer("some/file.jsonl")
    text = "Héllo, wörld! 👋 \n\tdone"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert tok.pad_token_id != tok.eos_token_id


def test_decoded_responses_keep_junk_special_tokens_but_not_the_final_eos():
    tok = data.build_tiny_tokenizer(common.TOY)
    p = data.encode_prompt(tok, [{"role": "user", "content": "tell me about fruit"}])
    r = tok("apple <unk> pear", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    batch = data.collate([p, p], [r, r[:1]], tok.pad_token_id)
    texts = data.decode_responses(tok, batch)
    assert texts == ["apple <unk> pear", "apple"]
    assert toy_task.oracle_reward("tell me about fruit", texts[0]) == 1.0  # <unk> is junk to the judge


def test_a_non_finite_loss_or_gradient_stops_the_run_or_is_skipped_by_flag():
    from types import SimpleNamespace

    from accelerate import Accelerator
    acc = Accelerator(cpu=True)
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    before = model.weight.detach().clone()
    nan_loss = model(torch.ones(1, 2)).sum() * float("nan")
    with pytest.raises(SystemExit, match="non-finite loss at step 8"):
        common.optimizer_step(acc, [model], nan_loss, [opt], [sched], SimpleNamespace(skip_nonfinite=False), "step 8")
    skip = SimpleNamespace(skip_nonfinite=True, max_grad_norm=1.0)
    assert common.optimizer_step(acc, [model], nan_loss, [opt], [sched], skip, "step 8") is False
    inf_loss = model(torch.tensor([[float("inf"), 1.0]])).sum()
    assert common.optimizer_step(acc, [model], inf_loss, [opt], [sched], skip, "step 8") is False
    assert torch.equal(model.weight, before)  # nothing was applied
    ok = model(torch.ones(1, 2)).sum()
    assert common.optimizer_step(acc, [model], ok, [opt], [sched], skip, "step 8") is True
    assert not torch.equal(model.weight, before)


def test_rto_refuses_checkpoints_with_another_vocabulary(tmp_path):
    import rto
    toy, other = data.build_tiny_tokenizer(common.TOY), data.build_tiny_tokenizer("bytes")
    for name, tok in (("sft", toy), ("dpo", other)):
        common.load_causal_lm(common.TINY, tok).save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    args = rto.validate(common.parse_args(rto.Args, ["--sft_ckpt", str(tmp_path / "sft"), "--dpo_ckpt",
                                                     str(tmp_path / "dpo"), "--beta3", "0", "--output_dir", "x"],
                                          rto.DEFAULTS))
    from accelerate import Accelerator
    with pytest.raises(SystemExit, match="--dpo_ckpt .* tokenizer differs"):
        rto.load_models(args, Accelerator(cpu=True))
