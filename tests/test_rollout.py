"""rto.py's iteration: batch sizes, prompt sharding and the sampler; then the rollout, the frozen pass and the
update with real (tiny) models, in process; then end-to-end runs of RTO, PPO and DPPO. The token rewards, GAE and
the losses by hand are in test_losses.py, rto.py's --resume in test_resume.py."""

import copy
import dataclasses
import json
import math
from types import SimpleNamespace

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import common
import data
import rto
import speed
import toy_task
from conftest import iteration_metrics, read_metrics, rto_cmd, run_main


def test_batch_sizes_must_divide():
    args = SimpleNamespace(rollout_batch_size=64, mini_batch_size=16, micro_batch_size=4)
    assert rto.batch_sizes(args, 2) == {"rollout": 32, "mini": 8, "micro": 4, "accum": 2}
    with pytest.raises(SystemExit, match="--mini_batch_size"):
        rto.batch_sizes(
            SimpleNamespace(rollout_batch_size=64, mini_batch_size=12, micro_batch_size=8), 1
        )


def test_num_iterations_from_episodes_or_steps():
    def args(**kw):
        return SimpleNamespace(
            **{
                **dict(
                    num_iterations=None,
                    num_episodes=None,
                    rollout_batch_size=64,
                    mini_batch_size=16,
                    ppo_epochs=2,
                    max_steps=-1,
                ),
                **kw,
            }
        )

    assert rto.num_iterations(args(), 2000) == 32  # one pass: ceil(2000 / 64)
    # prompts rolled out, not passes: ceil(200 / 64)
    assert rto.num_iterations(args(num_episodes=200), 2000) == 4
    assert rto.num_iterations(args(num_iterations=5), 2000) == 5
    # 8 optimiser steps per iteration: ceil(20 / 8)
    assert rto.num_iterations(args(max_steps=20), 2000) == 3
    assert rto.num_iterations(args(num_iterations=2, max_steps=100), 2000) == 2


def test_prompts_are_sharded_once_per_pass_and_never_twice_in_an_iteration():
    prompts, args = [f"p{i}" for i in range(10)], SimpleNamespace(rollout_batch_size=4, seed=3)
    order = torch.randperm(10, generator=torch.Generator().manual_seed(0)).tolist()
    walk, seeds = [], []
    for it in range(5):  # 20 prompts: two passes over 10
        batch = [data.iteration_prompts(prompts, order, it, args, rank, 2) for rank in (0, 1)]
        both = batch[0][0] + batch[1][0]
        assert len(set(both)) == 4  # no prompt twice in one iteration, across the two processes
        walk += both
        seeds += batch[0][1] + batch[1][1]
    # each once per pass
    assert sorted(walk[:10]) == sorted(prompts) and sorted(walk[10:]) == sorted(prompts)
    assert len(set(seeds)) == 20  # every rollout of a prompt has its own sampling seed
    assert data.iteration_prompts(prompts, order, 1, args, 1, 2)[1] == [
        3 * 2**32 + 6,
        3 * 2**32 + 7,
    ]


def test_sampler_draws_from_the_tempered_nucleus():
    """draw_with_own_generators + argmax (what generate does with it) samples softmax(logits / T) restricted to the
    top-p nucleus and renormalised; each row's draw depends only on its own generator."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    T, top_p, n = 0.7, 0.8, 6000
    # 0.73, 0.17, 0.08, ...: the nucleus reaching 0.8 is the first two tokens
    p = (logits / T).softmax(-1)
    expected = torch.where(torch.arange(6) < 2, p, torch.zeros(6))
    expected = expected / expected.sum()
    pick = speed.draw_with_own_generators(
        [torch.Generator().manual_seed(i) for i in range(n)], T, top_p
    )
    tokens = pick(None, logits.expand(n, 6).clone()).argmax(-1)
    freq = torch.bincount(tokens, minlength=6).float() / n
    assert (freq - expected).abs().max() < 0.02
    again = speed.draw_with_own_generators(
        [torch.Generator().manual_seed(i) for i in range(5)], T, 1.0
    )
    alone = speed.draw_with_own_generators([torch.Generator().manual_seed(3)], T, 1.0)
    assert (
        again(None, logits.expand(5, 6).clone())[3].tolist()
        == alone(None, logits[None].clone())[0].tolist()
    )


# ---------------------------------------------------------------------------- with real models (in process)
def rto_args(pipeline, *extra):
    return rto.validate(
        common.parse_args(
            rto.Args,
            [
                "--sft_ckpt",
                str(pipeline["sft"]),
                "--dpo_ckpt",
                str(pipeline["dpo"]),
                "--rm_ckpt",
                str(pipeline["rm"]),
                "--output_dir",
                "unused",
                *map(str, extra),
            ],
            rto.DEFAULTS,
        )
    )


@pytest.fixture(scope="module")
def acc():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def sampled(acc, pipeline, *extra, n=24):
    """A rollout of n held-out prompts through frozen_pass, with the models that made it."""
    args = rto_args(pipeline, "--max_new_tokens", 16, *extra)
    tok, models, _ = rto.load_models(args, acc)
    prompts = toy_task.prompts("test", n)
    ro = rto.rollout(acc, models["policy"], tok, prompts, list(range(n)), args)
    return args, tok, models, prompts, rto.frozen_pass(acc, ro, models, args)


def test_bf16_stores_the_frozen_models_in_bf16_and_trains_fp32_weights(pipeline, acc):
    models = rto.load_models(rto_args(pipeline, "--bf16"), acc)[1]
    dtypes = {name: {p.dtype for p in m.parameters()} for name, m in models.items()}
    assert dtypes == {
        "policy": {torch.float32},
        "critic": {torch.float32},
        "ref": {torch.bfloat16},
        "dpo": {torch.bfloat16},
        "rm": {torch.bfloat16},
    }
    # rotary frequencies: as in the policy
    assert {b.dtype for b in models["ref"].buffers()} == {torch.float32}


def test_modes_load_only_the_models_they_need_and_fail_clearly_without_them(pipeline, acc):
    assert set(rto.load_models(rto_args(pipeline, "--reward_mode", "ppo"), acc)[1]) == {
        "policy",
        "critic",
        "ref",
        "rm",
    }
    assert set(rto.load_models(rto_args(pipeline, "--reward_mode", "dppo"), acc)[1]) == {
        "policy",
        "critic",
        "ref",
        "dpo",
    }
    assert "rm" not in rto.load_models(rto_args(pipeline, "--beta3", 0), acc)[1]
    for bad, needs in (
        (["--reward_mode", "ppo", "--beta3", "0"], "beta3"),
        (["--dpo_ckpt", ""], "--dpo_ckpt"),
        (["--rm_ckpt", ""], "--rm_ckpt"),
    ):
        with pytest.raises(SystemExit, match=needs):
            rto_args(pipeline, *bad)


@torch.no_grad()
def test_logprobs_and_values_match_each_sequence_alone_at_temperature(pipeline, acc):
    """Old log-probs at T = 0.7 and V(s_h), from the padded, length-grouped, trimmed batches of frozen_pass, equal
    a forward pass of each sequence alone and unpadded: log softmax(logits / T) at each response token, and the
    critic's head at the position before it."""
    args, tok, models, prompts, ro = sampled(
        acc, pipeline, "--temperature", 0.7, "--forward_batch_size", 5
    )
    mask, P = ro["response_mask"], ro["prompt_len"]
    assert mask.sum(-1).min() < mask.shape[1]  # response lengths differ: right padding is exercised
    # and so do prompt lengths: left padding
    assert len({len(data.encode_prompt(tok, p)) for p in prompts}) > 1
    for key in ("logprobs", "ref_logprobs", "dpo_log_ratio", "values"):
        assert (ro[key] * (1 - mask) == 0).all(), key  # nothing after the first EOS
    for i in range(len(prompts)):  # each sequence alone, unpadded
        n, ids = int(mask[i].sum()), data.encode_prompt(tok, prompts[i])
        resp = ro["input_ids"][i, P : P + n].tolist()
        full = torch.tensor([ids + resp])
        # (n, V): predicts each response token
        logits = models["policy"](full).logits[0, len(ids) - 1 : -1] / 0.7
        expected = logits.log_softmax(-1).gather(-1, torch.tensor(resp)[:, None]).squeeze(-1)
        torch.testing.assert_close(ro["logprobs"][i, :n], expected, atol=1e-5, rtol=0)
        head = []
        h = models["critic"].score.register_forward_hook(
            lambda m, a, out, head=head: head.append(out)
        )
        models["critic"](full)
        h.remove()
        values = head[0][0, len(ids) - 1 : -1, 0]  # V(s_h): the head where token h is predicted
        values = (values - models["critic"].config.reward_mean) / models["critic"].config.reward_std
        torch.testing.assert_close(ro["values"][i, :n], values, atol=1e-5, rtol=0)
        assert (tok.eos_token_id in resp) == bool(ro["ended"][i])
    assert ro["padding_share"] == pytest.approx(
        padding_share(ro, ro["attention_mask"].sum(-1).argsort(), 5)
    )
    # less than the untrimmed batch's
    assert ro["padding_share"] < 1 - ro["attention_mask"].float().mean()


@torch.no_grad()
def test_generation_logprobs_equal_the_frozen_pass_ones(pipeline, acc):
    """--generation_logprobs: log pi_old recorded while sampling (KV cache, top-p on) equals the frozen pass's
    forward of the policy to 1e-5 in float32, and the policy then runs no forward in the frozen pass."""
    _, tok, models, prompts, ro = sampled(acc, pipeline, "--temperature", 0.7, "--top_p", 0.9)
    g_args = rto_args(
        pipeline,
        "--max_new_tokens",
        16,
        "--temperature",
        0.7,
        "--top_p",
        0.9,
        "--generation_logprobs",
    )
    calls = []
    hook = models["policy"].register_forward_hook(lambda *a: calls.append(1))
    g_ro = rto.rollout(acc, models["policy"], tok, prompts, list(range(len(prompts))), g_args)
    n = len(calls)
    g_ro = rto.frozen_pass(acc, g_ro, models, g_args)
    hook.remove()
    assert len(calls) == n  # no policy forward in the frozen pass
    assert torch.equal(g_ro["input_ids"], ro["input_ids"])  # the same draws
    torch.testing.assert_close(g_ro["logprobs"], ro["logprobs"], atol=1e-5, rtol=0)
    assert (g_ro["logprobs"] * (1 - ro["response_mask"]) == 0).all() and (
        g_ro["logprobs"] < 0
    ).any()


def padding_share(ro, order, size):
    """By hand: each batch of `size` sequences in `order` computes its rows times the span of its real columns."""
    real = computed = 0
    for i in range(0, len(order), size):
        rows = ro["attention_mask"][order[i : i + size]]
        columns = [j for j in range(rows.shape[1]) if rows[:, j].any()]
        real, computed = (
            real + rows.sum().item(),
            computed + len(rows) * (columns[-1] - columns[0] + 1),
        )
    return 1 - real / computed


@torch.no_grad()
def test_dpo_token_reward_is_taken_at_temperature_one(pipeline, acc):
    """At T = 0.7: with the SFT model as the DPO model the token rewards are exactly 0, and with the real DPO
    model beta * sum_h (log pi_dpo - log pi_ref) is dpo.py's implicit reward of the same response."""
    *_, ro = sampled(acc, pipeline, "--temperature", 0.7, "--dpo_ckpt", pipeline["sft"])
    assert (ro["dpo_log_ratio"] == 0).all() and ro["response_mask"].sum() > 0
    args, tok, models, prompts, ro = sampled(acc, pipeline, "--temperature", 0.7)
    beta = models["dpo"].config.dpo_beta
    implicit = beta * (
        speed.response_logprobs(models["dpo"], ro).sum(-1)
        - speed.response_logprobs(models["ref"], ro).sum(-1)
    )  # dpo.py's sequence log-probs
    torch.testing.assert_close(beta * ro["dpo_log_ratio"].sum(-1), implicit, atol=1e-4, rtol=0)
    assert implicit.abs().max() > 0.05  # a real DPO model: the check above is not 0 = 0
    kl = ((ro["logprobs"] - ro["ref_logprobs"]) * ro["response_mask"]).abs().max()
    assert kl == 0  # the policy is the reference, both tempered: no KL at the first iteration


@torch.no_grad()
def test_critic_starts_as_the_normalised_reward_model_and_reloads_the_same(pipeline, acc, tmp_path):
    args, tok, models, prompts, ro = sampled(acc, pipeline, "--reward_clip", 1e9, n=8)
    T = ro["attention_mask"].shape[1]
    last = T - 1 - ro["attention_mask"].flip(-1).argmax(-1)
    cfg = models["rm"].config
    critic_at_last = speed.head_outputs(models["critic"], ro).gather(1, last[:, None]).squeeze(1)
    torch.testing.assert_close(
        (critic_at_last - cfg.reward_mean) / cfg.reward_std, ro["rm_score"], atol=1e-5, rtol=0
    )
    assert ro["rm_score"].std() > 0.1 and ro["values"].abs().max() < 10  # on the normalised scale
    common.save_model(acc, models["critic"], tok, str(tmp_path / "critic"))
    again = common.load_scorer(str(tmp_path / "critic"), tok, "critic")
    torch.testing.assert_close(rto.critic_values(again, ro, args), ro["values"], atol=1e-6, rtol=0)
    clipped = rto.rm_score(
        models["rm"], ro, SimpleNamespace(normalize_reward=True, reward_clip=0.5)
    )
    torch.testing.assert_close(clipped, ro["rm_score"].clamp(-0.5, 0.5))  # normalised, then clamped
    raw = rto.rm_score(models["rm"], ro, SimpleNamespace(normalize_reward=False, reward_clip=1e9))
    torch.testing.assert_close(
        (raw - cfg.reward_mean) / cfg.reward_std, ro["rm_score"], atol=1e-5, rtol=0
    )
    # off with the flag: the critic keeps the raw scale
    raw_args = rto_args(pipeline, "--no_normalize_reward")
    raw_values = speed.head_outputs(again, ro)[:, ro["prompt_len"] - 1 : -1] * ro["response_mask"]
    torch.testing.assert_close(rto.critic_values(again, ro, raw_args), raw_values)
    assert (raw_values - ro["values"]).abs().max() > 0.1


def prepared(
    acc,
    models,
    accum,
    optimizer=lambda params: torch.optim.Adam(params, lr=1e-3, betas=(0.9, 0.95)),
):
    """Policy and critic prepared with Adam (or `optimizer`) and a constant schedule, as main() does (one process)."""
    acc.gradient_accumulation_steps = accum
    opts = [optimizer(models[m].parameters()) for m in ("policy", "critic")]
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0) for o in opts]
    return acc.prepare(models["policy"], models["critic"], *opts, *scheds)


def test_frozen_models_run_once_per_rollout_and_first_ratio_is_one(pipeline, acc, monkeypatch):
    args = rto_args(
        pipeline,
        "--rollout_batch_size",
        16,
        "--mini_batch_size",
        8,
        "--micro_batch_size",
        4,
        "--forward_batch_size",
        4,
    )
    tok, models, _ = rto.load_models(args, acc)
    calls = {name: 0 for name in models}
    for name, m in models.items():  # scalar-head models run through their backbone
        (m.base_model if name in ("critic", "rm") else m).register_forward_hook(
            lambda *a, name=name: calls.__setitem__(name, calls[name] + 1)
        )
    sizes = rto.batch_sizes(args, 1)
    models["policy"], models["critic"], *rest = prepared(acc, models, sizes["accum"])
    opts, scheds = rest[:2], rest[2:]
    ro = rto.rollout(
        acc, models["policy"], tok, toy_task.prompts("train", 16), list(range(16)), args
    )
    calls.update(policy=0)  # generation's own forward passes
    ro = rto.frozen_pass(acc, ro, models, args)
    # one pass per forward batch, and a one-token probe of each causal LM's head (speed.changes_logits, once)
    assert calls == {"policy": 4 + 1, "critic": 4, "ref": 4 + 1, "dpo": 4 + 1, "rm": 4}
    ro["rewards"] = rto.token_rewards(ro, args, 0.1)
    ro["advantages"], ro["returns"] = rto.gae(
        ro["rewards"], ro["values"], ro["response_mask"], 1.0, 0.95
    )
    ratios = []
    real_policy_loss = rto.policy_loss
    monkeypatch.setattr(
        rto,
        "policy_loss",
        lambda *a: (
            lambda out: (ratios.append(common.masked_mean(out[1]["ratio"], a[3]).item()), out)[1]
        )(real_policy_loss(*a)),
    )
    frozen_before = {k: calls[k] for k in ("ref", "dpo", "rm")}
    stats = rto.ppo_update(acc, ro, models, opts, scheds, args, sizes)
    assert {
        k: calls[k] for k in ("ref", "dpo", "rm")
    } == frozen_before  # never again in the PPO epochs
    # micro-batches before the first optimiser step see the policy that sampled: ratio exactly 1 (dropout off)
    assert ratios[: sizes["accum"]] == pytest.approx([1.0] * sizes["accum"], abs=1e-5)
    assert len(ratios) == args.ppo_epochs * 16 // 4 and math.isfinite(stats["policy_loss"])
    assert any(abs(r - 1) > 1e-4 for r in ratios[sizes["accum"] :])  # and then the policy moves


def test_gradient_accumulation_gives_the_weights_of_one_big_micro_batch(pipeline, acc):
    """One PPO iteration with micro-batch = mini-batch and with micro-batch = mini-batch / 2, padded or packed
    (--packing): the same weights. With SGD, whose step is proportional to the gradient (Adam's is not: it would
    hide a gradient off by the accumulation factor, and it magnifies float noise where a gradient is near 0)."""
    args = rto_args(pipeline, "--rollout_batch_size", 8, "--mini_batch_size", 4, "--ppo_epochs", 1)
    tok, models, _ = rto.load_models(args, acc)
    ro = rto.rollout(acc, models["policy"], tok, toy_task.prompts("train", 8), list(range(8)), args)
    ro = rto.frozen_pass(acc, ro, models, args)
    ro["rewards"] = rto.token_rewards(ro, args, 0.1)
    ro["advantages"], ro["returns"] = rto.gae(
        ro["rewards"], ro["values"], ro["response_mask"], 1.0, 0.95
    )
    ro["advantages"] = rto.whiten(acc, ro["advantages"], ro["response_mask"])
    weights = []
    for micro, packing in ((4, False), (2, False), (2, True)):
        args.packing = packing
        copies = {
            **models,
            "policy": copy.deepcopy(models["policy"]),
            "critic": copy.deepcopy(models["critic"]),
        }
        sizes = {"rollout": 8, "mini": 4, "micro": micro, "accum": 4 // micro}
        policy, critic, *rest = prepared(
            acc, copies, sizes["accum"], lambda params: torch.optim.SGD(params, lr=0.1)
        )
        torch.manual_seed(0)  # the same mini-batch order
        stats = rto.ppo_update(
            acc, ro, {**copies, "policy": policy, "critic": critic}, rest[:2], rest[2:], args, sizes
        )
        torch.manual_seed(0)
        assert stats["padding_share_update"] == (
            0 if packing else pytest.approx(padding_share(ro, torch.randperm(8), micro))
        )
        weights.append([p.detach().clone() for m in (policy, critic) for p in m.parameters()])
    moved = max(
        (a - b).abs().max().item()
        for a, b in zip(weights[0], models["policy"].parameters(), strict=False)  # the policy's
    )
    assert moved > 1e-4  # the update did something
    for other in weights[1:]:
        for a, b in zip(weights[0], other, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_pack_lays_sequences_end_to_end_in_one_row():
    """speed.pack on a hand-made batch: sequences of 5, 4, 3, 2 and 1 real tokens (prompts left-padded to 3,
    responses right-padded to 4) end to end in one row, positions 0, 1, ... for each, their spans for packed_sdpa;
    `index` puts each token back, `columns` points at the position before each response token."""
    prompts, responses = [3, 2, 1, 1, 1], [2, 2, 2, 1, 0]  # lengths 5, 4, 3, 2, 1
    mask = torch.tensor(
        [
            [0] * (3 - p) + [1] * (p + r) + [0] * (4 - r)
            for p, r in zip(prompts, responses, strict=True)
        ]
    )
    ids = torch.arange(1, 36).view(5, 7) * mask
    response_mask = mask[:, 3:]
    packed = speed.pack(
        {"input_ids": ids, "attention_mask": mask, "response_mask": response_mask, "prompt_len": 3}
    )["packed"]
    rows = ids[mask.bool()].split(mask.sum(-1).tolist())  # each sequence's real tokens
    assert packed["input_ids"].tolist() == [sum((r.tolist() for r in rows), [])]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2, 0, 1, 0]]
    assert packed["sequences"] == [(0, 5), (5, 9), (9, 12), (12, 14), (14, 15)]
    flat = packed["input_ids"].flatten()
    for b in range(5):
        assert flat[packed["index"][b][mask[b].bool()]].tolist() == rows[b].tolist()
        for j in range(4):  # response token j is predicted at the position of the token before it
            want = packed["index"][b, 2 + j].item() if response_mask[b, j] else 0
            assert packed["columns"][b, j].item() == want


def test_packed_sdpa_attends_within_each_sequence_as_a_block_diagonal_mask_does():
    """speed.packed_sdpa over a row of 3 sequences (grouped-query: 4 query heads, 2 key/value heads) against
    transformers' sdpa (key and value heads repeated) with the block-diagonal causal mask over the whole row; and
    under a mask itself (the kernel's grouped-query attention) against the same: outputs and gradients to 1e-6."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, h, 9, 8, requires_grad=True) for h in (4, 2, 2))
    seq = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2])
    mask = (seq[:, None] == seq[None, :]) & torch.ones(9, 9, dtype=torch.bool).tril()  # (L, L)
    module = SimpleNamespace(num_key_value_groups=2, is_causal=True, training=False)
    outs, grads = [], []
    for run in (
        lambda: speed.packed_sdpa(
            module, q, k, v, None, scaling=0.3, sequences=[(0, 4), (4, 6), (6, 9)]
        ),
        lambda: speed.packed_sdpa(module, q, k, v, mask[None, None], scaling=0.3),
        lambda: sdpa_attention_forward(module, q, k, v, mask[None, None], scaling=0.3),
    ):
        out, _ = run()  # (1, L, h, d)
        grads.append(
            torch.autograd.grad(
                (out * torch.arange(out.numel()).view(out.shape).sin()).sum(), (q, k, v)
            )
        )
        outs.append(out.detach())
    assert outs[0].shape == (1, 9, 4, 8)
    for i in (0, 1):
        torch.testing.assert_close(outs[i], outs[2], atol=1e-6, rtol=0)
        for a, b in zip(grads[i], grads[2], strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_packed_sdpa_decodes_left_padded_rows_with_grouped_heads_as_transformers_sdpa_does():
    """One decoding step of 3 left-padded rows (one query each, 9 cached keys, 2 query heads per key/value head):
    packed_sdpa under the padding mask equals transformers' sdpa, which repeats the key and value heads, to 1e-6."""
    torch.manual_seed(1)
    q, k, v = torch.randn(3, 4, 1, 8), torch.randn(3, 2, 9, 8), torch.randn(3, 2, 9, 8)
    # (b, 1, 1, L_kv): left padding
    mask = (torch.arange(9) >= torch.tensor([0, 3, 7])[:, None])[:, None, None]
    module = SimpleNamespace(num_key_value_groups=2, is_causal=True, training=False)
    ours, _ = speed.packed_sdpa(module, q, k, v, mask, scaling=0.3)
    theirs, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.3)
    assert ours.shape == (3, 1, 4, 8)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


def test_generation_decodes_eagerly_from_the_prefilled_static_cache(pipeline, acc, monkeypatch):
    """rto.rollout and speed.sample hand generate() speed.prefill's StaticCache with disable_compile=True: on GPUs
    transformers would otherwise compile the decoding step for a StaticCache, again for every cache size."""
    from transformers import StaticCache

    args = rto_args(pipeline, "--max_new_tokens", 8)
    tok, models, _ = rto.load_models(args, acc)
    model, seen = models["policy"], []
    criteria = type(model)._valid_auto_compile_criteria
    monkeypatch.setattr(
        type(model),
        "_valid_auto_compile_criteria",
        lambda self, kwargs, config: (
            seen.append((type(kwargs.get("past_key_values")), config.disable_compile))
            or criteria(self, kwargs, config)
        ),
    )
    prompts = toy_task.prompts("test", 4)
    rto.rollout(acc, model, tok, prompts, list(range(4)), args)
    speed.sample(model, tok, [data.encode_prompt(tok, p) for p in prompts], [0, 1, 2, 3], 8)
    assert seen == [(StaticCache, True)] * 2


def test_packed_batches_give_the_padded_logprobs_values_and_gradients(pipeline, acc):
    """speed.pack: the sequences of a micro-batch end to end in one row, no padding: log-probs, entropies, values
    and every gradient of a loss over them equal the padded batch's (1e-6 on the numbers, 1e-5 on gradients)."""
    args, tok, models, prompts, ro = sampled(acc, pipeline, "--temperature", 0.7, n=8)
    _, mb = next(data.micro_batches(ro, 8, torch.arange(8)))
    assert (mb["attention_mask"] == 0).float().mean() > 0.2  # much padding to drop
    # speed.packed_sdpa for packed rows
    assert models["policy"].config._attn_implementation == "sdpa_packed"
    out = []
    for packing in (False, True):
        b = speed.pack(mb) if packing else mb
        for m in (models["policy"], models["critic"]):
            m.zero_grad()
        lp, ent = rto.token_logprobs(models["policy"], b, 0.7, with_entropy=True)
        values = rto.critic_values(models["critic"], b, args)
        (lp.exp().sum() + (values**2).sum()).backward()
        out.append(
            [lp.detach(), ent, values.detach()]
            + [p.grad.clone() for m in (models["policy"], models["critic"]) for p in m.parameters()]
        )
    # log-probs ~ -3: float32 rounding
    torch.testing.assert_close(out[1][:3], out[0][:3], atol=1e-6, rtol=1e-6)
    # gradients: other summation orders
    torch.testing.assert_close(out[1][3:], out[0][3:], atol=1e-5, rtol=1e-5)


def test_packed_frozen_pass_gives_the_padded_outputs_and_packing_is_the_default_on_real_data(
    pipeline, acc
):
    """--packing in the frozen pass: every output (log pi_old, log pi_ref, values, DPO log-ratios, reward scores)
    equals the padded passes' to 1e-5, and no padding is computed. Real prompts vary in length, so it is on there
    by default; the built-in task keeps the padded passes."""
    args, tok, models, prompts, ro = sampled(
        acc, pipeline, "--temperature", 0.7, "--forward_batch_size", 8, n=16
    )
    packed = rto.frozen_pass(
        acc,
        {
            k: v
            for k, v in ro.items()
            if k in ("input_ids", "attention_mask", "response_mask", "ended", "prompt_len")
        },
        models,
        dataclasses.replace(args, packing=True),
    )
    # the frozen pass's forward batches: grouped by length
    order = ro["attention_mask"].sum(-1).argsort()
    assert (
        ro["padding_share"] == pytest.approx(padding_share(ro, order, 8))
        and ro["padding_share"] > 0.1
    )
    assert packed["padding_share"] == 0
    for k in ("logprobs", "ref_logprobs", "values", "dpo_log_ratio", "rm_score"):
        torch.testing.assert_close(packed[k], ro[k], atol=1e-5, rtol=0, msg=k)
    assert args.packing is False
    real = common.parse_args(
        rto.Args,
        ["--sft_ckpt", "x", "--dataset", "HuggingFaceH4/ultrafeedback_binarized"],
        rto.DEFAULTS,
    )
    assert real.packing is True
    assert (
        common.parse_args(
            rto.Args, ["--sft_ckpt", "x", "--dataset", "y", "--packing", "false"], rto.DEFAULTS
        ).packing
        is False
    )


# ---------------------------------------------------------------------------- rto.py as users run it


def test_rto_raises_the_oracle_reward_above_sft(pipeline, tmp_path):
    run_main("rto.py", *rto_cmd(pipeline, tmp_path / "rto"))
    m = read_metrics(tmp_path / "rto")
    evals = [r for r in m if r.get("phase") == "eval"]
    assert [r["step"] for r in evals] == [0, evals[-1]["step"]]  # before and after (--eval_every 0)
    before, after = evals[0]["eval_score"], evals[-1]["eval_score"]
    print(f"oracle reward of held-out samples: SFT {before:.3f} -> RTO {after:.3f}")
    assert after > before + 0.5
    it = [r for r in m if "policy_loss" in r]
    for key in (
        "sentence_reward",
        "dpo_reward_per_token",
        "dpo_reward_per_response",
        "kl_per_token",
        "beta2",
        "response_length",
        "eos_rate",
        "policy_loss",
        "value_loss",
        "clip_frac",
        "approx_kl",
        "entropy",
        "time_generate",
        "time_frozen_pass",
        "time_update",
        "oracle_reward",
        "explained_variance",
        "padding_share",
        "padding_share_update",
    ):
        assert all(math.isfinite(r[key]) for r in it), key
    assert it[0]["kl_per_token"] == 0  # the policy starts as the reference
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    AutoModelForCausalLM.from_pretrained(tmp_path / "rto")
    AutoModelForSequenceClassification.from_pretrained(tmp_path / "rto" / "critic", num_labels=1)
    derived = json.loads((tmp_path / "rto" / "args.json").read_text())["derived"]
    assert derived == {"rollout": 64, "mini": 16, "micro": 16, "accum": 1}


@pytest.mark.parametrize("mode", ["ppo", "dppo"])
def test_ppo_and_dppo_run_several_iterations(mode, pipeline, tmp_path):
    run_main(
        "rto.py",
        *rto_cmd(
            pipeline,
            tmp_path / mode,
            "--reward_mode",
            mode,
            "--num_iterations",
            3,
            "--rollout_batch_size",
            16,
            "--eval_num_prompts",
            8,
        ),
    )
    it = iteration_metrics(tmp_path / mode)
    assert len(it) == 3
    for key in ("reward_total", "policy_loss", "value_loss", "kl_per_token", "entropy"):
        assert all(math.isfinite(r[key]) for r in it), key
    # the policy moves
    assert len({r["kl_per_token"] for r in it}) == 3 and it[0]["kl_per_token"] == 0
    assert ("sentence_reward" in it[0]) == (mode == "ppo") and (
        "dpo_reward_per_response" in it[0]
    ) == (mode == "dppo")


def test_a_non_finite_reward_stops_the_run_or_skips_the_iteration(pipeline, tmp_path, monkeypatch):
    real = rto.token_rewards
    monkeypatch.setattr(
        rto, "token_rewards", lambda ro, args, beta2: real(ro, args, beta2) * float("nan")
    )
    small = (
        "--num_iterations",
        2,
        "--rollout_batch_size",
        8,
        "--mini_batch_size",
        8,
        "--eval_num_prompts",
        4,
    )
    with pytest.raises(SystemExit, match="non-finite reward at iteration 1"):
        rto.main(list(map(str, rto_cmd(pipeline, tmp_path / "stop", *small))))
    rto.main(list(map(str, rto_cmd(pipeline, tmp_path / "skip", *small, "--skip_nonfinite"))))
    # both iterations skipped, the run still ends and saves
    assert iteration_metrics(tmp_path / "skip") == []
    assert (tmp_path / "skip" / "model.safetensors").exists()


def test_a_phases_seconds_include_the_device_work_it_queued(monkeypatch):
    """On GPUs kernels run after the host has moved on: rto.phase_clock waits for the device before it reads the
    clock. A stand-in device whose queued work takes 0.3 s to finish: the phase that queued it is billed for it, not
    the next one."""
    import time

    queued = []
    monkeypatch.setattr(
        torch.accelerator,
        "synchronize",
        lambda device=None: [time.sleep(queued.pop()) for _ in list(queued)],
    )
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 0)
    clock = rto.phase_clock(SimpleNamespace(device=torch.device("cuda")))
    queued.append(0.3)  # the first phase's kernels, still running when its Python returns
    clock("generate")
    clock("update")
    assert clock.metrics["time_generate"] >= 0.3 and clock.metrics["time_update"] < 0.3


NOISY = [
    ("llama-gqa", {"attention_dropout": 0.5}),  # a float the attention modules pass to the kernel
    ("gpt2", {"attn_pdrop": 0.5, "resid_pdrop": 0.5, "embd_pdrop": 0.5}),  # nn.Dropout modules
    (
        "falcon",
        {"attention_dropout": 0.5, "hidden_dropout": 0.5},
    ),  # read from the config at every forward
    ("mixtral", {"router_jitter_noise": 0.5, "attention_dropout": 0.5}),
]  # the router's input jittered


@pytest.mark.parametrize("family, noise", NOISY, ids=[f for f, _ in NOISY])
def test_a_checkpoint_whose_config_sets_dropout_computes_the_same_in_train_and_eval_mode(
    family, noise, tmp_path
):
    """Whatever training-mode noise a checkpoint's config asks for, a loaded model computes in train mode what it
    does in eval mode: the frozen pass and the update see one policy."""
    from conftest import tiny_model

    tok = data.build_tiny_tokenizer(common.TOY)
    model = tiny_model(tok, family)
    model.config.update(noise)  # as a checkpoint's config.json gives them
    model.save_pretrained(tmp_path)
    assert all(json.loads((tmp_path / "config.json").read_text())[k] == v for k, v in noise.items())
    ids = torch.randint(3, len(tok), (2, 12), generator=torch.Generator().manual_seed(0))
    for scorer in (False, True):
        model = (
            common.load_scorer(str(tmp_path), tok, "m", new_head=True)
            if scorer
            else common.load_causal_lm(str(tmp_path), tok)
        )
        with torch.no_grad():
            train = [model.train()(ids).logits for _ in range(2)]
            torch.testing.assert_close(train[0], model.eval()(ids).logits, atol=1e-6, rtol=0)
        assert torch.equal(train[0], train[1]), family


def test_with_attention_dropout_in_the_config_the_first_ppo_ratio_is_one(tmp_path):
    """rto.py on a policy whose config sets attention_dropout 0.5, one mini-batch, one epoch: the logged ratio
    (the mean over the mini-batch's tokens, before its optimiser step) is 1."""
    from conftest import tiny_model

    tok = data.build_tiny_tokenizer(common.TOY)
    model = tiny_model(tok, "llama-gqa")
    model.config.attention_dropout = 0.5  # as a checkpoint's config.json gives it
    model.save_pretrained(tmp_path / "sft")
    tok.save_pretrained(tmp_path / "sft")
    assert json.loads((tmp_path / "sft" / "config.json").read_text())["attention_dropout"] == 0.5
    run_main(
        "rto.py",
        "--sft_ckpt",
        tmp_path / "sft",
        "--reward_mode",
        "dppo",
        "--dpo_ckpt",
        tmp_path / "sft",
        "--beta3",
        0,
        "--rollout_batch_size",
        8,
        "--mini_batch_size",
        8,
        "--ppo_epochs",
        1,
        "--num_iterations",
        1,
        "--max_new_tokens",
        8,
        "--eval_num_prompts",
        4,
        "--sample_every",
        0,
        "--output_dir",
        tmp_path / "rto",
    )
    (first,) = iteration_metrics(tmp_path / "rto")
    assert first["ratio"] == pytest.approx(1, abs=1e-6) and first["approx_kl"] == pytest.approx(
        0, abs=1e-6
    )


@pytest.mark.parametrize("family", ["mistral", "llama-gqa"])
def test_packed_rows_give_the_padded_numbers_on_grouped_heads_and_a_sliding_window(family):
    """A tiny Mistral (a sliding window of 4 tokens; 4 query heads share 2 key/value heads) and a tiny Llama with
    the same heads, on sequences of 9 to 15 tokens: log-probs, entropies, critic values, DPO log-ratios and the
    gradients, packed (speed.pack, packed_sdpa) and padded, equal to 1e-5; and the padded numbers equal
    transformers' eager attention's, padded and packed (there transformers masks the sequences from the positions,
    as for any attention but packed_sdpa). The window changes the numbers (against the same model without it), so the
    test sees whether packing honours it."""
    from conftest import tiny_model

    tok = data.build_tiny_tokenizer(common.TOY)
    policy, dpo = tiny_model(tok, family, seed=0), tiny_model(tok, family, seed=1)
    critic = tiny_model(tok, family, seed=2, scorer=True)
    prompts = [[5 + i for i in range(n)] for n in (3, 7, 5)]
    responses = [[20 + i for i in range(n)] for n in (8, 2, 10)]  # sequences of 11, 9 and 15 tokens
    batch = data.collate(prompts, responses, tok.pad_token_id)
    args = SimpleNamespace(rm_ckpt=None, normalize_reward=False)
    out = {}
    for layout in ("padded", "packed"):
        b = speed.pack(batch) if layout == "packed" else batch
        for m in (policy, critic):
            m.zero_grad()
        lp, ent = rto.token_logprobs(policy, b, 0.7, with_entropy=True)
        values = rto.critic_values(critic, b, args)
        (lp.exp().sum() + (values**2).sum()).backward()
        with torch.no_grad():
            ratio = rto.token_logprobs(dpo, b) - rto.token_logprobs(policy, b)
        grads = [p.grad.clone() for m in (policy, critic) for p in m.parameters()]
        out[layout] = [lp.detach(), ent, values.detach(), ratio], grads
    torch.testing.assert_close(out["packed"][0], out["padded"][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out["packed"][1], out["padded"][1], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        # transformers' own attention, its own masks (packed: from positions)
        policy.set_attn_implementation("eager")
        for b in (batch, speed.pack(batch)):
            torch.testing.assert_close(
                rto.token_logprobs(policy, b, 0.7), out["padded"][0][0], atol=1e-5, rtol=0
            )
        torch.testing.assert_close(
            rto.plain_token_logprobs(policy, batch, 0.7), out["padded"][0][0], atol=1e-5, rtol=0
        )
        if family == "mistral":
            policy.config.sliding_window = None
            assert (
                rto.plain_token_logprobs(policy, batch, 0.7) - out["padded"][0][0]
            ).abs().max() > 1e-3


def test_plumbing_keeps_and_cuts_a_forks_own_tensors_by_their_shape():
    """data.cat_batches pads every per-token tensor of the rollout's chunks, whatever its key, and
    data.micro_batches cuts every (B, P + R) and (B, R) tensor to the micro-batch's columns; a tensor of another
    width passes whole. By hand: two chunks of responses 2 and 3 tokens wide after prompts of width 2."""
    chunks = [
        {
            "input_ids": torch.tensor([[7, 8, 3, 4]]),
            "attention_mask": torch.tensor([[1, 1, 1, 1]]),
            "response_mask": torch.tensor([[1.0, 1.0]]),
            "ended": torch.tensor([True]),
            "bonus": torch.tensor([[0.5, 0.25]]),  # (b, R_b): a fork's per-token tensor
            "topk": torch.tensor(
                [[1, 2, 3, 4, 5, 6]]
            ),  # (b, K), K neither R nor P + R: not per token
            "prompt_len": 2,
        },
        {
            "input_ids": torch.tensor([[0, 9, 5, 6, 2]]),
            "attention_mask": torch.tensor([[0, 1, 1, 1, 1]]),
            "response_mask": torch.tensor([[1.0, 1.0, 1.0]]),
            "ended": torch.tensor([False]),
            "bonus": torch.tensor([[1.0, 2.0, 3.0]]),
            "topk": torch.tensor([[6, 7, 8, 9, 10, 11]]),
            "prompt_len": 2,
        },
    ]
    batch = data.cat_batches(chunks, pad_id=0)
    assert batch["input_ids"].tolist() == [[7, 8, 3, 4, 0], [0, 9, 5, 6, 2]]
    assert batch["bonus"].tolist() == [[0.5, 0.25, 0.0], [1.0, 2.0, 3.0]]
    assert batch["topk"].shape == (2, 6) and batch["ended"].tolist() == [True, False]
    assert batch["prompt_len"] == 2
    (_, micro), (_, other) = data.micro_batches(batch, 1, torch.arange(2))
    assert (
        micro["input_ids"].tolist() == [[7, 8, 3, 4]] and micro["prompt_len"] == 2
    )  # response padding cut
    assert micro["bonus"].tolist() == [[0.5, 0.25]] and micro["topk"].tolist() == [
        [1, 2, 3, 4, 5, 6]
    ]
    assert (
        other["input_ids"].tolist() == [[9, 5, 6, 2]] and other["prompt_len"] == 1
    )  # prompt padding cut
    assert other["bonus"].tolist() == [[1.0, 2.0, 3.0]] and other["topk"].shape == (1, 6)


def test_a_fork_adds_a_per_token_reward_in_the_rollout_without_touching_plumbing(
    tmp_path, monkeypatch
):
    """A fork's edit, as a reader of rto.py would make it: rollout() puts a (b, R) tensor of its own in each chunk,
    and token_rewards() adds it. The plumbing in between (cat_batches, frozen_pass, micro_batches, the update)
    carries it without an edit: the first iteration's logged reward_total rises by 0.5 per response token."""
    from conftest import tiny_model

    tok = data.build_tiny_tokenizer(common.TOY)
    tiny_model(tok, "llama-gqa").save_pretrained(tmp_path / "sft")
    tok.save_pretrained(tmp_path / "sft")
    run = ["--sft_ckpt", tmp_path / "sft", "--reward_mode", "dppo", "--dpo_ckpt", tmp_path / "sft"]
    run += ["--beta3", 0, "--rollout_batch_size", 8, "--mini_batch_size", 4, "--num_iterations", 1]
    run += [
        "--max_new_tokens",
        8,
        "--eval_num_prompts",
        4,
        "--sample_every",
        0,
        "--generation_batch_size",
        3,
    ]
    run_main("rto.py", *run, "--output_dir", tmp_path / "plain")
    cat_batches, token_rewards = data.cat_batches, rto.token_rewards

    # the fork's line in rollout(): each chunk gets its own (b, R_b) tensor
    def with_bonus(chunks, pad_id):
        for chunk in chunks:
            chunk["bonus"] = 0.5 * chunk["response_mask"]
        return cat_batches(chunks, pad_id)

    monkeypatch.setattr(data, "cat_batches", with_bonus)
    monkeypatch.setattr(
        rto, "token_rewards", lambda b, a, beta2: token_rewards(b, a, beta2) + b["bonus"]
    )
    run_main("rto.py", *run, "--output_dir", tmp_path / "fork")
    (plain,) = iteration_metrics(tmp_path / "plain")
    (fork,) = iteration_metrics(tmp_path / "fork")
    assert fork["response_length"] == plain["response_length"] > 1  # the same rollout
    bonus = 0.5 * plain["response_length"]
    assert fork["reward_total"] == pytest.approx(plain["reward_total"] + bonus, abs=1e-5)
    assert fork["policy_loss"] != plain["policy_loss"]  # the update saw it


def test_packed_attention_refuses_what_it_cannot_compute_with_one_line():
    """A packed row under attention that sdpa cannot express per sequence here (a position bias, attention sinks,
    soft-capping, no causal mask) stops with one line that names --packing false, instead of wrong numbers."""
    q, k, v = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    module = SimpleNamespace(num_key_value_groups=1, is_causal=True, training=False)
    rows = [(0, 2), (2, 5)]
    for extra in (
        {"position_bias": torch.zeros(1, 2, 5, 5)},
        {"s_aux": torch.zeros(2)},
        {"is_causal": False},
    ):
        with pytest.raises(SystemExit, match=r"^error: packed rows: .*; pass --packing false$"):
            speed.packed_sdpa(module, q, k, v, None, sequences=rows, **extra)
    out, _ = speed.packed_sdpa(module, q, k, v, None, sequences=rows, sliding_window=None)
    assert out.shape == (1, 5, 2, 4)
