"""End to end on the built-in task: sft.py, dpo.py and reward_model.py each learn what they should and write a
checkpoint that reloads. Their losses by hand are in test_losses.py.

The `pipeline` fixture (conftest.py) runs sft.py -> dpo.py -> reward_model.py once with default settings; the
runs here call the stages' main in this process (conftest.run_main)."""

import json

import pytest
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import data
import dpo
import reward_model
import toy_task
from conftest import read_metrics, run_main

LABEL_AGREEMENT = toy_task.task_stats()["label_agreement"]


def phase(metrics, name):
    return next(m for m in metrics if m.get("phase") == name)


# ---------------------------------------------------------------------------- sft.py
def test_sft_learns_the_task(pipeline):
    m = read_metrics(pipeline["sft"])
    before, after = phase(m, "before"), phase(m, "after")
    print(
        f"SFT held-out loss {before['heldout_loss']:.3f} -> {after['heldout_loss']:.3f}, "
        f"oracle reward {before['oracle_reward']:.3f} -> {after['oracle_reward']:.3f}"
    )
    assert after["heldout_loss"] < before["heldout_loss"] - 1.0
    assert after["oracle_reward"] > before["oracle_reward"] + 5.0  # the untrained model writes junk
    model = AutoModelForCausalLM.from_pretrained(pipeline["sft"])
    tok = AutoTokenizer.from_pretrained(pipeline["sft"])
    assert model.config.vocab_size == len(tok) and tok.chat_template


def test_every_stage_writes_the_settings_it_ran_with(pipeline):
    """args.json: every flag with the defaults filled in, so a checkpoint says what produced it."""
    sft, dpo_args = (json.loads((pipeline[n] / "args.json").read_text()) for n in ("sft", "dpo"))
    assert (
        sft["lr"] == 1e-3 and sft["dataset"] == "toy" and sft["output_dir"] == str(pipeline["sft"])
    )
    assert (
        dpo_args["lr"] == 3e-4
        and dpo_args["beta"] == 0.1
        and dpo_args["sft_ckpt"] == str(pipeline["sft"])
    )


# ---------------------------------------------------------------------------- dpo.py and reward_model.py
def heldout_pairs(tok):
    rows = toy_task.preference_data("test", 500, seed=0)
    ex = data.encode_examples(tok, rows, 24, 24)
    return DataLoader(ex, 64, collate_fn=lambda e: data.collate_pairs(e, tok.pad_token_id))


@torch.no_grad()
def test_dpo_accuracy_and_reload(pipeline):
    final = [m for m in read_metrics(pipeline["dpo"]) if "eval_accuracy" in m][-1]
    print(
        f"DPO held-out implicit-reward accuracy {final['eval_accuracy']:.3f} (label agreement {LABEL_AGREEMENT:.3f})"
    )
    assert final["eval_accuracy"] > 0.65 and final["eval_accuracy"] > LABEL_AGREEMENT - 0.15
    # the saved folder is the trained model: recomputing the held-out numbers from it gives the logged ones
    tok = AutoTokenizer.from_pretrained(pipeline["dpo"])
    policy = AutoModelForCausalLM.from_pretrained(pipeline["dpo"]).eval()
    ref = AutoModelForCausalLM.from_pretrained(pipeline["sft"]).eval()
    assert policy.config.dpo_beta == 0.1
    again = dpo.evaluate(Accelerator(cpu=True), policy, ref, heldout_pairs(tok), 0.1)
    assert again["eval_accuracy"] == pytest.approx(final["eval_accuracy"], abs=1e-6)
    assert again["eval_loss"] == pytest.approx(final["eval_loss"], abs=1e-5)


@torch.no_grad()
def test_reward_model_accuracy_statistics_and_reload(pipeline):
    final = phase(read_metrics(pipeline["rm"]), "final")
    print(
        f"RM held-out accuracy {final['eval_accuracy']:.3f} (label agreement {LABEL_AGREEMENT:.3f})"
    )
    assert final["eval_accuracy"] > 0.65 and final["eval_accuracy"] > LABEL_AGREEMENT - 0.15
    rm = AutoModelForSequenceClassification.from_pretrained(pipeline["rm"], num_labels=1).eval()
    tok = AutoTokenizer.from_pretrained(pipeline["rm"])
    assert rm.config.reward_mean == pytest.approx(final["reward_mean"]) and rm.config.reward_std > 0
    again = reward_model.evaluate(Accelerator(cpu=True), rm, heldout_pairs(tok))
    assert again["eval_accuracy"] == pytest.approx(final["eval_accuracy"], abs=1e-6)


def test_dpo_precomputed_and_live_reference_agree(pipeline, tmp_path):
    """--ref_logprobs precompute and live are the same computation, done at different times. On 320 of the
    task's pairs in a file (with the built-in task's sizes and learning rate), so that the precomputing pass is
    short; the pipeline fixture precomputes over the whole task."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(json.dumps(r) + "\n" for r in toy_task.preference_data("train", 320, seed=1))
    )
    out = {}
    for mode in ("precompute", "live"):
        run_main(
            "dpo.py",
            "--sft_ckpt",
            pipeline["sft"],
            "--output_dir",
            tmp_path / mode,
            "--max_steps",
            3,
            "--ref_logprobs",
            mode,
            "--logging_steps",
            1,
            "--dataset",
            pairs,
            "--lr",
            3e-4,
            "--max_prompt_len",
            24,
            "--max_response_len",
            24,
        )
        out[mode] = [m["loss"] for m in read_metrics(tmp_path / mode) if "loss" in m]
    assert len(out["live"]) == 3 and out["live"] == pytest.approx(out["precompute"], abs=1e-5)
