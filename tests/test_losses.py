"""The losses and the reward and advantage arithmetic, against hand computations and naive loops: rto.py's token
rewards for each mode, GAE, whitening, the PPO policy and value losses, the adaptive KL controller; dpo.py's DPO
loss and its NLL term; reward_model.py's Bradley-Terry loss. Pure functions on small tensors: nothing loads a
model."""

import math
from types import SimpleNamespace

import pytest
import torch

import dpo
import reward_model
import rto


# ---------------------------------------------------------------------------- rto.py: token rewards, by mode
def make_args(mode, **kw):
    base = dict(
        reward_mode=mode, beta1=0.5, dpo_reward_clip=0.0, beta3=2.0, missing_eos_penalty=0.0
    )
    return SimpleNamespace(**{**base, **kw})


@pytest.fixture
def rollout():
    """Two responses: one of 3 tokens ending in EOS, one of 2 tokens cut by the length limit; R = 4."""
    return {
        "response_mask": torch.tensor([[1.0, 1, 1, 0], [1, 1, 0, 0]]),
        "ended": torch.tensor([True, False]),
        "logprobs": torch.tensor([[-1.0, -2.0, -0.5, 7.0], [-1.0, -1.0, 7.0, 7.0]]),
        "ref_logprobs": torch.tensor([[-1.5, -1.0, -0.5, 3.0], [-2.0, -0.5, 3.0, 3.0]]),
        # log pi_dpo - log pi_ref; padding is 0 as frozen_pass gives it. beta1 = 0.5 halves it
        "dpo_log_ratio": torch.tensor([[1.0, -0.5, 0.2, 0.0], [-2.0, 0.4, 0.0, 0.0]]),
        "rm_score": torch.tensor([1.5, -0.5]),
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
    # beta1 * the sum of the DPO log-ratios at the last token, no reward model
    expected = [[-0.05, 0.1, 0.35, 0.0], [-0.1, 0.05 - 0.8, 0.0, 0.0]]
    torch.testing.assert_close(r, torch.tensor(expected))


def test_token_rewards_rto_with_clip_and_missing_eos_penalty(rollout):
    r = rto.token_rewards(
        rollout, make_args("rto", dpo_reward_clip=0.3, missing_eos_penalty=4.0), beta2=0.1
    )
    dense = [
        [0.3, -0.25, 0.1, 0.0],
        [-0.3, 0.2, 0.0, 0.0],
    ]  # 0.5 * log-ratio, clamped to [-0.3, 0.3]
    last = [[0, 0, 3.0, 0], [0, -1.0 - 4.0, 0, 0]]  # reward model; row 1 has no EOS: penalty 4
    expected = torch.tensor(KL) + torch.tensor(dense) + torch.tensor(last)
    torch.testing.assert_close(r, expected)


def test_token_rewards_rto_paper_v1_without_reward_model(rollout):
    r = rto.token_rewards(rollout, make_args("rto", beta3=0.0), beta2=0.1)
    torch.testing.assert_close(r, torch.tensor(KL) + 0.5 * rollout["dpo_log_ratio"])
    # summed over a response, the DPO part is DPO's sentence-level implicit reward (what DPPO puts at the end)
    dppo = rto.token_rewards(rollout, make_args("dppo"), beta2=0.1)
    torch.testing.assert_close(r.sum(-1), dppo.sum(-1))


# ---------------------------------------------------------------------------- rto.py: advantages and PPO losses
def naive_gae(rewards, values, mask, gamma, lam):
    """One sequence at a time, over its real tokens only, exactly as written in docs/algorithm.md."""
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
    # garbage after the end: must be ignored
    values = torch.randn(B, R, generator=g, dtype=torch.float64)
    adv, ret = rto.gae(rewards, values, mask.double(), gamma, lam)
    adv_ref, ret_ref = naive_gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, adv_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(ret, ret_ref, atol=1e-6, rtol=0)


# accelerator.reduce, 1 process
ONE_PROCESS = SimpleNamespace(reduce=lambda x, op: x, device=torch.device("cpu"))


def test_whitening_matches_a_naive_loop_over_the_masked_entries():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 7, generator=g, dtype=torch.float64) * 3 + 2
    mask = (torch.rand(5, 7, generator=g) < 0.6).double()
    values = [x[i, j].item() for i in range(5) for j in range(7) if mask[i, j]]
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    w = rto.whiten(ONE_PROCESS, x, mask)
    for i in range(5):
        for j in range(7):
            assert w[i, j].item() == pytest.approx(
                (x[i, j].item() - mean) / std if mask[i, j] else 0.0, abs=1e-6
            )


def test_policy_loss_by_hand():
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))  # ratios 1.5, 0.5, 1.1
    adv = torch.tensor([[1.0, 1.0, -2.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0]])
    loss, stats = rto.policy_loss(new, old, adv, mask, eps=0.2)
    # -min(r*A, clip(r)*A): 1.5*1 vs 1.2*1 -> 1.2; 0.5 vs 0.8 -> 0.5; -2.2 vs -2.2 -> -2.2
    assert loss.item() == pytest.approx(-(1.2 + 0.5 - 2.2) / 3, abs=1e-6)
    assert stats["clip_frac"].tolist() == [[1.0, 1.0, 0.0]]
    # per-sequence mean, then mean over sequences: a short sequence weighs as much as a long one
    new2, old2 = torch.zeros(2, 3), torch.zeros(2, 3)
    adv2, mask2 = (
        torch.tensor([[1.0, 1.0, 1.0], [4.0, 0.0, 0.0]]),
        torch.tensor([[1.0, 1, 1], [1, 0, 0]]),
    )
    assert rto.policy_loss(new2, old2, adv2, mask2, 0.2)[0].item() == pytest.approx(
        -(1.0 + 4.0) / 2
    )


def test_value_loss_by_hand():
    old = torch.tensor([[0.0, 0.0]])
    new = torch.tensor([[0.5, 0.1]])
    returns = torch.tensor([[1.0, -1.0]])
    loss, stats = rto.value_loss(new, old, returns, torch.ones(1, 2), clip=0.2)
    # token 0: clipped value 0.2 -> (0.2-1)^2 = 0.64 > (0.5-1)^2 = 0.25 -> 0.64;  token 1: 1.21 either way
    assert loss.item() == pytest.approx(0.5 * (0.64 + 1.21) / 2)
    assert stats["value_clip_frac"].tolist() == [[1.0, 0.0]]


def test_adaptive_kl_controller_by_hand():
    args = SimpleNamespace(kl_target=1.0, kl_horizon=100)
    assert rto.update_kl_coef(0.1, 2.0, SimpleNamespace(kl_target=None, kl_horizon=100), 10) == 0.1
    # error clipped at 0.2
    assert rto.update_kl_coef(0.1, 5.0, args, 10) == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    assert rto.update_kl_coef(0.1, 0.9, args, 10) == pytest.approx(0.1 * (1 - 0.1 * 0.1))


# ---------------------------------------------------------------------------- dpo.py and reward_model.py
def test_dpo_loss_by_hand():
    policy = torch.tensor([-3.0, -5.0, -4.0, -4.5])  # chosen (2), then rejected (2)
    ref = torch.tensor([-4.0, -5.0, -3.0, -5.5])
    loss, chosen, rejected = dpo.dpo_loss(policy, ref, beta=0.1)
    # implicit rewards: chosen 0.1*(1, 0) = (0.1, 0); rejected 0.1*(-1, 1) = (-0.1, 0.1)
    assert chosen.tolist() == pytest.approx([0.1, 0.0]) and rejected.tolist() == pytest.approx(
        [-0.1, 0.1]
    )
    by_hand = (
        -(
            torch.log(torch.sigmoid(torch.tensor(0.2)))
            + torch.log(torch.sigmoid(torch.tensor(-0.1)))
        )
        / 2
    )
    assert loss.item() == pytest.approx(by_hand.item(), abs=1e-6)


def test_rpo_term_is_the_chosen_mean_token_nll(monkeypatch):
    """--nll_coef c: the DPO loss + c x mean over pairs of -log pi(y_w|x) / |y_w| (chosen only)."""
    policy, ref = torch.tensor([-3.0, -5.0, -4.0, -4.5]), torch.tensor([-4.0, -5.0, -3.0, -5.5])
    batch = {
        "ref": ref,
        "response_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]),
    }
    monkeypatch.setattr(dpo, "sequence_logprobs", lambda model, b: policy)
    plain, *_ = dpo.batch_loss(None, None, batch, 0.1)
    rpo, chosen, _ = dpo.batch_loss(None, None, batch, 0.1, nll_coef=0.5)
    assert plain.item() == pytest.approx(dpo.dpo_loss(policy, ref, 0.1)[0].item())
    assert rpo.item() == pytest.approx(plain.item() + 0.5 * (3.0 / 3 + 5.0 / 2) / 2, abs=1e-6)
    assert chosen.tolist() == pytest.approx([0.1, 0.0])  # the implicit rewards do not change


def test_bradley_terry_loss_by_hand():
    loss, chosen, rejected = reward_model.bt_loss(torch.tensor([2.0, 0.0, 1.0, 0.5]))
    by_hand = (
        -torch.log(torch.sigmoid(torch.tensor(1.0))) - torch.log(torch.sigmoid(torch.tensor(-0.5)))
    ) / 2
    assert loss.item() == pytest.approx(by_hand.item(), abs=1e-6)
    assert chosen.tolist() == [2.0, 0.0] and rejected.tolist() == [1.0, 0.5]
