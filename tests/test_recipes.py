"""The recipes' and the documentation's command lines (README.md and docs/*.md) parse with the stages' own argument
parsers (neither names a missing flag), and the documentation shows the recipes' commands as the recipes run them."""

import os
import shlex
import subprocess

import pytest

import common
import dpo
import evaluate
import reward_model
import rto
import sft
from conftest import ROOT

PARSERS = {
    "sft.py": sft.Args,
    "dpo.py": dpo.Args,
    "reward_model.py": reward_model.Args,
    "rto.py": rto.Args,
    "evaluate.py": evaluate.Args,
}
RECIPES = sorted(p.name for p in (ROOT / "recipes").glob("*.sh"))


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_command_lines_parse(recipe):
    out = subprocess.run(
        ["bash", str(ROOT / "recipes" / recipe)],
        env={**os.environ, "DRY_RUN": "1"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    lines = [shlex.split(line) for line in out.splitlines() if line.strip()]
    assert {line[0] for line in lines} >= {"dpo.py", "rto.py"}
    for script, *argv in lines:
        args = common.parse_args(PARSERS[script], argv)  # an unknown flag exits here
        assert args.output_dir and args.bf16
        if script == "rto.py":
            # the mode has the models it needs
            rto.validate(common.apply_defaults(args, rto.DEFAULTS))
            rto.batch_sizes(args, 8)  # sizes divide on 8 GPUs


def test_an_unknown_flag_is_refused():
    with pytest.raises(SystemExit):
        common.parse_args(sft.Args, ["--no_such_flag", "1"])


# ---------------------------------------------------------------------------- the documented command lines
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def recipe_lines(recipe):
    """[script, *argv] of each stage a recipe runs, with the recipe's own defaults for OUT, DATA, ..."""
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "DATA", "SFT", "RM", "CONFIG")}
    out = subprocess.run(
        ["bash", str(ROOT / "recipes" / recipe)],
        env={**env, "DRY_RUN": "1"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [shlex.split(line) for line in out.splitlines() if line.strip()]


def doc_lines(files=DOCS):
    """[script, *argv] of every stage command in the shell code blocks of `files`: `python <stage>.py ...` or
    `accelerate launch [its own flags] <stage>.py ...`, after any VAR=value, continuation lines joined, comments
    dropped. The launcher's flags are not kept."""
    blocks, fence, body = [], None, []
    for line in "\n".join(path.read_text() for path in files).splitlines():
        if not line.startswith("```"):
            body.append(line)
        elif fence is None:
            fence, body = line[3:].strip(), []
        else:
            if fence in ("bash", "sh", "shell", "console"):
                blocks.append("\n".join(body).replace("\\\n", " "))
            fence = None
    commands = []
    for line in "\n".join(blocks).splitlines():
        words = shlex.split(line, comments=True)
        while words and "=" in words[0] and not words[0].startswith("-"):
            words = words[1:]
        if words[:2] == ["accelerate", "launch"]:
            commands.append(words[next(i for i, w in enumerate(words) if w in PARSERS) :])
        elif (
            words
            and os.path.basename(words[0]) in ("python", "python3")
            and words[1:2]
            and words[1] in PARSERS
        ):
            commands.append(words[1:])
    return commands


def flags(argv):
    """{--flag: (values...)} of a command line; a flag given twice would hide a drift, so it is refused."""
    out, flag = {}, None
    for w in argv[1:]:
        if w.startswith("--"):
            flag, *value = w.split("=", 1)
            assert flag not in out, f"{argv[0]}: {flag} given twice"
            out[flag] = tuple(value)
        else:
            out[flag] += (w,)
    return out


def output_dir(argv):
    return flags(argv).get("--output_dir", ("",))[0]


def test_documented_command_lines_parse(monkeypatch):
    monkeypatch.chdir(ROOT)  # a --config file is named from the repository root
    # the README shows every stage
    assert {script for script, *_ in doc_lines([ROOT / "README.md"])} == set(PARSERS)
    commands = doc_lines()
    for script, *argv in commands:
        args = common.parse_args(PARSERS[script], argv)  # an unknown flag exits here
        if script == "rto.py":
            # the mode has the models it needs
            rto.validate(common.apply_defaults(args, rto.DEFAULTS))
            rto.batch_sizes(args, 8)  # sizes divide on 8 GPUs


def test_the_docs_show_the_recipes_commands():
    """A documented command that writes under a recipe's OUT is that recipe's command: same stage, flags and
    values."""
    recipes = {
        output_dir(line): (f"recipes/{name}", line)
        for name in RECIPES
        for line in recipe_lines(name)
    }
    outs = {os.path.dirname(d) for d in recipes}  # each recipe's default OUT
    shown = [c for c in doc_lines() if os.path.dirname(output_dir(c)) in outs]
    for command in shown:
        name, line = recipes.get(output_dir(command), ("no recipe (none writes there)", [None]))
        assert (command[0], flags(command)) == (line[0], flags(line)), (
            f"the documented {command[0]} --output_dir {output_dir(command)} is not the command of {name}"
        )
    pythia_rto = [
        line
        for line in recipe_lines("pythia28b_hh.sh")
        if line[0] == "rto.py" and flags(line).get("--reward_mode") == ("rto",)
    ]
    # the paper's RTO run is shown
    assert len(pythia_rto) == 1 and output_dir(pythia_rto[0]) in map(output_dir, shown)


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_accelerate_configs_load_and_shard_as_documented(config):
    """Every config loads as Accelerate reads it; the FSDP ones are FSDP2 with sharded resumable state, and the GPU
    ones put 8 processes on each machine."""
    from accelerate.commands.config.config_args import ClusterConfig

    c = ClusterConfig.from_yaml_file(ROOT / "configs" / config)  # unknown keys raise
    if c.distributed_type.value == "FSDP":
        assert (
            c.fsdp_config["fsdp_version"] == 2
            and c.fsdp_config["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
        )
    if config.startswith("gpu"):
        assert c.num_processes == 8 * c.num_machines and c.mixed_precision == "bf16"


def test_docs_stages_lists_every_flag_of_every_stage():
    import dataclasses

    text = (ROOT / "docs" / "stages.md").read_text()
    for script, args_class in PARSERS.items():
        for f in dataclasses.fields(args_class):
            assert f"`--{f.name}`" in text, f"docs/stages.md does not list {script}'s --{f.name}"
