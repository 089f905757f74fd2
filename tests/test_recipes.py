"""The recipes' command lines parse with the stages' own argument parsers: a recipe never names a missing flag."""

import os
import shlex
import subprocess

import pytest

import common
import dpo
import reward_model
import rto
import sft
from conftest import ROOT

PARSERS = {"sft.py": sft.Args, "dpo.py": dpo.Args, "reward_model.py": reward_model.Args, "rto.py": rto.Args}


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "recipes").glob("*.sh")))
def test_recipe_command_lines_parse(recipe):
    out = subprocess.run(["bash", str(ROOT / "recipes" / recipe)], env={**os.environ, "DRY_RUN": "1"},
                         capture_output=True, text=True, check=True).stdout
    lines = [shlex.split(line) for line in out.splitlines() if line.strip()]
    assert {line[0] for line in lines} >= {"dpo.py", "rto.py"}
    for script, *argv in lines:
        args = common.parse_args(PARSERS[script], argv)  # an unknown flag exits here
        assert args.output_dir and args.bf16
        if script == "rto.py":
            rto.fill_defaults(args)  # the mode has the models it needs
            rto.batch_sizes(args, 8)  # sizes divide on 8 GPUs


def test_an_unknown_flag_is_refused():
    with pytest.raises(SystemExit):
        common.parse_args(sft.Args, ["--no_such_flag", "1"])
