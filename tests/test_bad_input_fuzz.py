"""Fuzz: corrupted rows, derived from every real data sample, fed to every stage's loader.

For each file in samples/, the first rows are corrupted with a seeded random.Random (missing fields, wrong
types, empty values, huge strings, invalid UTF-8, truncated lines, wrong roles, garbage, extra columns, ...) and
written to tmp_path (JSON lines, some gzipped, some as one JSON array). Each loader (load_rows with and without
--skip_bad_rows; load_pairs, used by sft.py, dpo.py and reward_model.py; load_prompts, used by rto.py and
evaluate.py) must then either

- return rows that are all well-formed (the prompt a non-empty list of {role: system|user|assistant, content: str},
  chosen/rejected strings), untouched rows parsed as in the clean file, skipped rows counted in one 'note: skipped'
  line, and no value invented (every string in the output is part of a string in the input: an int `chosen`
  never comes back as "5", nor a dict as its text); or
- stop with SystemExit whose message is one line, starting "error:" and naming the file (--dataset <path>).

Any other exception is a bug. encode_examples then runs on whatever load_pairs returned, with both tiny
tokenizers, and may only stop with SystemExit("error: ..."). Whole-file corruptions and the regressions this
test found are at the end.
"""

import copy
import gzip
import json
import random
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

import common
import data

DATA = Path(__file__).resolve().parents[1] / "samples"

FILES = sorted(
    {  # the ten samples (see the SOURCE.md files), and any added since
        "hh_rlhf/harmless-base_test.jsonl.gz",
        "hh_rlhf/test_mixed.split.jsonl",
        "hh_rlhf/test_mixed.hh_format.jsonl",
        "ultrafeedback_binarized/train_prefs.jsonl",
        "ultrafeedback_binarized/test_prefs.jsonl",
        "ultrafeedback_binarized/trl_train_clean.jsonl",
        "ultrafeedback_binarized/trl_eval_clean.jsonl",
        "ultrafeedback_binarized/h4_layout_with_scores.jsonl",
        "ultrafeedback_prompts/train_prompts.jsonl",
        "ultrafeedback_prompts/test_prompts.jsonl",
    }
    | {
        str(p.relative_to(DATA))
        for p in DATA.glob("*/*")
        if p.name.endswith((".json", ".jsonl", ".jsonl.gz"))
    }
)
N_ROWS = 20  # real rows taken from each file
ROLES = ("system", "user", "assistant")
LAYOUT = ("prompt", "chosen", "rejected", "context_messages")  # the columns the loaders read
SENTINEL = 7349120581  # in no real row, so a wrong type turned into text is easy to spot
HUGE = "h" * (1 << 20)  # 1 MB; one word, so that tokenising it stays fast


@pytest.fixture(scope="module", autouse=True)
def quiet_private_datasets_cache(tmp_path_factory):
    """The datasets library's cache in a temporary folder (not ~/.cache), and no progress bars."""
    import datasets

    cache = tmp_path_factory.mktemp("hf_datasets_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
        mp.setattr(datasets.config, "DOWNLOADED_DATASETS_PATH", cache / "downloads")
        datasets.disable_progress_bars()
        yield
        datasets.enable_progress_bars()


@pytest.fixture(scope="module")
def tokenizers():
    return [data.build_tiny_tokenizer(common.TOY), data.build_tiny_tokenizer("bytes")]


_real, _clean = {}, {}


def real_rows(name):
    if name not in _real:
        with (gzip.open if name.endswith(".gz") else open)(DATA / name, "rt") as f:
            _real[name] = [json.loads(next(f)) for _ in range(N_ROWS)]
    return _real[name]


def clean_parse(name, tmp_path):
    """What the loader makes of the first rows before any corruption."""
    if name not in _clean:
        _clean[name] = data.load_rows(
            write_lines(tmp_path / "clean.jsonl", [dumps(r) for r in real_rows(name)])
        )
    return _clean[name]


def dumps(row):
    return json.dumps(row).encode()


def write_lines(path, lines, sep=b"\n"):
    data = b"".join(line + sep for line in lines)
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return str(path)


# ============================================================================ corruptions of one row
def slots(obj):
    """(container, key) of every value inside obj, depth first."""
    items = (
        obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    )
    for k, v in list(items):
        yield obj, k
        yield from slots(v)


def layout_slots(row, want=lambda v: True):
    """Slots at or under the columns the loaders read (so that a corruption is one that matters)."""
    found = []
    for col in LAYOUT:
        if col in row:
            found += [(row, col)] + list(slots(row[col]))
    return [(c, k) for c, k in found if want(c[k])]


def messages(row):
    return [c[k] for c, k in layout_slots(row, lambda v: isinstance(v, dict) and "role" in v)]


def deep(depth):
    return [deep(depth - 1)] if depth else "zqx"


NOT_TEXT = [SENTINEL, 6.5e23, True, False, {"zqx": SENTINEL}]  # never text, nor messages
MAYBE = [
    None,
    [SENTINEL],
    ["zqx"],
    [[]],
    {"role": "user", "content": "zqx"},
]  # may be "absent", or a message
GARBAGE = [
    {"a": [[{"b": {"c": [SENTINEL, "zqx", None]}}]]},
    deep(200),
    [{"role": "user", "content": [{"type": "text", "text": "zqx"}]}],  # OpenAI-style content parts
    [{"role": "user", "content": {"role": "user", "content": "zqx"}}],
    ["zqx", SENTINEL, None],
]
ODD_TEXT = [
    "\x00",
    "\ud800",
    "\udfff\ud800",
    "\u202e",
    "<|user|>",
    "</s>",
    "<pad>",
    "{{ messages }}",
    "{% if x %}",
    "\r",
    "\x1b[2J",
    "\ufeff",
    "\n\nHuman:",
    "\n\nAssistant:",
]
EXTRA = ["zq_id", "zq_meta", "zq_score", "zq_note"]


def wrong_type(rng, row):
    c, k = rng.choice(layout_slots(row, lambda v: isinstance(v, (str, list))))
    c[k] = copy.deepcopy(rng.choice(NOT_TEXT + MAYBE))
    # a number, bool or dict where text or messages go: reject
    return not isinstance(c[k], (list, type(None)))


def missing_field(rng, row):
    c, k = rng.choice([(c, k) for c, k in layout_slots(row) if isinstance(c, dict)])
    del c[k]
    return False


def empty_value(rng, row):
    c, k = rng.choice(layout_slots(row, lambda v: isinstance(v, (str, list, dict))))
    c[k] = type(c[k])()
    return False


def huge_string(rng, row):
    c, k = rng.choice(layout_slots(row, lambda v: isinstance(v, str)))
    c[k] = rng.choice([HUGE, c[k] + HUGE])
    return False


def bad_role(rng, row):
    msgs = messages(row)
    if not msgs:  # transcripts: break the turn markers instead
        c, k = rng.choice(
            layout_slots(row, lambda v: isinstance(v, str) and "Human:" in v)
            or layout_slots(row, lambda v: isinstance(v, str))
        )
        old, new = rng.choice(
            [
                ("\n\nAssistant:", "\n\nBot:"),
                ("Human:", "User:"),
                ("\n\nHuman:", "\n\nAssistant:"),
                ("Assistant:", ""),
            ]
        )
        c[k] = c[k].replace(old, new)
        return False
    m = rng.choice(msgs)
    role = rng.choice(["bot", "Human", "USER", "", 3, None, ["user"], "delete"])
    if role == "delete":
        del m["role"]
    else:
        m["role"] = role
    return role is not None


def missing_content(rng, row):
    msgs = messages(row)
    if not msgs:
        return missing_field(rng, row)
    m = rng.choice(msgs)
    how = rng.choice(["delete", None, {"text": "zqx"}, [{"type": "text", "text": "zqx"}], SENTINEL])
    if how == "delete":
        del m["content"]
    else:
        m["content"] = how
    return how is not None


def nested_garbage(rng, row):
    c, k = rng.choice(layout_slots(row))
    c[k] = copy.deepcopy(rng.choice(GARBAGE))
    return isinstance(c[k], dict)


def odd_text(rng, row):
    c, k = rng.choice(layout_slots(row, lambda v: isinstance(v, str)))
    i = rng.randrange(len(c[k]) + 1)
    c[k] = c[k][:i] + rng.choice(ODD_TEXT) + c[k][i:]
    return False


def extra_columns(rng, row):
    for name in rng.sample(EXTRA, rng.randint(1, 3)):
        row[name] = copy.deepcopy(
            rng.choice([SENTINEL, "zqx", None, [1, "a"], {"k": [1]}, 2.5, True])
        )
    return False


ROW_KINDS = {
    f.__name__: f
    for f in (
        wrong_type,
        missing_field,
        empty_value,
        huge_string,
        bad_role,
        missing_content,
        nested_garbage,
        odd_text,
        extra_columns,
    )
}
BENIGN = {"extra_columns", "layout_noise"}  # the rows must load exactly as the clean ones


# ============================================================================ corruptions of the bytes of a line
def invalid_utf8(rng, line):
    bad = rng.choice(
        [b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80\x80", b"\xf8\x88\x80\x80\x80", b"\xc3"]
    )
    at = line.find(b'": "') + 4 if b'": "' in line else rng.randrange(len(line))
    return line[:at] + bad + line[at:]


def truncated_line(rng, line):
    return line[: rng.randrange(1, len(line))]


def not_an_object(rng, line):
    return rng.choice([b"null", b"5", b'"zqx"', b"[1, 2]", b"{}", b"true", b"[]", b"{", b"}"])


def duplicate_key(rng, line):
    key, value = (
        rng.choice([k for k in LAYOUT if f'"{k}"'.encode() in line]),
        json.dumps(rng.choice(NOT_TEXT)),
    )
    extra = f'"{key}": {value}'.encode()
    return (
        b"{" + extra + b", " + line[1:] if rng.random() < 0.5 else line[:-1] + b", " + extra + b"}"
    )


LINE_KINDS = {f.__name__: f for f in (invalid_utf8, truncated_line, not_an_object, duplicate_key)}
KINDS = [*ROW_KINDS, *LINE_KINDS, "layout_noise"]


def corrupt(name, kind, tmp_path):
    """Write a corrupted copy of the file's first rows; returns (path, corrupted row indices, rows that must be
    rejected, the string leaves of each row as written)."""
    rng = random.Random(f"{name}|{kind}")
    rows = [copy.deepcopy(r) for r in real_rows(name)]
    touched = sorted(rng.sample(range(N_ROWS), 1 if kind == "huge_string" else 3))
    leaves = [set(strings_in(r)) for r in rows]
    must_reject, sep = set(), b"\n"
    if kind in ROW_KINDS:
        for i in touched:
            if ROW_KINDS[kind](rng, rows[i]):
                must_reject.add(i)
            leaves[i] |= set(strings_in(rows[i]))
        lines = [dumps(r) for r in rows]
    else:
        lines = [dumps(r) for r in rows]
        if kind == "layout_noise":  # harmless: CRLF, blank lines, spaces, a UTF-8 byte-order mark
            sep = rng.choice([b"\r\n", b"\n\n", b"  \n \t\n"])
            lines[0] = b"\xef\xbb\xbf" + lines[0]
        else:
            for i in touched:
                lines[i] = LINE_KINDS[kind](rng, lines[i])
                leaves[i] |= {"zqx"} | (
                    set(strings_in(json.loads(lines[i]))) if parses(lines[i]) else set()
                )
    suffix = ".jsonl.gz" if name.endswith(".gz") or rng.random() < 0.25 else ".jsonl"
    if kind in ROW_KINDS and rng.random() < 0.2:  # one JSON array instead of JSON lines
        suffix, lines, sep = ".json", [b"[" + b",\n".join(lines) + b"]"], b"\n"
    path = tmp_path / f"{kind}{suffix}"
    write_lines(path, lines, sep)
    return str(path), ([] if kind in BENIGN else touched), must_reject, leaves


def parses(line):
    try:
        json.loads(line)
        return True
    except ValueError:
        return False


def strings_in(obj):
    """Every string value inside obj (keys excluded)."""
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from strings_in(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from strings_in(v)


# ============================================================================ the property
def assert_clean_exit(e, path):
    msg = e.code
    assert isinstance(msg, str) and msg.startswith("error: "), repr(msg)
    assert "\n" not in msg and len(msg) < 1000, repr(msg[:2000])
    if path is not None:
        assert f"--dataset {path}" in msg, msg


def assert_well_formed(row, pairs):
    assert set(row) == ({"prompt", "chosen", "rejected"} if pairs else {"prompt"}), row.keys()
    prompt = row["prompt"]
    assert type(prompt) is list and prompt, prompt
    for m in prompt:
        assert type(m) is dict and set(m) == {"role", "content"} and m["role"] in ROLES, m
        assert type(m["content"]) is str, m
    assert any(m["content"].strip() for m in prompt), prompt  # some text to answer
    if pairs:
        assert type(row["chosen"]) is str and type(row["rejected"]) is str, (
            row["chosen"],
            row["rejected"],
        )


def texts(row):
    return [m["content"] for m in row["prompt"]] + [
        row[k] for k in ("chosen", "rejected") if k in row
    ]


def assert_from_input(row, leaves):
    """No value invented: each string of the output is part of a string of the input (HH transcripts are cut
    into turns and stripped), and never a bare "True"/"None"/... that no input string is."""
    for s in texts(row):
        assert any(s in leaf for leaf in leaves), f"{s[:200]!r} is in no input string"
        assert s not in {"True", "False", "None", "true", "false", "null"} or s in leaves, s


def skipped_note(err, path):
    notes = re.findall(
        rf"note: skipped (\d+) of (\d+) rows of {re.escape(path)} that could not be parsed", err
    )
    assert len(notes) <= 1, err
    return tuple(map(int, notes[0])) if notes else None


def check_load_rows(path, skip, capsys, clean, touched, must_reject, leaves, pairs):
    """load_rows: well-formed rows (untouched ones as in the clean file) with skips counted, or one error line."""
    capsys.readouterr()
    try:
        rows = data.load_rows(path, skip_bad_rows=skip)
    except SystemExit as e:
        assert_clean_exit(e, path)
        return e.code
    note = skipped_note(capsys.readouterr().err, path)
    for row in rows:
        assert_well_formed(row, pairs)
    if not skip:
        assert note is None and len(rows) == N_ROWS and not must_reject, (
            note,
            len(rows),
            must_reject,
        )
        for i, row in enumerate(rows):
            if i not in touched:
                assert row == clean[i], i
            assert_from_input(row, leaves[i])
    else:
        skipped = note[0] if note else 0
        assert (note is None or note[1] == N_ROWS) and len(rows) + skipped == N_ROWS, (
            note,
            len(rows),
        )
        assert skipped >= len(must_reject), (skipped, must_reject)
        kept = iter(rows)  # the untouched rows, in order, among the rows returned
        assert all(any(row == clean[i] for row in kept) for i in range(N_ROWS) if i not in touched)
        every_leaf = set().union(*leaves)
        for row in rows:
            assert_from_input(row, every_leaf)
    return rows


def check_stage_loaders(path, skip, rows, capsys, tokenizers, pairs):
    """load_pairs and load_prompts agree with load_rows (or fail with its message); encoding never crashes (checked
    with --skip_bad_rows only: without, the rows are the same or there are none)."""
    tokenizers = tokenizers if skip else []
    args = SimpleNamespace(seed=0, skip_bad_rows=skip, dataset_split="train")
    capsys.readouterr()
    try:
        train, held = data.load_pairs(path, args)
    except SystemExit as e:
        assert_clean_exit(e, path)
        # load_rows worked: only a prompt-only file or nothing but ties may stop it
        if isinstance(rows, list):
            assert (
                "holds prompts only" in e.code
                if not pairs
                else all(r["chosen"] == r["rejected"] for r in rows)
            )
        else:
            assert e.code == rows
    else:
        assert pairs and isinstance(rows, list)
        expected = [r for r in rows if r["chosen"] != r["rejected"]]
        assert train and sorted(map(json.dumps, train + held)) == sorted(map(json.dumps, expected))
        encode_all(tokenizers, train + held)
    try:
        prompts = data.load_prompts(path, "train", args)
    except SystemExit as e:
        assert_clean_exit(e, path)
        assert e.code == rows
    else:
        assert prompts == [r["prompt"] for r in rows]
        for tok in tokenizers:  # as rto.py and evaluate.py encode them
            assert all(type(i) is int for p in prompts for i in data.encode_prompt(tok, p))


def encode_all(tokenizers, rows):
    for tok in tokenizers:
        try:
            out = data.encode_examples(tok, rows, max_prompt_len=48, max_response_len=8)
        except SystemExit as e:
            assert_clean_exit(e, None)
            continue
        for ex in out:
            assert 0 < len(ex["prompt"]) <= 48 and all(
                0 < len(ex[k]) <= 8 for k in ("chosen", "rejected")
            )
            assert all(type(i) is int for k in ("prompt", "chosen", "rejected") for i in ex[k])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", FILES)
def test_corrupted_rows(tmp_path, capsys, tokenizers, name, kind):
    pairs = not name.startswith("ultrafeedback_prompts/")
    clean = clean_parse(name, tmp_path)
    path, touched, must_reject, leaves = corrupt(name, kind, tmp_path)
    strict = check_load_rows(path, False, capsys, clean, touched, must_reject, leaves, pairs)
    lenient = check_load_rows(path, True, capsys, clean, touched, must_reject, leaves, pairs)
    if isinstance(strict, list):
        assert lenient == strict  # nothing to skip
    # the file was read and one row refused: --skip_bad_rows must get past it
    elif " row " in strict:
        assert isinstance(lenient, list), lenient
    check_stage_loaders(path, True, lenient, capsys, tokenizers, pairs)
    check_stage_loaders(path, False, strict, capsys, tokenizers, pairs)


# ============================================================================ whole-file corruptions
def whole_file(tmp_path, case):
    """(path, whether rows may come back) for one broken file."""
    rng = random.Random(case)
    good = b"".join(
        dumps(r) + b"\n" for r in real_rows("ultrafeedback_binarized/trl_eval_clean.jsonl")[:5]
    )
    garbage = bytes(rng.randrange(256) for _ in range(4096))
    files = {
        "binary_garbage": ("garbage.jsonl", garbage),
        "binary_garbage_gz": ("garbage.jsonl.gz", gzip.compress(garbage)),
        "gz_name_plain_text": ("plain.jsonl.gz", good),
        "gz_name_garbage": ("garbage2.jsonl.gz", garbage),
        "gz_truncated": ("cut.jsonl.gz", gzip.compress(good)[: len(gzip.compress(good)) // 2]),
        "gz_header_only": ("cut2.jsonl.gz", gzip.compress(good)[:12]),
        "parquet_name_json_text": ("json.parquet", good),
        "parquet_name_garbage": ("garbage.parquet", garbage),
        "json_one_object": (
            "one.json",
            json.dumps(json.loads(good.splitlines()[0]), indent=2).encode(),
        ),
        "json_object_of_rows": (
            "wrapped.json",
            json.dumps({"data": [json.loads(x) for x in good.splitlines()]}, indent=2).encode(),
        ),
        "json_array_of_strings": ("strings.json", b'["a", "b"]'),
        "json_array_of_null": ("nulls.json", b"[null, null]"),
        "null_rows": ("nulls.jsonl", b"null\nnull\n"),
        "first_row_null": ("null_first.jsonl", b"\n null\n" + good),
        "utf16": ("utf16.jsonl", good.decode().encode("utf-16")),
        "rows_without_newlines": ("glued.jsonl", good.replace(b"\n", b"")),
        "only_whitespace_and_brackets": ("brackets.jsonl", b"[\n]\n  \n"),
    }
    name, data = files[case]
    (tmp_path / name).write_bytes(data)
    return str(tmp_path / name)


WHOLE_FILE = [
    "binary_garbage",
    "binary_garbage_gz",
    "gz_name_plain_text",
    "gz_name_garbage",
    "gz_truncated",
    "gz_header_only",
    "parquet_name_json_text",
    "parquet_name_garbage",
    "json_one_object",
    "json_object_of_rows",
    "json_array_of_strings",
    "json_array_of_null",
    "null_rows",
    "first_row_null",
    "utf16",
    "rows_without_newlines",
    "only_whitespace_and_brackets",
]


SAYS = {
    "json_one_object": "one JSON object",
    "json_object_of_rows": "one JSON object",
    "null_rows": "null is not",
    "gz_header_only": "EOFError",
    "gz_name_plain_text": "Not a gzipped file",
    "only_whitespace_and_brackets": "is empty",
    "binary_garbage": "not valid UTF-8",
    "parquet_name_json_text": "Parquet",
}  # what the error says


@pytest.mark.parametrize("case", WHOLE_FILE)
def test_corrupted_file(tmp_path, capsys, tokenizers, case):
    path = whole_file(tmp_path, case)
    for skip in (False, True):
        try:
            rows = data.load_rows(path, skip_bad_rows=skip)
        except SystemExit as e:
            assert_clean_exit(e, path)
            assert SAYS.get(case, "") in e.code
            rows = e.code
        else:
            for row in rows:
                assert_well_formed(row, True)
        check_stage_loaders(path, skip, rows, capsys, tokenizers, True)


def test_directory_with_a_data_file_name(tmp_path):
    (tmp_path / "data.jsonl").mkdir()
    with pytest.raises(SystemExit) as e:
        data.load_rows(str(tmp_path / "data.jsonl"))
    assert_clean_exit(e.value, str(tmp_path / "data.jsonl"))


# ============================================================================ what this test found (regressions)
def write_jsonl(path, rows):
    return write_lines(path, [r if isinstance(r, bytes) else dumps(r) for r in rows])


GOOD = {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Rome."}
Q, A1, A2 = (
    {"role": "user", "content": "q"},
    {"role": "assistant", "content": "a"},
    {"role": "assistant", "content": "b"},
)


def test_wrong_type_past_the_first_10_mb_is_refused_not_turned_into_text(tmp_path, capsys):
    # the datasets JSON reader cast every chunk after the first 10 MB to the first one's types: 7349120581 came
    # back as the answer "7349120581", a dict as its JSON text
    big = dict(GOOD, chosen="Paris. " + "x" * 1000)
    path = write_jsonl(
        tmp_path / "big.jsonl",
        [big] * 11_000 + [dict(GOOD, chosen=SENTINEL), dict(GOOD, rejected={"zqx": 1})],
    )
    with pytest.raises(SystemExit, match=r"row 11000: 'chosen' is not a string"):
        data.load_rows(path)
    rows = data.load_rows(path, skip_bad_rows=True)
    assert len(rows) == 11_000 and all(
        r["chosen"] == big["chosen"] and r["rejected"] == "Rome." for r in rows
    )
    assert f"note: skipped 2 of 11002 rows of {path}" in capsys.readouterr().err


def test_answers_that_read_as_json_stay_text_beside_a_mixed_column(tmp_path):
    # a column of mixed types was stored as JSON by the datasets reader, and answers that happen to be JSON text
    # were decoded: "[1, 2]" became a list (the row was lost), '"yes"' lost its quotes, "null" became None
    answers = ["[1, 2]", '"yes"', "5", "null", '{"a": 1}', "true"]
    path = write_jsonl(
        tmp_path / "mixed.jsonl", [dict(GOOD, chosen=a) for a in answers] + [dict(GOOD, chosen=5)]
    )
    assert [r["chosen"] for r in data.load_rows(path, skip_bad_rows=True)] == answers


@pytest.mark.parametrize(
    "line, why",
    [
        (
            b'{"prompt": "p", "chosen": "\xff", "rejected": "r"}',
            "not valid UTF-8 text",
        ),  # was a UnicodeDecodeError
        (
            b'{"prompt": "p", "chosen": "a\\ud800", "rejected": "r"}',
            "not valid UTF-8 text",
        ),  # the tokenizer's TypeError
        (b'{"prompt": "p", "chosen": "a", "rej', "not valid JSON"),
        (b"null", "null is not a JSON object"),
        (b"[1, 2]", "is not a JSON object"),
    ],
)
def test_a_broken_line_is_one_skippable_row(tmp_path, capsys, line, why):
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD, line, GOOD])
    # a line that opens with "[" only counts as a row after the first line
    if line.startswith(b"["):
        path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD, GOOD, line])
    with pytest.raises(SystemExit) as e:
        data.load_rows(path)
    assert_clean_exit(e.value, path)
    assert why in e.value.code and "--skip_bad_rows" in e.value.code
    assert len(data.load_rows(path, skip_bad_rows=True)) == 2
    assert f"note: skipped 1 of 3 rows of {path}" in capsys.readouterr().err


@pytest.mark.parametrize(
    "raw",
    [b"null\n", b"\n null\n" + dumps(GOOD), b"[null, null]", gzip.compress(b"x" * 99)[:12]],
    ids=["null_rows", "null_first", "array_of_null", "gzip_header_only"],
)
def test_files_that_crashed_the_interpreter_or_raised(tmp_path, raw):
    # pyarrow segfaulted on a first row `null`; a gzip cut inside its header raised EOFError (a traceback)
    path = tmp_path / ("data.jsonl.gz" if raw.startswith(b"\x1f\x8b") else "data.jsonl")
    path.write_bytes(raw)
    with pytest.raises(SystemExit) as e:
        data.load_rows(str(path))
    assert_clean_exit(e.value, str(path))
    try:
        rows = data.load_rows(str(path), skip_bad_rows=True)
    except SystemExit as e:
        assert_clean_exit(e, str(path))
    else:
        assert rows == [data.parse_row(GOOD, "pairs")]  # the null row skipped


@pytest.mark.parametrize(
    "row",
    [
        {
            "prompt": "",
            "chosen": "a",
            "rejected": "b",
        },  # was the prompt [{"role": "user", "content": ""}]
        {"prompt": "Human:", "chosen": "a", "rejected": "b"},
        {"context_messages": [{"role": "user", "content": "  "}]},
        {"chosen": [A1], "rejected": [A2]},  # was the prompt []
        {
            "prompt": False,
            "chosen": [Q, A1],
            "rejected": [Q, A2],
        },  # a falsy wrong type was taken for "no prompt column"
        {"prompt": 0, "chosen": [Q, A1], "rejected": [Q, A2]},
    ],
)
def test_a_prompt_without_text_or_of_the_wrong_type_is_refused(row):
    with pytest.raises(ValueError, match="prompt is empty|non-empty list"):
        data.parse_row(row, data.detect_format(row))


def test_parquet_string_that_is_not_utf8_is_one_skippable_row(tmp_path, capsys):
    # written by a tool that does not check: reading that row back raised UnicodeDecodeError (a traceback)
    import pyarrow as pa
    import pyarrow.parquet as pq

    chosen = pa.array([b"Paris.", b"\xff\xfe", b"Paris."], pa.binary()).view(pa.string())
    path = str(tmp_path / "pairs.parquet")
    pq.write_table(
        pa.table({"prompt": ["q"] * 3, "chosen": chosen, "rejected": ["Rome."] * 3}), path
    )
    with pytest.raises(SystemExit, match="row 1: not valid UTF-8 text") as e:
        data.load_rows(path)
    assert_clean_exit(e.value, path)
    assert [r["chosen"] for r in data.load_rows(path, skip_bad_rows=True)] == ["Paris.", "Paris."]
    assert f"note: skipped 1 of 3 rows of {path}" in capsys.readouterr().err


def test_only_ties_is_an_error_not_an_empty_training_set(tmp_path):
    path = write_jsonl(tmp_path / "ties.jsonl", [dict(GOOD, rejected="Paris.")] * 3)
    with pytest.raises(SystemExit) as e:
        data.load_pairs(path, SimpleNamespace(seed=0, skip_bad_rows=False, dataset_split="train"))
    assert_clean_exit(e.value, path)
    assert "chosen equal to rejected" in e.value.code
