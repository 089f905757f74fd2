"""Bad input: one clear line on stderr, a non-zero exit, no traceback, and nothing written.

One case runs sft.py in a subprocess, the way a user meets it: the exit status and stderr as printed. The others
call a stage's main in this process (common.fail raises SystemExit("error: ..."), which Python prints as that one
line with exit status 1); each fails before any training step. Then how the loader words each bad data file (row
numbers, --skip_bad_rows, the columns of an unknown layout), and evaluate.py's bad --judge and --models. Bad flag
values and --config files are in test_args.py; corrupted real data, generated at random, in test_bad_input_fuzz.py.
"""

import gzip
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import common
import data
from conftest import ROOT, A, U, run_main, write_rows

GOOD = {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Rome."}


def test_a_user_sees_one_error_line_and_a_failing_exit_status(tmp_path):
    path, out = tmp_path / "no_such_file.jsonl", tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            "sft.py",
            "--output_dir",
            str(out),
            "--max_steps",
            "1",
            "--dataset",
            str(path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1] == f"error: --dataset {path}: no such file", result.stderr
    assert not out.exists()


def bad_input(tmp_path, case):
    """(flags, text the error line must contain) for one bad command line."""
    if case == "missing dataset file":
        path = tmp_path / "no_such_file.jsonl"
    elif case == "empty dataset file":
        path = tmp_path / "empty.jsonl"
        path.write_text("")
    elif case == "row missing a field":
        path = write_rows(tmp_path / "pairs.jsonl", [GOOD, {"prompt": "q", "chosen": "a"}, GOOD])
    elif case == "unknown dataset format":
        path = write_rows(tmp_path / "foo.jsonl", [{"foo": 1, "bar": "x"}] * 3)
    elif case == "missing model folder":
        return ["--model_name_or_path", "./no/such/model"], "--model_name_or_path ./no/such/model"
    elif case == "resume without a checkpoint":
        return ["--resume"], "--resume"
    return ["--dataset", str(path)], str(path)


@pytest.mark.parametrize(
    "case",
    [
        "missing dataset file",
        "empty dataset file",
        "row missing a field",
        "unknown dataset format",
        "missing model folder",
        "resume without a checkpoint",
    ],
)
def test_bad_input_stops_the_stage_before_it_writes(tmp_path, case):
    flags, names = bad_input(tmp_path, case)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        run_main("sft.py", "--output_dir", out, "--max_steps", 1, *flags)
    line = e.value.code
    assert isinstance(line, str) and line.startswith("error:") and "\n" not in line, line
    assert names in line, line
    # found after the output folder is set up (args.json written)
    if case == "resume without a checkpoint":
        assert line.startswith("error: --resume")
    else:
        assert not out.exists()


def test_output_dir_not_empty_without_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(SystemExit) as e:  # the built-in task: valid input up to the output folder
        run_main("sft.py", "--output_dir", out, "--max_steps", 1)
    assert (
        str(e.value.code).startswith(f"error: --output_dir {out}") and "--overwrite" in e.value.code
    )
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (
        out / "keep.txt"
    ).read_text() == "precious"


# ---------------------------------------------------------------------------- bad data files: the loader's line
# How data.load_rows and load_pairs word each bad file (the stages print it as it is).
@pytest.mark.parametrize(
    "raw, why",
    [
        ({"prompt": "p", "chosen": "c", "rejected": None}, "missing"),
        ({"chosen": None, "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: 5."}, "missing"),
        ({"prompt": "p", "chosen": "c", "rejected": 3}, "not a string"),
        ({"chosen": [U("q"), A("a")], "rejected": [A("a"), U("q")]}, "assistant"),
        (
            {"chosen": [U("q"), {"role": "bot", "content": "a"}], "rejected": [U("q"), A("b")]},
            "role",
        ),
        ({"chosen": [U("q"), A("a")], "rejected": []}, "non-empty list"),
        (
            {"chosen": "\n\nHuman: no answer turn", "rejected": "\n\nHuman: no answer turn"},
            "Assistant:",
        ),
        ({"chosen": "\n\nAssistant: a", "rejected": "\n\nAssistant: b"}, "Human:"),
        ({"context_messages": []}, "non-empty list"),
        ({"context_messages": [{"role": "user"}]}, "role"),
        ({"prompt": None}, "non-empty list"),
    ],
)
def test_parse_row_rejects_broken_rows(raw, why):
    with pytest.raises(ValueError, match=why):
        data.parse_row(raw, data.detect_format(raw))


def test_bad_row_fails_or_is_skipped_with_a_count(tmp_path, capsys):
    good = {"prompt": "p", "chosen": "c", "rejected": "r"}
    path = write_rows(
        tmp_path / "pairs.jsonl",
        [good, {"prompt": "p", "chosen": "c"}, good, {"chosen": 5, "rejected": "r"}],
    )
    with pytest.raises(SystemExit) as e:
        data.load_rows(path)
    msg = str(e.value.code)
    assert msg.startswith("error:") and path in msg and "row 1" in msg and "--skip_bad_rows" in msg
    capsys.readouterr()
    rows = data.load_rows(path, skip_bad_rows=True)  # the missing field and the wrong type
    assert rows == [{"prompt": [U("p")], "chosen": "c", "rejected": "r"}] * 2
    assert (
        f"note: skipped 2 of 4 rows of {path} that could not be parsed" in capsys.readouterr().err
    )
    nothing_left = write_rows(
        tmp_path / "bad.jsonl", [{"prompt": "q", "chosen": "a", "rejected": None}] * 2
    )
    with pytest.raises(SystemExit, match=r"^error: --dataset .*bad\.jsonl: no usable rows$"):
        data.load_rows(nothing_left, skip_bad_rows=True)


def test_unknown_layout_is_one_clear_error_naming_its_columns(tmp_path):
    path = write_rows(tmp_path / "foo.jsonl", [{"foo": 1, "bar": "x"}] * 3)
    with pytest.raises(SystemExit) as e:
        data.load_rows(path)
    msg = e.value.code
    assert (
        msg.startswith(f"error: --dataset {path}: unknown format") and "foo" in msg and "bar" in msg
    ), msg


@pytest.mark.parametrize(
    "name, content",
    [
        ("empty.jsonl", b""),
        ("blank.jsonl", b"\n\n"),
        ("empty.json", b"[]"),
        ("empty.jsonl.gz", gzip.compress(b"")),
    ],
)
def test_empty_file_is_one_clear_error(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(SystemExit) as e:
        data.load_rows(str(path))
    assert str(e.value.code) == f"error: --dataset {path}: is empty (no rows)"


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(SystemExit, match=r"^error: --dataset .*nope\.jsonl: no such file$"):
        data.load_rows(str(tmp_path / "nope.jsonl"))
    (tmp_path / "junk.jsonl").write_text("{not json\n")
    with pytest.raises(
        SystemExit, match=r"^error: --dataset .*junk\.jsonl: cannot be read as a dataset"
    ):
        data.load_rows(str(tmp_path / "junk.jsonl"))


def test_load_pairs_refuses_a_prompt_only_file(tmp_path):
    path = write_rows(tmp_path / "prompts.jsonl", [{"prompt": "q"}])
    with pytest.raises(SystemExit, match="holds prompts only"):
        data.load_pairs(path, SimpleNamespace(seed=0, skip_bad_rows=False, dataset_split="train"))


# ---------------------------------------------------------------------------- evaluate.py
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A tiny random causal LM saved as a checkpoint, for the stages that need one to get as far as the bad input."""
    folder, tok = tmp_path_factory.mktemp("tiny") / "a", data.build_tiny_tokenizer("toy")
    common.load_causal_lm("tiny", tok, seed=1).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def bad_evaluate_input(tmp_path, case):
    """(flags, text the error line must contain) for one bad evaluate.py command line."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "What is the capital of France?"}) + "\n")
    return {
        "unknown judge": (["--judge", "foo:bar"], "--judge foo:bar"),
        "malformed --models": (["--judge", "oracle"], "--models nopath"),
        "oracle off the built-in task": (
            ["--judge", "oracle", "--dataset", prompts],
            "--judge oracle",
        ),
    }[case]


@pytest.mark.parametrize(
    "case", ["unknown judge", "malformed --models", "oracle off the built-in task"]
)
def test_evaluate_refuses_a_bad_judge_or_model_list(tiny_checkpoint, tmp_path, case):
    """One error line (SystemExit, printed by Python as that line with exit status 1), nothing written."""
    flags, names = bad_evaluate_input(tmp_path, case)
    models = ["nopath"] if case == "malformed --models" else [f"a={tiny_checkpoint}"]
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        run_main("evaluate.py", "--models", *models, *flags, "--output_dir", out)
    line = e.value.code
    assert (
        isinstance(line, str) and line.startswith("error:") and "\n" not in line and names in line
    ), line
    assert not out.exists()


# ---------------------------------------------------------------------------- checkpoints and numbers
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
        common.optimizer_step(
            acc, [model], nan_loss, [opt], [sched], SimpleNamespace(skip_nonfinite=False), "step 8"
        )
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
    args = rto.validate(
        common.parse_args(
            rto.Args,
            [
                "--sft_ckpt",
                str(tmp_path / "sft"),
                "--dpo_ckpt",
                str(tmp_path / "dpo"),
                "--beta3",
                "0",
                "--output_dir",
                "x",
            ],
            rto.DEFAULTS,
        )
    )
    from accelerate import Accelerator

    with pytest.raises(SystemExit, match="--dpo_ckpt .* tokenizer differs"):
        rto.load_models(args, Accelerator(cpu=True))
