"""Flags: each stage's DEFAULTS table (applied only to flags left unset, shown in --help), validate(args) refusing
bad values (an explicit 0 included), and the derived sizes in args.json. In-process and cheap: nothing trains."""

import json
from types import SimpleNamespace

import pytest

import common
import dpo
import evaluate
import reward_model
import sft

STAGES = {  # stage: (module, the flags it requires)
    "sft.py": (sft, []),
    "dpo.py": (dpo, ["--sft_ckpt", "x"]),
    "reward_model.py": (reward_model, ["--sft_ckpt", "x"]),
    "evaluate.py": (evaluate, ["--models", "a=x"]),
}


def parse(stage, *argv):
    module, required = STAGES[stage]
    return common.parse_args(module.Args, [*required, *map(str, argv)], module.DEFAULTS)


@pytest.mark.parametrize("stage", STAGES)
def test_the_table_fills_only_flags_left_unset(stage, tmp_path):
    module, _ = STAGES[stage]
    builtin, real = parse(stage), parse(stage, "--dataset", tmp_path / "pairs.jsonl")
    long = parse(stage, "--dataset", common.TOY_LONG)
    for flag, default in module.DEFAULTS.items():
        assert getattr(builtin, flag) == default.toy and getattr(real, flag) == default.real, flag
        # toy-long's own value, if any
        on_long = default.toy if default.toy_long is None else default.toy_long
        assert getattr(long, flag) == on_long, flag
        given = "rm:y" if flag == "judge" else 7
        # a given value wins on either task
        assert getattr(parse(stage, f"--{flag}", given), flag) == given, flag
        assert (
            getattr(parse(stage, "--dataset", tmp_path / "p.jsonl", f"--{flag}", given), flag)
            == given
        ), flag


@pytest.mark.parametrize("stage", STAGES)
def test_help_shows_both_defaults(stage, capsys):
    module, _ = STAGES[stage]
    with pytest.raises(SystemExit) as e:
        common.parse_args(module.Args, ["--help"], module.DEFAULTS)
    assert e.value.code == 0
    # argparse wraps lines, also after a hyphen
    text = " ".join(capsys.readouterr().out.split()).replace("- ", "-")
    for flag, default in module.DEFAULTS.items():
        shown = "required" if default.real is None else default.real
        long = "" if default.toy_long is None else f"{default.toy_long} on toy-long, "
        assert f"(default: {default.toy} on the built-in task, {long}{shown} otherwise)" in text, (
            flag
        )
    assert "(default: 0.001 on the built-in task, 1e-05 otherwise)" in text or stage != "sft.py"


# An explicit 0 (or another bad value) is kept by the table, so validate sees it and says so in one line
BAD = [
    ("evaluate.py", "max_new_tokens", 0),
    ("evaluate.py", "max_prompt_len", 0),
    ("evaluate.py", "top_p", 0),
    ("evaluate.py", "temperature", 0),
    ("evaluate.py", "num_prompts", 0),
    ("sft.py", "lr", 0),
    ("sft.py", "epochs", 0),
    ("sft.py", "max_response_len", 0),
    ("sft.py", "batch_size", 0),
    ("sft.py", "warmup_ratio", 1.5),
    ("sft.py", "max_steps", 0),
    ("sft.py", "micro_batch_size", 0),
    ("sft.py", "eval_fraction", 0),
    ("sft.py", "logging_steps", 0),
    ("sft.py", "oracle_prompts", 0),
    ("dpo.py", "beta", 0),
    ("dpo.py", "lr", -1),
    ("dpo.py", "max_grad_norm", 0),
    ("dpo.py", "eval_steps", 0),
    ("reward_model.py", "batch_size", 0),
    ("reward_model.py", "save_total_limit", 0),
    ("reward_model.py", "long_prompts", "cut"),
]


@pytest.mark.parametrize("stage, flag, value", BAD, ids=[f"{s}--{f}={v}" for s, f, v in BAD])
def test_validate_refuses_bad_values(stage, flag, value):
    module, required = STAGES[stage]
    from transformers import HfArgumentParser

    (raw,) = HfArgumentParser(module.Args).parse_args_into_dataclasses(
        args=[*required, f"--{flag}", str(value)]
    )
    args = common.apply_defaults(raw, module.DEFAULTS)
    assert getattr(args, flag) == type(getattr(args, flag))(value)  # not replaced by a default
    with pytest.raises(SystemExit, match=rf"^error: --{flag} {value}(\.0)?: "):
        module.validate(common.validate_shared(args))  # what parse_args, then the stage, check


@pytest.mark.parametrize("stage", STAGES)
def test_the_defaults_pass_validate(stage):
    module, _ = STAGES[stage]
    assert module.validate(parse(stage)) is not None


def test_a_table_flag_must_default_to_none():
    with pytest.raises(AssertionError, match="seed"):
        common.parse_args(sft.Args, [], {"seed": common.Default(toy=1, real=2)})


def test_rto_no_longer_inherits_flags_it_does_not_use():
    fields = {f for f in common.TrainArgs.__dataclass_fields__}
    assert "max_grad_norm" in fields and "logging_steps" not in fields
    assert "logging_steps" in common.OfflineTrainArgs.__dataclass_fields__
    assert "dataset_split" not in evaluate.Args.__dataclass_fields__  # evaluate.py reads --split


def test_batch_plan_and_args_json_record_the_derived_sizes(tmp_path):
    acc = SimpleNamespace(num_processes=2, wait_for_everyone=lambda: None, is_main_process=True)
    assert common.batch_plan(acc, 32, None) == (16, 1)
    assert common.batch_plan(acc, 32, 4) == (4, 4) and acc.gradient_accumulation_steps == 4
    with pytest.raises(
        SystemExit, match="--batch_size 32 is not divisible by --micro_batch_size 5"
    ):
        common.batch_plan(acc, 32, 5)
    args = parse("sft.py", "--output_dir", tmp_path / "out")
    common.prepare_output_dir(args, acc, {"micro_batch_size": 4, "gradient_accumulation_steps": 4})
    saved = json.loads((tmp_path / "out" / "args.json").read_text())
    assert saved["derived"] == {"micro_batch_size": 4, "gradient_accumulation_steps": 4}
    assert saved["lr"] == 1e-3 and saved["epochs"] == 3  # the table's values, as the run used them


RTO_NEEDS = [  # rto.py's flags that need each other: (command line, its one error line)
    (["--reward_mode", "sac"], "--reward_mode sac: expected rto, ppo or dppo"),
    ([], "--sft_ckpt is required: the SFT checkpoint (initial policy and reference)"),
    (["--sft_ckpt", "s"], "--reward_mode rto needs --dpo_ckpt (the DPO model's token rewards)"),
    (["--sft_ckpt", "s", "--reward_mode", "dppo"], "--reward_mode dppo needs --dpo_ckpt"),
    (
        ["--sft_ckpt", "s", "--dpo_ckpt", "d"],
        "--reward_mode rto with --beta3 1.0 needs --rm_ckpt, or",
    ),
    (
        ["--sft_ckpt", "s", "--reward_mode", "ppo", "--beta3", 0],
        "--reward_mode ppo needs --beta3 > 0",
    ),
    (
        ["--sft_ckpt", "s", "--reward_mode", "dppo", "--dpo_ckpt", "d", "--eval_every", -1],
        "--eval_every -1",
    ),
]


@pytest.mark.parametrize("argv, line", RTO_NEEDS)
def test_rto_refuses_flags_that_cannot_work_together(argv, line):
    import rto

    with pytest.raises(SystemExit) as e:
        rto.validate(common.parse_args(rto.Args, argv, rto.DEFAULTS))
    assert str(e.value).startswith(f"error: {line}")


def test_rto_passes_each_mode_with_the_checkpoints_it_needs():
    import rto

    needs = ["--sft_ckpt", "s", "--dpo_ckpt", "d", "--rm_ckpt", "r"]
    for mode in ("rto", "ppo", "dppo"):
        assert rto.validate(
            common.parse_args(rto.Args, [*needs, "--reward_mode", mode], rto.DEFAULTS)
        )
    dppo = ["--sft_ckpt", "s", "--dpo_ckpt", "d", "--reward_mode", "dppo"]  # no reward model
    assert rto.validate(common.parse_args(rto.Args, dppo, rto.DEFAULTS))


# ---------------------------------------------------------------------------- --config run.yaml
def test_a_config_file_sets_flags_and_the_command_line_overrides_it(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("lr: 1e-4\nepochs: 5\nbf16: true\ndataset: toy-long\n")
    args = parse("sft.py", "--config", config)
    assert (args.lr, args.epochs, args.bf16, args.dataset) == (
        1e-4,
        5,
        True,
        "toy-long",
    )  # typed as flags are
    # the table still fills what it leaves unset
    assert args.max_response_len == 96 and args.config == str(config)
    # the command line wins
    args = parse("sft.py", "--config", config, "--lr", "3e-3", "--dataset", "toy")
    assert (args.lr, args.epochs, args.dataset, args.max_response_len) == (3e-3, 5, "toy", 24)
    acc = SimpleNamespace(num_processes=1, wait_for_everyone=lambda: None, is_main_process=True)
    argv = ["--config", str(config), "--output_dir", str(tmp_path / "out")]
    common.prepare_output_dir(common.parse_args(sft.Args, argv, sft.DEFAULTS), acc)
    saved = json.loads((tmp_path / "out" / "args.json").read_text())  # the record of what ran
    assert (saved["lr"], saved["epochs"], saved["config"]) == (1e-4, 5, str(config))
    # list flags: a list or one value
    config.write_text("models: [sft=a, dpo=b]\ncurves: results/rto\n")
    args = parse("evaluate.py", "--config", config)
    # parse() gives --models on the command line
    assert args.models == ["a=x"] and args.curves == ["results/rto"]
    assert common.parse_args(evaluate.Args, ["--config", str(config)]).models == ["sft=a", "dpo=b"]
    config.write_text("sft_ckpt: runs/sft\nnormalize_reward: false\nbeta3: 0\nkl_target: null\n")
    import rto

    args = common.parse_args(rto.Args, ["--config", str(config)], rto.DEFAULTS)
    assert (args.sft_ckpt, args.normalize_reward, args.beta3, args.kl_target) == (
        "runs/sft",
        False,
        0.0,
        None,
    )


@pytest.mark.parametrize(
    "text, message",
    [
        ("lr: 1e-4\nlearning_rate: 3\n", "unknown key 'learning_rate', not a flag of this stage"),
        ("lr: [1, 2]\n", "lr takes one value"),
        ("- lr\n", "expected 'flag: value' lines"),
        ("lr: [1\n", "not valid YAML"),
    ],
)
def test_a_bad_config_fails_with_one_line_naming_it(tmp_path, text, message):
    config = tmp_path / "run.yaml"
    config.write_text(text)
    with pytest.raises(SystemExit, match=rf"^error: --config {config}: ") as e:
        parse("sft.py", "--config", config)
    assert message in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(SystemExit, match="No such file"):
        parse("sft.py", "--config", tmp_path / "missing.yaml")


@pytest.mark.parametrize("stage", STAGES)
def test_a_stray_args_file_beside_the_script_changes_nothing(stage, tmp_path, monkeypatch):
    """HfArgumentParser reads <script>.args beside sys.argv[0] by default and prepends its flags; a stage's flags
    come from its command line and --config only."""
    (tmp_path / stage).with_suffix(".args").write_text("--seed 7 --overwrite\n")
    monkeypatch.setattr("sys.argv", [str(tmp_path / stage)])
    args = parse(stage)
    assert (args.seed, args.overwrite) == (0, False)
