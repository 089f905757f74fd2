"""--lora_rank (docs/lora.md): the roles that share a frozen base give the numbers of the separate models they
replace; only adapters (and a critic's head copy) train; adapter folders and the --merge_lora export reload; rto.py
with adapters resumes to the uninterrupted run. The unit tests build tiny models here (seconds); the rto.py runs
use the session pipeline's SFT model and reward model and a DPO adapter made here from its SFT model."""

import shutil

import pytest
import torch

import common
import data
import lora
import rto
import speed
from conftest import iteration_metrics, run_main

peft = pytest.importorskip("peft")

LORA = ["--lora_rank", 4, "--lora_alpha", 8]
RTO_FLAGS = [
    "--rollout_batch_size",
    8,
    "--mini_batch_size",
    4,
    "--max_new_tokens",
    8,
    "--eval_num_prompts",
    4,
    "--sample_every",
    0,
]


class Flags:  # lora.add_adapter's arguments, as a stage's Args gives them
    lora_rank, lora_alpha, lora_dropout, lora_target_modules, vllm_sleep = (
        4,
        8.0,
        0.0,
        "all-linear",
        False,
    )


def save_tiny(path, tokenizer, seed=0):
    torch.manual_seed(seed)
    common.save_model(
        FakeAccelerator(), common.load_causal_lm("tiny", tokenizer, seed=seed), tokenizer, path
    )
    return common.load_causal_lm(str(path), tokenizer)


class FakeAccelerator:  # what common.save_model and lora.adapter_on ask of an Accelerator, on one process
    is_main_process, mixed_precision, device = True, "no", torch.device("cpu")

    def reduce(self, x, op):
        return x

    def wait_for_everyone(self):
        pass

    def get_state_dict(self, model):
        return model.state_dict()

    def unwrap_model(self, model):
        return model


def dpo_adapter(sft_path, tokenizer, out, seed=1):
    """An adapter on the SFT model with random (non-zero) B: a stand-in for dpo.py --lora_rank, saved merged too."""
    model = lora.add_adapter(common.load_causal_lm(str(sft_path), tokenizer), Flags, str(sft_path))
    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    common.save_model(
        FakeAccelerator(), model, tokenizer, str(out), {"dpo_beta": 0.1}, merge_lora=True
    )
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    tokenizer = data.build_tiny_tokenizer("toy")
    sft = save_tiny(root / "sft", tokenizer)
    dpo_adapter(root / "sft", tokenizer, root / "dpo")
    torch.manual_seed(0)
    ids = torch.randint(3, len(tokenizer), (3, 10))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "prompt_len": 4,
        "response_mask": torch.ones(3, 6),
    }
    return {"root": root, "tokenizer": tokenizer, "sft": sft, "batch": batch}


def test_roles_on_one_base_equal_the_separate_models(tiny):
    tok, batch, root = tiny["tokenizer"], tiny["batch"], tiny["root"]
    policy = lora.add_adapter(
        common.load_causal_lm(str(root / "sft"), tok), Flags, str(root / "sft")
    )
    assert lora.add_second_adapter(policy, str(root / "dpo"), "--dpo_ckpt", "dpo")
    sft, merged_dpo = tiny["sft"], common.load_causal_lm(str(root / "dpo" / "merged"), tok)
    with torch.no_grad():
        lp_sft = speed.response_logprobs(sft, batch)
        # iteration 1: B = 0, so the policy is the SFT model exactly (KL 0)
        assert torch.equal(speed.response_logprobs(policy, batch), lp_sft)
        ref = speed.response_logprobs(lora.AdapterView(policy, None), batch)
        torch.testing.assert_close(ref, lp_sft, rtol=0, atol=1e-6)
        dpo = speed.response_logprobs(lora.AdapterView(policy, "dpo"), batch)
        want = speed.response_logprobs(merged_dpo, batch) - lp_sft
        # the DPO token reward
        torch.testing.assert_close(0.1 * (dpo - ref), 0.1 * want, rtol=0, atol=1e-5)
    # after the views ran, only the trained adapter requires grad; the DPO adapter stays frozen
    names = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert names and all(".lora_" in n and ".default." in n for n in names)


def test_merged_export_and_adapter_folder_reload_with_the_same_logits(tiny):
    from transformers import AutoModelForCausalLM

    tok, root, ids = tiny["tokenizer"], tiny["root"], tiny["batch"]["input_ids"]
    adapted = lora.add_adapter(
        common.load_causal_lm(str(root / "sft"), tok), Flags, str(root / "sft")
    )
    adapted.lora.load_adapter(str(root / "dpo"), adapter_name="dpo")
    adapted.lora.set_adapter("dpo")
    plain = AutoModelForCausalLM.from_pretrained(str(root / "dpo" / "merged"))  # no peft involved
    # the adapter folder, merged on load
    folder = common.load_causal_lm(str(root / "dpo"), tok, "--dpo_ckpt")
    assert not hasattr(plain, "lora") and folder.config.dpo_beta == 0.1
    with torch.no_grad():
        want = adapted(input_ids=ids).logits
        torch.testing.assert_close(plain(input_ids=ids).logits, want, rtol=0, atol=1e-5)
        torch.testing.assert_close(folder(input_ids=ids).logits, want, rtol=0, atol=1e-5)


def test_a_base_with_other_weights_fails_with_one_line(tiny, tmp_path):
    other = save_tiny(tmp_path / "other", tiny["tokenizer"], seed=5)
    with pytest.raises(
        SystemExit, match=r"^error: --dpo_ckpt .*other base weights than --sft_ckpt's"
    ):
        lora.adapter_on(
            FakeAccelerator(), other, str(tiny["root"] / "dpo"), "--dpo_ckpt", "--sft_ckpt"
        )
    assert lora.fingerprint(other) != lora.fingerprint(tiny["sft"])
    bf16 = common.cast(
        common.load_causal_lm(str(tiny["root"] / "sft"), tiny["tokenizer"]), torch.bfloat16
    )
    # the rule is the weights, not the dtype
    assert lora.fingerprint(bf16) == lora.fingerprint(tiny["sft"])
    # the base an adapter folder names now holds other weights: loading it fails too
    moved = tmp_path / "dpo"
    dpo_adapter(tmp_path / "other", tiny["tokenizer"], moved)
    save_tiny(tmp_path / "other", tiny["tokenizer"], seed=6)
    with pytest.raises(SystemExit, match=r"^error: --dpo_ckpt .*now holds other weights"):
        common.load_causal_lm(str(moved), tiny["tokenizer"], "--dpo_ckpt")


def test_lora_rank_without_peft_says_how_to_install_it(monkeypatch):
    import importlib.util

    find = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "peft" else find(name, *a)
    )
    with pytest.raises(SystemExit, match=r"pip install peft"):
        common.parse_args(
            rto.Args, ["--sft_ckpt", "x", "--dpo_ckpt", "y", "--rm_ckpt", "z", *LORA], rto.DEFAULTS
        )


@pytest.fixture(scope="module")
def lora_dpo(pipeline, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_dpo") / "dpo"
    dpo_adapter(pipeline["sft"], data.load_tokenizer(str(pipeline["sft"])), out)
    return out


def rto_args(pipeline, lora_dpo, out, *extra):
    return [
        "--sft_ckpt",
        pipeline["sft"],
        "--dpo_ckpt",
        lora_dpo,
        "--rm_ckpt",
        pipeline["rm"],
        "--output_dir",
        out,
        *LORA,
        *RTO_FLAGS,
        *extra,
    ]


def test_rto_loads_two_bases_and_trains_only_adapters_and_the_value_head(
    pipeline, lora_dpo, tmp_path
):
    from conftest import as_if_a_process

    with as_if_a_process():
        args = rto.validate(
            common.parse_args(rto.Args, rto_args(pipeline, lora_dpo, tmp_path), rto.DEFAULTS)
        )
        accelerator = common.setup(args)
        _, models, optimizers = rto.load_models(args, accelerator)
        policy, critic = models["policy"], models["critic"]
        # reference, DPO model and reward model are views of the two trained models' bases: no other copy
        assert [m.module for m in (models["ref"], models["dpo"], models["rm"])] == [
            policy,
            policy,
            critic,
        ]
        for model, optimizer in zip((policy, critic), optimizers, strict=True):
            held = {id(p) for g in optimizer.param_groups for p in g["params"]}
            names = {n for n, p in model.named_parameters() if id(p) in held}
            assert names == {n for n, p in model.named_parameters() if p.requires_grad}
            assert all(
                ".lora_" in n and ".default." in n or ".modules_to_save.default." in n
                for n in names
            )
        assert any("score.modules_to_save" in n for n in names)  # the critic's value head trains
        batch = {**tiny_batch(), "response_mask": torch.ones(2, 3)}
        loss = (
            rto.token_logprobs(policy, batch).sum() + rto.critic_values(critic, batch, args).sum()
        )
        loss.backward()
        for model in (policy, critic):
            got = {n for n, p in model.named_parameters() if p.grad is not None}
            assert got == {n for n, p in model.named_parameters() if p.requires_grad}


def tiny_batch():
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 10, 11]])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "prompt_len": 2}


def test_rto_with_adapters_starts_at_kl_0_and_resumes_to_the_uninterrupted_run(
    pipeline, lora_dpo, tmp_path
):
    flags = (
        "--num_iterations",
        2,
        "--save_every",
        1,
        "--merge_lora",
    )  # checkpoint-1 after iteration 1
    run_main("rto.py", *rto_args(pipeline, lora_dpo, tmp_path / "clean", *flags))
    clean = iteration_metrics(tmp_path / "clean")
    assert clean[0]["kl_per_token"] == 0 and clean[0]["ratio"] == pytest.approx(1, abs=1e-3)
    # a run stopped after iteration 1: its folder as that checkpoint left it (the resume drops later metrics)
    shutil.copytree(tmp_path / "clean", tmp_path / "cut")
    run_main("rto.py", *rto_args(pipeline, lora_dpo, tmp_path / "cut", *flags, "--resume"))
    assert iteration_metrics(tmp_path / "cut") == clean
    assert lora.is_adapter(str(tmp_path / "clean")) and lora.is_adapter(
        str(tmp_path / "clean" / "critic")
    )
    tok = data.load_tokenizer(str(pipeline["sft"]))
    merged = common.load_causal_lm(str(tmp_path / "clean" / "merged"), tok)
    folder = common.load_causal_lm(str(tmp_path / "clean"), tok)
    with torch.no_grad():
        ids = tiny_batch()["input_ids"]
        torch.testing.assert_close(
            merged(input_ids=ids).logits, folder(input_ids=ids).logits, rtol=0, atol=1e-5
        )


def test_dpo_and_reward_model_adapters_feed_rto(pipeline, tmp_path):
    """dpo.py and reward_model.py with --lora_rank --merge_lora write adapter folders (and merged ones); rto.py takes
    them: the DPO adapter as a second adapter on the policy's base (same SFT weights), the reward model merged into
    the critic's base. (sft.py --lora_rank writes the same kind of folder, read by the same loader.)"""
    import toy_task
    from conftest import write_rows

    pairs = write_rows(tmp_path / "pairs.jsonl", toy_task.preference_data("train", 20, seed=1))
    for stage, out in (("dpo.py", "dpo"), ("reward_model.py", "rm")):
        run_main(
            stage,
            "--sft_ckpt",
            pipeline["sft"],
            "--dataset",
            pairs,
            "--output_dir",
            tmp_path / out,
            "--max_steps",
            1,
            "--batch_size",
            8,
            "--eval_fraction",
            0.2,
            "--warmup_ratio",
            0,
            "--lr",
            0.01,
            "--max_prompt_len",
            24,
            "--max_response_len",
            24,
            "--merge_lora",
            *LORA,
        )
        assert (
            lora.is_adapter(str(tmp_path / out))
            and (tmp_path / out / "merged" / "config.json").exists()
        )
    run_main(
        "rto.py",
        "--sft_ckpt",
        pipeline["sft"],
        "--dpo_ckpt",
        tmp_path / "dpo",
        "--rm_ckpt",
        tmp_path / "rm",
        "--output_dir",
        tmp_path / "rto",
        *LORA,
        *RTO_FLAGS,
        "--num_iterations",
        1,
    )
    first = iteration_metrics(tmp_path / "rto")[0]
    assert first["kl_per_token"] == 0 and abs(first["dpo_reward_per_token"]) > 0


@pytest.mark.distributed
def test_ddp_and_fsdp2_with_adapters_log_the_numbers_of_one_process(pipeline, lora_dpo, tmp_path):
    """2 iterations of 16 prompts, one process and then 2 ranks under DDP and FSDP2 (8 prompts each): every logged
    number is the same (as test_distributed.py's full-model test). Under FSDP2 the adapted transformers model is
    the root (add_adapter), the reference and DPO adapter are switched on the sharded layers, and the adapter
    folders are written from the gathered state."""
    from test_distributed import launch, rto_numbers

    run = [
        "--sft_ckpt",
        pipeline["sft"],
        "--dpo_ckpt",
        lora_dpo,
        "--rm_ckpt",
        pipeline["rm"],
        *LORA,
        "--num_iterations",
        2,
        "--rollout_batch_size",
        16,
        "--mini_batch_size",
        16,
        "--max_new_tokens",
        12,
        "--eval_num_prompts",
        4,
        "--sample_every",
        0,
    ]
    run_main("rto.py", *run, "--micro_batch_size", 8, "--output_dir", tmp_path / "one")
    one = rto_numbers(tmp_path / "one")
    for config in ("cpu_ddp.yaml", "cpu_fsdp.yaml"):
        launch(
            config,
            "rto.py",
            *run,
            "--micro_batch_size",
            4,
            "--output_dir",
            tmp_path / config,
            "--merge_lora",
        )
        two = rto_numbers(tmp_path / config)
        assert [x[:2] for x in two] == [x[:2] for x in one]
        assert [x[2] for x in two] == pytest.approx([x[2] for x in one], abs=1e-4), config
        assert lora.is_adapter(str(tmp_path / config)) and lora.is_adapter(
            str(tmp_path / config / "critic")
        )
    from transformers import AutoModelForCausalLM

    merged = {
        n: AutoModelForCausalLM.from_pretrained(tmp_path / n / "merged")
        for n in ("cpu_ddp.yaml", "cpu_fsdp.yaml")
    }
    ids = tiny_batch()["input_ids"]
    with torch.no_grad():  # the export merged from FSDP2's gathered state is the DDP run's
        torch.testing.assert_close(
            merged["cpu_fsdp.yaml"](ids).logits,
            merged["cpu_ddp.yaml"](ids).logits,
            rtol=0,
            atol=1e-4,
        )


def test_the_vllm_engine_receives_the_merged_weights(tiny):
    """--rollout_engine vllm with --lora_rank: vllm_engine.push sends the plain model's names and W + (alpha/r) B A,
    the --merge_lora export's tensors (an engine stand-in records them; vLLM itself is not needed)."""
    import vllm_engine

    got = {}

    class Engine:
        def collective_rpc(self, method, kwargs):
            assert method == "reload_weights"
            got.update(kwargs["weights_iterator"])

    tok, root = tiny["tokenizer"], tiny["root"]
    model = dpo_adapter(root / "sft", tok, root / "pushed", seed=2)
    vllm_engine.push(Engine(), model, Flags)
    want = common.load_causal_lm(str(root / "pushed" / "merged"), tok).state_dict()
    assert set(want) <= set(got) and not any(".lora_" in k or ".base_layer." in k for k in got)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ["gpt2", "llama-gqa"])
def test_the_merged_export_equals_peffts_own_merge_on_conv1d_and_linear_layers(family, tmp_path):
    """dpo.py --lora_rank 4 --merge_lora on a tiny GPT-2 (Conv1D layers, which store their weight as (in, out), so
    peft transposes their update; two of them square) and on a tiny Llama, every linear layer adapted: the run
    saves, and <out>/merged (lora.merged_weights, which vllm_engine.push sends too) equals peft's own
    merge_and_unload() of the adapter folder, tensor for tensor, to 1e-5."""
    import json

    from transformers import AutoModelForCausalLM

    import toy_task
    from conftest import tiny_model

    tok = data.build_tiny_tokenizer("toy")
    tiny_model(tok, family).save_pretrained(tmp_path / "sft")
    tok.save_pretrained(tmp_path / "sft")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(json.dumps(r) + "\n" for r in toy_task.preference_data("train", 24, seed=1))
    )
    run_main(
        "dpo.py",
        "--sft_ckpt",
        tmp_path / "sft",
        "--dataset",
        pairs,
        "--output_dir",
        tmp_path / "dpo",
        "--max_steps",
        2,
        "--batch_size",
        4,
        "--lr",
        0.05,
        "--merge_lora",
        *LORA,
    )
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "sft").state_dict()
    adapted = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tmp_path / "sft"), tmp_path / "dpo"
    )
    want = adapted.merge_and_unload().state_dict()
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "dpo" / "merged").state_dict()
    assert set(got) == set(want)
    moved = max((want[k] - base[k]).abs().max().item() for k in want)
    assert moved > 1e-3  # the adapter trained: the merge adds something
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=0, msg=k)


@pytest.mark.distributed
def test_an_adapter_on_other_weights_stops_both_ranks_within_a_minute_with_one_line(
    pipeline, tmp_path
):
    """2 ranks under the GPU configs' loading (rank 1 holds the policy's shapes only, so only rank 0 can compare
    fingerprints) and a DPO adapter trained on other base weights: every rank stops at once, rank 0 with the one
    line, instead of rank 1 waiting in the next collective until the launcher's timeout."""
    import time

    from test_distributed import launch_to_fail

    tok = data.build_tiny_tokenizer("toy")
    save_tiny(tmp_path / "other", tok, seed=5)
    dpo_adapter(tmp_path / "other", tok, tmp_path / "dpo")
    run = [
        "--sft_ckpt",
        pipeline["sft"],
        "--dpo_ckpt",
        tmp_path / "dpo",
        "--rm_ckpt",
        pipeline["rm"],
    ]
    start = time.monotonic()
    proc = launch_to_fail(
        "cpu_fsdp_ram_efficient.yaml", "rto.py", *run, "--output_dir", tmp_path / "out"
    )
    seconds = time.monotonic() - start
    assert seconds < 60, seconds
    assert (
        f"error: --dpo_ckpt {tmp_path / 'dpo'}: an adapter trained on other base weights"
        in proc.stderr
    )
    assert not (tmp_path / "out").exists()
