"""Log-probs, scores and sampling (common.py's model math) against naive references and hand values: the chunked
log-prob head against the full logits, padding, positions, the EOS cut, masked means, scalar-head read-outs; and a
checkpoint that reloads to the same logits. The built-in task is tested in test_toy_task.py."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import common
import data
import speed


@pytest.fixture(scope="module", params=["llama", "llama-gqa"])
def tiny(request):
    """The tiny Llama (as many key/value heads as query heads), and one whose 4 query heads share 2 key/value heads
    (grouped-query attention, as Llama-3 and SmolLM2 have)."""
    from conftest import tiny_model

    tok = data.build_tiny_tokenizer(common.TOY)
    if request.param == "llama-gqa":
        return tok, tiny_model(tok, "llama-gqa").eval()
    return tok, common.load_causal_lm(common.TINY, tok, seed=0).eval()


def encode(tok, prompt, response):
    return data.encode_prompt(tok, [{"role": "user", "content": prompt}]), data.encode_response(
        tok, response, 64
    )[0]


# ---------------------------------------------------------------------------- batches and log-probs
def naive_logprobs(model, batch, temperature):
    """Reference: the full (B, T, V) logits of an ordinary forward, log-softmax and entropy position by position."""
    P, mask = batch["prompt_len"], batch["response_mask"]
    logits = (
        model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=speed.position_ids(batch["attention_mask"]),
        ).logits.float()
        / temperature
    )
    lp, ent = torch.zeros(mask.shape), torch.zeros(mask.shape)
    for i in range(mask.shape[0]):
        for h in range(mask.shape[1]):
            if mask[i, h]:
                dist = logits[i, P + h - 1].log_softmax(-1)
                lp[i, h] = dist[batch["input_ids"][i, P + h]]
                ent[i, h] = -(dist.exp() * dist).sum().detach()
    return lp, ent


def test_rtos_plain_logprob_lines_equal_a_naive_loop(tiny):
    """rto.plain_token_logprobs, the definition a reader of rto.py sees, against a loop over positions."""
    import rto

    tok, model = tiny
    pairs = [
        encode(tok, "tell me about fruit", "apple pear ."),
        encode(
            tok, "hello what do you know about animals thanks", "cat dog horse sheep goat mouse ."
        ),
    ]
    batch = data.collate([p for p, _ in pairs], [r for _, r in pairs], tok.pad_token_id)
    with torch.no_grad():
        for got, want in zip(
            rto.plain_token_logprobs(model, batch, 0.7, with_entropy=True),
            naive_logprobs(model, batch, 0.7),
            strict=True,
        ):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("tied, family", [(True, "llama"), (False, "llama"), (True, "llama-gqa")])
def test_chunked_logprobs_entropy_and_gradients_match_rtos_plain_lines(monkeypatch, tied, family):
    """rto.token_logprobs (speed.response_logprobs) never builds the (B, R, V) logits: its log-probs, entropies and
    the gradients of every parameter equal rto.plain_token_logprobs' over the full logits, with chunks of 3 rows
    (several per sequence)."""
    import rto

    tok = data.build_tiny_tokenizer(common.TOY)
    from conftest import tiny_model

    torch.manual_seed(0)
    model = (
        common.load_causal_lm(common.TINY, tok, seed=0)
        if family == "llama"
        else tiny_model(tok, family)
    )
    if not tied:
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight) * 0.1)
    monkeypatch.setattr(speed, "LOGITS_CHUNK_BYTES", 4 * len(tok) * 3)
    pairs = [
        encode(tok, "tell me about fruit", "apple pear ."),
        encode(
            tok, "hello what do you know about animals thanks", "cat dog horse sheep goat mouse ."
        ),
    ]
    batch = data.collate([p for p, _ in pairs], [r for _, r in pairs], tok.pad_token_id)
    weights = torch.randn(batch["response_mask"].shape, generator=torch.Generator().manual_seed(1))
    grads = []
    for fn in (
        lambda: rto.token_logprobs(model, batch, 0.7, with_entropy=True),
        lambda: rto.plain_token_logprobs(model, batch, 0.7, with_entropy=True),
    ):
        model.zero_grad()
        lp, ent = fn()
        (lp * weights).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        grads[-1]["values"] = (lp.detach(), ent)
    for name, got in grads[0].items():
        # gradients up to ~50
        torch.testing.assert_close(got, grads[1][name], atol=1e-4, rtol=1e-5, msg=name)
    assert not grads[0]["values"][1].requires_grad


def test_chunked_logprobs_compute_in_the_models_dtype_under_autocast(tiny):
    """--bf16 without FSDP: the model computes under autocast, and so does the fused head (bf16 logits, upcast):
    the same numbers as the model's own bf16 logits, not the float32 ones."""
    tok, model = tiny
    a = encode(
        tok, "hello what do you know about animals thanks", "cat dog horse sheep goat mouse ."
    )
    batch = data.collate([a[0]], [a[1]], tok.pad_token_id)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = speed.response_logprobs(model, batch)
        plain, _ = naive_logprobs(model, batch, 1.0)
    full, _ = naive_logprobs(model, batch, 1.0)
    torch.testing.assert_close(fused, plain, atol=1e-6, rtol=0)
    assert (fused - full).abs().max() > 1e-4  # bf16 is visibly not float32 here


@pytest.mark.parametrize("family, rescaled", [("granite", True), ("llama-gqa", False)])
def test_models_that_change_their_logits_after_the_head_take_the_plain_path(
    family, rescaled, monkeypatch
):
    """A model whose forward changes the head's output (Granite divides the logits by its config's logits_scaling)
    gets the full-logits computation; a Llama, whose forward does not read that key, keeps the fused head. Both
    give the naive numbers."""
    from conftest import tiny_model

    tok = data.build_tiny_tokenizer(common.TOY)
    model = tiny_model(tok, family, logits_scaling=4.0)
    a = encode(tok, "tell me about fruit", "apple pear .")
    batch = data.collate([a[0]], [a[1]], tok.pad_token_id)
    calls = []
    fused = speed.TokenLogprobs.apply
    monkeypatch.setattr(speed.TokenLogprobs, "apply", lambda *a: calls.append(1) or fused(*a))
    with torch.no_grad():
        lp, ent = speed.response_logprobs(model, batch, with_entropy=True)
        want = naive_logprobs(model, batch, 1.0)
    assert bool(calls) is not rescaled and lp.shape == ent.shape == batch["response_mask"].shape
    torch.testing.assert_close((lp, ent), want, atol=1e-5, rtol=0)


def test_logprobs_do_not_depend_on_padding(tiny):
    """A sequence alone, left-padded among longer prompts, right-padded among longer responses: same numbers."""
    tok, model = tiny
    a = encode(tok, "tell me about fruit", "apple pear .")
    b = encode(
        tok, "hello what do you know about animals thanks", "cat dog horse sheep goat mouse ."
    )
    alone = speed.response_logprobs(model, data.collate([a[0]], [a[1]], tok.pad_token_id))
    both = speed.response_logprobs(
        model, data.collate([a[0], b[0]], [a[1], b[1]], tok.pad_token_id)
    )
    n = len(a[1])
    torch.testing.assert_close(both[0, :n], alone[0], atol=1e-5, rtol=0)
    assert (both[0, n:] == 0).all()
    # the same numbers from a naive forward pass of the unpadded sequence
    ids = torch.tensor([a[0] + a[1]])
    naive = (
        model(ids)
        .logits.log_softmax(-1)[0, len(a[0]) - 1 : -1]
        .gather(-1, torch.tensor(a[1])[:, None])[:, 0]
    )
    torch.testing.assert_close(alone[0], naive, atol=1e-5, rtol=0)


def test_position_ids_count_from_the_first_real_token():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    assert speed.position_ids(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 3]]


def test_truncate_at_eos():
    eos = 9
    mask, ended = common.truncate_at_eos(
        torch.tensor([[1, 9, 2, 9], [1, 2, 3, 4], [9, 1, 1, 1]]), eos
    )
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]  # the EOS itself is kept
    assert ended.tolist() == [
        True,
        False,
        True,
    ]  # row 1 was cut by the length limit: its last token stays


def test_masked_statistics_against_hand_values():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 100.0, 100.0]])
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert common.masked_mean(x, m).item() == pytest.approx(2.0)
    assert common.masked_mean(x, m, -1).tolist() == pytest.approx([1.5, 3.0])


def test_sample_masks_everything_after_the_first_eos(tiny):
    tok, model = tiny
    torch.manual_seed(0)
    prompts = [
        encode(tok, "tell me about fruit", "")[0],
        encode(tok, "hi list some space now", "")[0],
    ]
    b = speed.sample(model, tok, prompts, [0, 1], max_new_tokens=12)
    resp = b["input_ids"][:, b["prompt_len"] :]
    for row, m, ended in zip(resp, b["response_mask"], b["ended"], strict=True):
        n = int(m.sum())
        assert m[:n].all() and not m[n:].any()  # one contiguous run from the first token
        assert (row[n:] == tok.pad_token_id).all()
        assert (
            ended == (row[n - 1] == tok.eos_token_id) and (row[: n - 1] != tok.eos_token_id).all()
        )


# ---------------------------------------------------------------------------- scores and checkpoints
def test_prefill_caches_what_a_padded_forward_does_and_generation_goes_on_from_it_unchanged(tiny):
    """speed.prefill: the keys and values of left-padded prompts but their last column, computed over the packed
    prompts without the padding, equal a padded forward's at every real position (1e-5); greedy generate() from
    that cache gives the tokens and scores of a plain generate(); the cache has room for the new tokens and keeps
    them in place (a StaticCache). A model with a sliding window, attention other than packed_sdpa, or training with
    gradient checkpointing gets None (generate() then runs the padded prompts itself)."""
    from transformers import MistralConfig

    tok, model = tiny
    prompts = [
        [5, 6, 7, 8, 9, 10, 11],
        [12],
        [13, 14, 15],
        [16, 17, 18, 19, 20],
    ]  # one of a single token
    input_ids, mask = common.left_pad(prompts, tok.pad_token_id)
    with torch.no_grad():
        cache = speed.prefill(model, input_ids, mask, 8)
        padded = model(
            input_ids=input_ids[:, :-1],
            attention_mask=mask[:, :-1],
            use_cache=True,
            position_ids=speed.position_ids(mask[:, :-1]),
        ).past_key_values
        real = mask[:, :-1].bool()  # (B, W - 1)
        assert len(cache.layers) == len(padded.layers) == model.config.num_hidden_layers
        for ours, theirs in zip(cache.layers, padded.layers, strict=True):  # (B, h, W - 1, d)
            for a, b in ((ours.keys, theirs.keys), (ours.values, theirs.values)):
                assert (
                    a.shape[:2] + a.shape[3:] == b.shape[:2] + b.shape[3:]
                    and a.shape[2] == b.shape[2] + 1 + 8
                )
                # the prompts' columns; the rest is room for the last one and 8 new
                a = a[:, :, : b.shape[2]]
                torch.testing.assert_close(
                    a.transpose(1, 2)[real], b.transpose(1, 2)[real], atol=1e-5, rtol=0
                )
        kwargs = {
            "attention_mask": mask,
            "max_new_tokens": 8,
            "do_sample": False,
            "output_scores": True,
            "return_dict_in_generate": True,
            "pad_token_id": tok.pad_token_id,
        }
        plain = model.generate(input_ids, **kwargs)
        cached = model.generate(
            input_ids, past_key_values=speed.prefill(model, input_ids, mask, 8), **kwargs
        )
    assert torch.equal(cached.sequences, plain.sequences)
    torch.testing.assert_close(
        torch.stack(cached.scores), torch.stack(plain.scores), atol=1e-5, rtol=0
    )
    windowed = MistralConfig(
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        sliding_window=4,
    )
    windowed._attn_implementation = (
        "sdpa_packed"  # as a loaded model's: the window, not the kernel, is refused
    )
    assert (
        speed.prefill(
            type("Model", (), {"config": windowed, "training": False})(), input_ids, mask, 8
        )
        is None
    )
    model.set_attn_implementation("eager")
    try:
        assert speed.prefill(model, input_ids, mask, 8) is None
    finally:
        model.set_attn_implementation("sdpa_packed")
    model.gradient_checkpointing_enable()  # training with it, transformers keeps no cache
    try:
        assert speed.prefill(model.train(), input_ids, mask, 8) is None
    finally:
        model.gradient_checkpointing_disable()
        model.eval()


def test_sequence_score_is_read_at_the_last_real_token_whatever_the_padding(tiny, tmp_path):
    tok, model = tiny
    model.save_pretrained(tmp_path)
    rm = common.load_scorer(str(tmp_path), tok, "--rm_ckpt", new_head=True).eval()
    a = encode(tok, "tell me about fruit", "apple .")
    b = encode(
        tok, "hello what do you know about animals thanks", "cat dog horse sheep goat mouse ."
    )
    alone = speed.sequence_scores(rm, data.collate([a[0]], [a[1]], tok.pad_token_id))
    batch = data.collate([b[0], a[0]], [b[1], a[1]], tok.pad_token_id)  # a: left- and right-padded
    torch.testing.assert_close(speed.sequence_scores(rm, batch)[1], alone[0], atol=1e-5, rtol=0)
    # all-right-padded layout (prompt+response packed to the left) gives the same score
    ids = a[0] + a[1]
    right = {
        "input_ids": torch.tensor([ids + [tok.pad_token_id] * 3]),
        "attention_mask": torch.tensor([[1] * len(ids) + [0] * 3]),
        "response_mask": None,
        "prompt_len": 1,
    }
    torch.testing.assert_close(speed.sequence_scores(rm, right)[0], alone[0], atol=1e-5, rtol=0)
    # and it is what transformers' own pooling gives when pad != EOS
    hf = rm(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=speed.position_ids(batch["attention_mask"]),
    ).logits[:, 0]
    torch.testing.assert_close(hf, speed.sequence_scores(rm, batch), atol=1e-5, rtol=0)


def test_a_reward_model_whose_head_is_not_in_the_checkpoint_is_refused_not_given_a_random_one(
    tiny, tmp_path
):
    from safetensors.torch import load_file, save_file

    tok, model = tiny
    model.save_pretrained(tmp_path / "lm")  # a causal LM: no head at all
    with pytest.raises(
        SystemExit,
        match=r"--rm_ckpt .*lm: the checkpoint has no weights for the reward head `score`",
    ):
        common.load_scorer(str(tmp_path / "lm"), tok, "--rm_ckpt")
    # a critic's new head
    scorer = common.load_scorer(str(tmp_path / "lm"), tok, "--sft_ckpt", new_head=True)
    scorer.save_pretrained(tmp_path / "rm")
    assert torch.equal(
        common.load_scorer(str(tmp_path / "rm"), tok, "--rm_ckpt").score.weight, scorer.score.weight
    )
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
