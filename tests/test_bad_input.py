"""Bad input: one clear line on stderr, a non-zero exit, no traceback, and nothing written.

Each case runs sft.py in a subprocess (the way a user meets it); all of them fail before any training step.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import data

ROOT = Path(__file__).resolve().parents[1]


def run_sft(*flags, out):
    return subprocess.run([sys.executable, "sft.py", "--output_dir", str(out), "--max_steps", "1", *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def last_line(stderr):
    return [line for line in stderr.splitlines() if line.strip()][-1]


def assert_clean_failure(result, names):
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    line = last_line(result.stderr)
    assert line.startswith("error:"), result.stderr
    assert names in line, line


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


GOOD = {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Rome."}


def bad_data(tmp_path, case):
    """(flags, text the error line must contain) for one bad --dataset."""
    if case == "missing file":
        path = tmp_path / "no_such_file.jsonl"
    elif case == "empty file":
        path = tmp_path / "empty.jsonl"
        path.write_text("")
    elif case == "row missing a field":
        path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD, {"prompt": "q", "chosen": "a"}, GOOD])
    elif case == "unknown format":
        path = write_jsonl(tmp_path / "foo.jsonl", [{"foo": 1, "bar": "x"}] * 3)
    return ["--dataset", str(path)], str(path)


@pytest.mark.parametrize("case", ["missing file", "empty file", "row missing a field", "unknown format"])
def test_bad_dataset(tmp_path, case):
    flags, names = bad_data(tmp_path, case)
    out = tmp_path / "out"
    result = run_sft(*flags, out=out)
    assert_clean_failure(result, names)
    if case == "row missing a field":
        assert "row 1" in last_line(result.stderr) and "--skip_bad_rows" in last_line(result.stderr)
    if case == "unknown format":
        assert "foo" in last_line(result.stderr)
    assert not out.exists()


def test_missing_model_folder(tmp_path):
    out = tmp_path / "out"
    result = run_sft("--model_name_or_path", "./no/such/model", out=out)
    assert_clean_failure(result, "--model_name_or_path ./no/such/model")
    assert not out.exists()


def test_output_dir_not_empty_without_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    result = run_sft(out=out)  # the built-in task: valid input up to the output folder
    assert_clean_failure(result, "--output_dir")
    assert "--overwrite" in last_line(result.stderr)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"


def test_skip_bad_rows_skips_and_counts(tmp_path, capsys):
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD, {"prompt": "q", "chosen": "a"}, GOOD, {"chosen": 5,
                                                                                            "rejected": "r"}])
    rows = data.load_rows(str(path), skip_bad_rows=True)
    assert rows == [{"prompt": [{"role": "user", "content": "Capital of France?"}],
                     "chosen": "Paris.", "rejected": "Rome."}] * 2
    assert f"note: skipped 2 of 4 rows of {path} that could not be parsed" in capsys.readouterr().err


def test_skip_bad_rows_with_nothing_left(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "q", "chosen": "a", "rejected": None}] * 2)
    with pytest.raises(SystemExit, match=r"^error: --dataset .*pairs\.jsonl: no usable rows$"):
        data.load_rows(str(path), skip_bad_rows=True)
