"""Bad input to a stage: one clear line on stderr, a non-zero exit, no traceback, and nothing written.

One case runs sft.py in a subprocess, the way a user meets it: the exit status and stderr as printed. The others
call sft.main in this process (common.fail raises SystemExit("error: ..."), which Python prints as that one line
with exit status 1); each fails before any training step. How each bad file is parsed and worded (row numbers,
--skip_bad_rows, the columns of an unknown layout) is tested on the loader itself, in test_data.py.
"""

import json
import subprocess
import sys

import pytest

from conftest import ROOT, run_main


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


GOOD = {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Rome."}


def test_a_user_sees_one_error_line_and_a_failing_exit_status(tmp_path):
    path, out = tmp_path / "no_such_file.jsonl", tmp_path / "out"
    result = subprocess.run([sys.executable, "sft.py", "--output_dir", str(out), "--max_steps", "1",
                             "--dataset", str(path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
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
        path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD, {"prompt": "q", "chosen": "a"}, GOOD])
    elif case == "unknown dataset format":
        path = write_jsonl(tmp_path / "foo.jsonl", [{"foo": 1, "bar": "x"}] * 3)
    elif case == "missing model folder":
        return ["--model_name_or_path", "./no/such/model"], "--model_name_or_path ./no/such/model"
    elif case == "resume without a checkpoint":
        return ["--resume"], "--resume"
    return ["--dataset", str(path)], str(path)


@pytest.mark.parametrize("case", ["missing dataset file", "empty dataset file", "row missing a field",
                                  "unknown dataset format", "missing model folder", "resume without a checkpoint"])
def test_bad_input_stops_the_stage_before_it_writes(tmp_path, case):
    flags, names = bad_input(tmp_path, case)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        run_main("sft.py", "--output_dir", out, "--max_steps", 1, *flags)
    line = e.value.code
    assert isinstance(line, str) and line.startswith("error:") and "\n" not in line, line
    assert names in line, line
    if case == "resume without a checkpoint":  # found after the output folder is set up (args.json written)
        assert line.startswith("error: --resume")
    else:
        assert not out.exists()


def test_output_dir_not_empty_without_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(SystemExit) as e:  # the built-in task: valid input up to the output folder
        run_main("sft.py", "--output_dir", out, "--max_steps", 1)
    assert str(e.value.code).startswith(f"error: --output_dir {out}") and "--overwrite" in e.value.code
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
