"""rto.py: token rewards, GAE, PPO losses against hand computations and naive loops; then end-to-end runs."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

import rto
from conftest import read_metrics, run_stage


def make_args(mode, **kw):
    base = dict(reward_mode=mode, beta1=0.5, dpo_reward_clip=0.0, beta3=2.0, missing_eos_penalty=0.0)
    return SimpleNamespace(**{**base, **kw})


@pytest.fixture
def rollout():
    """Two responses: one of 3 tokens ending in EOS, one of 2 tokens cut by the length limit; R = 4."""
    return {
        "response_mask": torch.tensor([[1.0, 1, 1, 0], [1, 1, 0, 0]]),
        "ended": torch.tensor([True, False]),
        "logprobs": torch.tensor([[-1.0, -2.0, -0.5, 7.0], [-1.0, -1.0, 7.0, 7.0]]),
        "ref_logprobs": torch.tensor([[-1.5, -1.0, -0.5, 3.0], [-2.0, -0.5, 3.0, 3.0]]),
        # beta1 * (log pi_dpo - log pi_ref) with beta1 = 0.5; padding is 0 as common.dpo_token_rewards gives it
        "dpo_rewards": torch.tensor([[0.5, -0.25, 0.1, 0.0], [-1.0, 0.2, 0.0, 0.0]]),
        "score": torch.tensor([1.5, -0.5]),
    }


# KL term -beta2 * (logprobs - ref) with beta2 = 0.1, by hand: row 0: 0.5, -1, 0 -> -0.05, 0.1, 0; row 1: 1, -0.5
KL = [[-0.05, 0.1, 0.0, 0.0], [-0.1, 0.05, 0.0, 0.0]]


def test_token_rewards_ppo(rollout):
    r = rto.token_rewards(rollout, make_args("ppo"), beta2=0.1)
    # reward model 2.0 * score lands on the last real token: index 2 (the EOS) in row 0, index 1 in row 1
    expected = [[-0.05, 0.1, 0.0 + 3.0, 0.0], [-0.1, 0.05 - 1.0, 0.0, 0.0]]
    torch.testing.assert_close(r, torch.tensor(expected))


def test_token_rewards_dppo(rollout):
    r = rto.token_rewards(rollout, make_args("dppo"), beta2=0.1)
    # sum of the DPO token rewards at the last token, no reward model
    expected = [[-0.05, 0.1, 0.35, 0.0], [-0.1, 0.05 - 0.8, 0.0, 0.0]]
    torch.testing.assert_close(r, torch.tensor(expected))


def test_token_rewards_rto_with_clip_and_missing_eos_penalty(rollout):
    r = rto.token_rewards(rollout, make_args("rto", dpo_reward_clip=0.3, missing_eos_penalty=4.0), beta2=0.1)
    dense = [[0.3, -0.25, 0.1, 0.0], [-0.3, 0.2, 0.0, 0.0]]  # clamped to [-0.3, 0.3]
    last = [[0, 0, 3.0, 0], [0, -1.0 - 4.0, 0, 0]]  # reward model; row 1 has no EOS: penalty 4
    expected = torch.tensor(KL) + torch.tensor(dense) + torch.tensor(last)
    torch.testing.assert_close(r, expected)


def test_token_rewards_rto_paper_v1_without_reward_model(rollout):
    r = rto.token_rewards(rollout, make_args("rto", beta3=0.0), beta2=0.1)
    torch.testing.assert_close(r, torch.tensor(KL) + rollout["dpo_rewards"])
    # summed over a response, the DPO part is DPO's sentence-level implicit reward (what DPPO puts at the end)
    dppo = rto.token_rewards(rollout, make_args("dppo"), beta2=0.1)
    torch.testing.assert_close(r.sum(-1), dppo.sum(-1))


def naive_gae(rewards, values, mask, gamma, lam):
    """One sequence at a time, over its real tokens only, exactly as written in ALGORITHM.md."""
    adv, ret = torch.zeros_like(rewards), torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        H = int(mask[b].sum())
        a = 0.0
        for h in reversed(range(H)):
            v_next = values[b, h + 1].item() if h + 1 < H else 0.0
            delta = rewards[b, h].item() + gamma * v_next - values[b, h].item()
            a = delta + gamma * lam * a
            adv[b, h], ret[b, h] = a, a + values[b, h].item()
    return adv, ret


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0)])
def test_gae_matches_a_naive_loop(gamma, lam):
    g = torch.Generator().manual_seed(0)
    B, R = 6, 9
    lengths = torch.tensor([9, 1, 4, 7, 2, 9])
    mask = (torch.arange(R)[None] < lengths[:, None]).float()
    rewards = torch.randn(B, R, generator=g, dtype=torch.float64) * mask
    values = torch.randn(B, R, generator=g, dtype=torch.float64)  # garbage after the end: must be ignored
    adv, ret = rto.gae(rewards, values, mask.double(), gamma, lam)
    adv_ref, ret_ref = naive_gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, adv_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(ret, ret_ref, atol=1e-6, rtol=0)


def test_policy_loss_by_hand():
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))  # ratios 1.5, 0.5, 1.1
    adv = torch.tensor([[1.0, 1.0, -2.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0]])
    loss, stats = rto.policy_loss(new, old, adv, mask, eps=0.2)
    # -min(r*A, clip(r)*A): 1.5*1 vs 1.2*1 -> 1.2; 0.5 vs 0.8 -> 0.5; -2.2 vs -2.2 -> -2.2
    assert loss.item() == pytest.approx(-(1.2 + 0.5 - 2.2) / 3, abs=1e-6)
    assert stats["clip_frac"].item() == pytest.approx(2 / 3)
    # per-sequence mean, then mean over sequences: a short sequence weighs as much as a long one
    new2, old2 = torch.zeros(2, 3), torch.zeros(2, 3)
    adv2, mask2 = torch.tensor([[1.0, 1.0, 1.0], [4.0, 0.0, 0.0]]), torch.tensor([[1.0, 1, 1], [1, 0, 0]])
    assert rto.policy_loss(new2, old2, adv2, mask2, 0.2)[0].item() == pytest.approx(-(1.0 + 4.0) / 2)


def test_value_loss_by_hand():
    old = torch.tensor([[0.0, 0.0]])
    new = torch.tensor([[0.5, 0.1]])
    returns = torch.tensor([[1.0, -1.0]])
    loss, stats = rto.value_loss(new, old, returns, torch.ones(1, 2), clip=0.2)
    # token 0: clipped value 0.2 -> (0.2-1)^2 = 0.64 > (0.5-1)^2 = 0.25 -> 0.64;  token 1: 1.21 either way
    assert loss.item() == pytest.approx(0.5 * (0.64 + 1.21) / 2)
    assert stats["value_clip_frac"].item() == pytest.approx(0.5)


def test_adaptive_kl_controller():
    args = SimpleNamespace(kl_target=1.0, kl_horizon=100)
    assert rto.update_kl_coef(0.1, 2.0, SimpleNamespace(kl_target=None), 10) == 0.1
    assert rto.update_kl_coef(0.1, 5.0, args, 10) == pytest.approx(0.1 * (1 + 0.2 * 0.1))  # error clipped at 0.2
    assert rto.update_kl_coef(0.1, 0.9, args, 10) == pytest.approx(0.1 * (1 - 0.1 * 0.1))


def test_batch_sizes_must_divide():
    args = SimpleNamespace(rollout_batch_size=64, mini_batch_size=16, micro_batch_size=4)
    assert rto.batch_sizes(args, 2) == {"rollout": 32, "mini": 8, "micro": 4, "accum": 2}
    with pytest.raises(SystemExit, match="--mini_batch_size"):
        rto.batch_sizes(SimpleNamespace(rollout_batch_size=64, mini_batch_size=12, micro_batch_size=8), 1)


# ---------------------------------------------------------------------------- with real models (in process)
def rto_args(pipeline, *extra):
    import common
    return rto.fill_defaults(common.parse_args(rto.Args, [
        "--sft_ckpt", str(pipeline["sft"]), "--dpo_ckpt", str(pipeline["dpo"]), "--rm_ckpt", str(pipeline["rm"]),
        "--output_dir", "unused", *map(str, extra)]))


def test_modes_load_only_the_models_they_need_and_fail_clearly_without_them(pipeline):
    from accelerate import Accelerator
    acc = Accelerator(cpu=True)
    assert set(rto.load_models(rto_args(pipeline, "--reward_mode", "ppo"), acc)[1]) == {"policy", "critic", "ref", "rm"}
    assert set(rto.load_models(rto_args(pipeline, "--reward_mode", "dppo"), acc)[1]) == {"policy", "critic", "ref", "dpo"}
    assert "rm" not in rto.load_models(rto_args(pipeline, "--beta3", 0), acc)[1]
    for bad, needs in ((["--reward_mode", "ppo", "--beta3", "0"], "beta3"), (["--dpo_ckpt", ""], "--dpo_ckpt"),
                       (["--rm_ckpt", ""], "--rm_ckpt")):
        with pytest.raises(SystemExit, match=needs):
            rto_args(pipeline, *bad)


@torch.no_grad()
def test_rollout_is_masked_and_its_logprobs_do_not_depend_on_padding(pipeline):
    import common
    import toy_task
    from accelerate import Accelerator
    acc = Accelerator(cpu=True)
    args = rto_args(pipeline, "--max_new_tokens", 16)
    tok, models = rto.load_models(args, acc)
    torch.manual_seed(0)
    prompts = toy_task.prompts("test", 24)
    ro = rto.rollout(acc, models["policy"], tok, prompts, args)
    ro = rto.score(ro, models, args, micro=8)
    mask, P = ro["response_mask"], ro["prompt_len"]
    assert not ro["ended"].all() or mask.sum(-1).min() < mask.shape[1]  # lengths differ: padding is exercised
    for key in ("logprobs", "ref_logprobs", "dpo_rewards", "values"):
        assert (ro[key] * (1 - mask) == 0).all(), key  # nothing after the first EOS
    for i in range(len(prompts)):  # each sequence alone, unpadded
        n, ids = int(mask[i].sum()), common.encode_prompt(tok, prompts[i])
        resp = ro["input_ids"][i, P:P + n].tolist()
        alone = common.response_logprobs(models["policy"], common.collate([ids], [resp], tok.pad_token_id))
        torch.testing.assert_close(ro["logprobs"][i, :n], alone[0], atol=1e-5, rtol=0)
        assert (tok.eos_token_id in resp) == bool(ro["ended"][i])


def test_frozen_models_run_once_per_rollout_and_first_ratio_is_one(pipeline, monkeypatch):
    from accelerate import Accelerator
    acc = Accelerator(cpu=True)
    args = rto_args(pipeline, "--rollout_batch_size", 16, "--mini_batch_size", 8, "--micro_batch_size", 4)
    tok, models = rto.load_models(args, acc)
    calls = {name: 0 for name in models}
    for name, m in models.items():  # scalar-head models run through their backbone (common.sequence_scores)
        (m.base_model if name in ("critic", "rm") else m).register_forward_hook(
            lambda *a, name=name: calls.__setitem__(name, calls[name] + 1))
    sizes = rto.batch_sizes(args, 1)
    acc.gradient_accumulation_steps = sizes["accum"]
    opts = [torch.optim.Adam(models[m].parameters(), lr=1e-3) for m in ("policy", "critic")]
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0) for o in opts]
    models["policy"], models["critic"], *rest = acc.prepare(models["policy"], models["critic"], *opts, *scheds)
    opts, scheds = rest[:2], rest[2:]
    import toy_task
    ro = rto.rollout(acc, models["policy"], tok, toy_task.prompts("train", 16), args)
    calls.update(policy=0)  # generation's own forward passes
    ro = rto.score(ro, models, args, sizes["micro"])
    assert calls == {"policy": 4, "critic": 4, "ref": 4, "dpo": 4, "rm": 4}  # one pass per micro-batch
    ro["rewards"] = rto.token_rewards(ro, args, 0.1)
    ro["advantages"], ro["returns"] = rto.gae(ro["rewards"], ro["values"], ro["response_mask"], 1.0, 0.95)
    ratios = []
    real_policy_loss = rto.policy_loss
    monkeypatch.setattr(rto, "policy_loss", lambda *a: (lambda out: (ratios.append(out[1]["ratio"].item()), out)[1])(
        real_policy_loss(*a)))
    frozen_before = {k: calls[k] for k in ("ref", "dpo", "rm")}
    stats = rto.ppo_update(acc, ro, models, opts, scheds, args, sizes)
    assert {k: calls[k] for k in ("ref", "dpo", "rm")} == frozen_before  # never again in the PPO epochs
    # micro-batches before the first optimiser step see the policy that sampled: ratio exactly 1 (dropout off)
    assert ratios[:sizes["accum"]] == pytest.approx([1.0] * sizes["accum"], abs=1e-5)
    assert len(ratios) == args.ppo_epochs * 16 // 4 and math.isfinite(stats["policy_loss"])
    assert any(abs(r - 1) > 1e-4 for r in ratios[sizes["accum"]:])  # and then the policy moves


# ---------------------------------------------------------------------------- rto.py as users run it
def rto_cmd(pipeline, out, *extra):
    return ["--sft_ckpt", pipeline["sft"], "--dpo_ckpt", pipeline["dpo"], "--rm_ckpt", pipeline["rm"],
            "--output_dir", out, "--sample_every", 0, *extra]


def test_rto_raises_the_oracle_reward_above_sft(pipeline, tmp_path):
    run_stage("rto.py", *rto_cmd(pipeline, tmp_path / "rto"))
    m = read_metrics(tmp_path / "rto")
    before = next(r for r in m if r.get("phase") == "before")["oracle_reward_test"]
    after = next(r for r in m if r.get("phase") == "after")["oracle_reward_test"]
    print(f"oracle reward of held-out samples: SFT {before:.3f} -> RTO {after:.3f}")
    assert after > before + 0.5
    it = [r for r in m if "policy_loss" in r]
    for key in ("sentence_reward", "dpo_reward_per_token", "dpo_reward_per_response", "kl_per_token", "beta2",
                "response_length", "eos_rate", "policy_loss", "value_loss", "clip_frac", "approx_kl", "entropy",
                "time_generate", "time_score", "time_update", "oracle_reward", "explained_variance"):
        assert all(math.isfinite(r[key]) for r in it), key
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    AutoModelForCausalLM.from_pretrained(tmp_path / "rto")
    AutoModelForSequenceClassification.from_pretrained(tmp_path / "rto" / "critic", num_labels=1)


def iteration_metrics(folder):
    return [{k: v for k, v in r.items() if not k.startswith("time_")} for r in read_metrics(folder) if "phase" not in r]


def test_same_seed_gives_identical_metrics(pipeline, tmp_path):
    for name in ("a", "b"):
        run_stage("rto.py", *rto_cmd(pipeline, tmp_path / name, "--num_iterations", 2, "--oracle_prompts", 8))
    assert iteration_metrics(tmp_path / "a") == iteration_metrics(tmp_path / "b")
    assert len(iteration_metrics(tmp_path / "a")) == 2


def test_resume_after_kill_reproduces_an_uninterrupted_run(pipeline, tmp_path):
    """kill -9 after the checkpoint of iteration 2, rerun with --resume: the same metrics as one clean run."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from conftest import ROOT
    common_args = ("--num_iterations", 4, "--save_every", 2, "--oracle_prompts", 8)
    run_stage("rto.py", *rto_cmd(pipeline, tmp_path / "clean", *common_args))
    out = tmp_path / "killed"
    cmd = [sys.executable, str(ROOT / "rto.py"), *map(str, rto_cmd(pipeline, out, *common_args))]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = out / "checkpoint-2" / "state.json"
    while not state.exists() and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert json.loads(state.read_text())["step"] == 2 and not (out / "checkpoint-4").exists()
    run_stage("rto.py", *rto_cmd(pipeline, out, *common_args, "--resume"))
    clean, resumed = iteration_metrics(tmp_path / "clean"), iteration_metrics(out)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert resumed == clean
