"""Data: format detection, parsing of every supported layout, the real samples, tokenisation and batches.

Fixtures are written by the tests themselves (tmp_path), except the real samples in samples/ (see the SOURCE.md
files there for origin, licence, layouts and how each file was cut).
"""

import gzip
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import common
import data
import toy_task
from conftest import A, S, U, write_rows

DATA = Path(__file__).resolve().parents[1] / "samples"


# ============================================================================ layouts, by hand
HH_ONE = "\n\nHuman: What is 2+2?\n\nAssistant: "
HH_MULTI = (
    "\n\nHuman: Hi there.\n\nAssistant: Hello! How can I help?"
    "\n\nHuman: Name a fruit.\nJust one, please.\n\nAssistant: "
)

# (case id, raw row, parsed row); one file per case in the load_rows test
CASES = [
    (
        "hh_single_turn",
        {"chosen": HH_ONE + "4.", "rejected": HH_ONE + "5."},
        {"prompt": [U("What is 2+2?")], "chosen": "4.", "rejected": "5."},
    ),
    (
        "hh_multi_turn",
        {"chosen": HH_MULTI + "An apple.", "rejected": HH_MULTI + "No.\n\nGo away."},
        {
            "prompt": [
                U("Hi there."),
                A("Hello! How can I help?"),
                U("Name a fruit.\nJust one, please."),
            ],
            "chosen": "An apple.",
            "rejected": "No.\n\nGo away.",
        },
    ),
    (
        "hh_empty_reply",  # real HH-RLHF has these (harmless-base test rows 86, 516, 925, 1103): silence preferred
        {"chosen": HH_ONE.rstrip(), "rejected": HH_ONE + "5."},
        {"prompt": [U("What is 2+2?")], "chosen": "", "rejected": "5."},
    ),
    (
        "ultrafeedback_with_prompt",
        {
            "prompt": "Write a haiku.",
            "chosen": [U("Write a haiku."), A("Leaves fall\nquietly.")],
            "rejected": [U("Write a haiku."), A("No.")],
            "score_chosen": 8.0,
            "score_rejected": 2.5,
        },
        {"prompt": [U("Write a haiku.")], "chosen": "Leaves fall\nquietly.", "rejected": "No."},
    ),
    (
        "ultrafeedback_without_prompt",
        {
            "chosen": [U("Write a haiku."), A("Leaves fall.")],
            "rejected": [U("Write a haiku."), A("No.")],
        },
        {"prompt": [U("Write a haiku.")], "chosen": "Leaves fall.", "rejected": "No."},
    ),
    (
        "ultrafeedback_multi_turn_without_prompt",
        {
            "chosen": [S("Be brief."), U("Hi"), A("Hello"), U("Bye?"), A("Bye!")],
            "rejected": [S("Be brief."), U("Hi"), A("Hello"), U("Bye?"), A("Why?")],
        },
        {
            "prompt": [S("Be brief."), U("Hi"), A("Hello"), U("Bye?")],
            "chosen": "Bye!",
            "rejected": "Why?",
        },
    ),
    ("prompt_only_string", {"prompt": "Tell me a joke."}, {"prompt": [U("Tell me a joke.")]}),
    (
        "prompt_only_context_messages",
        {"context_messages": [U("What is RLHF?")]},
        {"prompt": [U("What is RLHF?")]},
    ),
    (
        "prompt_only_context_messages_multi_turn",
        {"context_messages": [S("You are terse."), U("Hi"), A("Hi."), U("What is RLHF?")]},
        {"prompt": [S("You are terse."), U("Hi"), A("Hi."), U("What is RLHF?")]},
    ),
    (
        "prompt_only_hh_string",
        {"prompt": "Human: Hi.\n\nAssistant: Hello.\n\nHuman: Tell me a joke."},
        {"prompt": [U("Hi."), A("Hello."), U("Tell me a joke.")]},
    ),
    (
        "generic_strings",
        {"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "Lyon."},
        {"prompt": [U("What is the capital of France?")], "chosen": "Paris.", "rejected": "Lyon."},
    ),
    (
        "generic_hh_style_prompt",  # the layout of samples/hh_rlhf/test_mixed.split.jsonl
        {
            "prompt": "Human: Hi.\n\nAssistant: Hello, how can I help?\n\nHuman: Capital of France?",
            "chosen": "Paris.",
            "rejected": "Rome.",
        },
        {
            "prompt": [U("Hi."), A("Hello, how can I help?"), U("Capital of France?")],
            "chosen": "Paris.",
            "rejected": "Rome.",
        },
    ),
    (
        "generic_hh_prompt_ending_in_assistant_cue",  # Dahoas/rm-static: the prompt ends with "\n\nAssistant:"
        {
            "prompt": "\n\nHuman: Capital of France?\n\nAssistant:",
            "chosen": "Paris.",
            "rejected": "Rome.",
        },
        {"prompt": [U("Capital of France?")], "chosen": "Paris.", "rejected": "Rome."},
    ),
]
CASE_IDS = [c[0] for c in CASES]


@pytest.mark.parametrize(
    "columns, fmt",
    [
        (["chosen", "rejected"], "pairs"),
        (["prompt", "chosen", "rejected"], "pairs"),
        (["prompt", "chosen", "rejected", "score_chosen", "score_rejected", "prompt_id"], "pairs"),
        (["prompt"], "prompt_only"),
        (["context_messages"], "prompt_only"),
        (["context_messages", "chosen", "rejected"], "prompt_only"),
        (["foo", "bar"], None),
        (["chosen"], None),
        ([], None),
    ],
)
def test_detect_format(columns, fmt):
    assert data.detect_format(columns) == fmt


@pytest.mark.parametrize("raw, expected", [c[1:] for c in CASES], ids=CASE_IDS)
def test_parse_row(raw, expected):
    assert data.parse_row(raw, data.detect_format(raw)) == expected


@pytest.mark.parametrize("raw, expected", [c[1:] for c in CASES], ids=CASE_IDS)
def test_load_rows_each_layout(tmp_path, raw, expected):
    # a second row so that a column missing from one row is not the whole story
    path = write_rows(tmp_path / "data.jsonl", [raw, raw])
    assert data.load_rows(path) == [expected, expected]


@pytest.mark.parametrize("name", ["data.jsonl.gz", "data.json", "data.parquet"])
@pytest.mark.parametrize(
    "case",
    [
        "hh_multi_turn",
        "ultrafeedback_multi_turn_without_prompt",
        "prompt_only_context_messages_multi_turn",
        "generic_hh_style_prompt",
    ],
)
def test_load_rows_file_kinds(tmp_path, name, case):
    _, raw, expected = CASES[CASE_IDS.index(case)]
    path = write_rows(tmp_path / name, [raw] * 3)
    assert data.load_rows(path) == [expected] * 3


# ============================================================================ pairs, prompts, held-out split
def test_load_pairs_skips_ties_and_splits(tmp_path, capsys):
    rows = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(40)]
    for i in (3, 17, 29):
        rows[i]["rejected"] = rows[i]["chosen"]
    path = write_rows(tmp_path / "pairs.jsonl", rows)
    args = SimpleNamespace(seed=0, skip_bad_rows=False, dataset_split="train")
    train, held = data.load_pairs(path, args, eval_fraction=0.25)
    assert "note: skipped 3 pairs whose chosen equals rejected" in capsys.readouterr().err
    assert (len(train), len(held)) == (28, 9)  # int(37 * 0.25) held out
    assert all(r["chosen"] != r["rejected"] for r in train + held)
    prompts = [r["prompt"][0]["content"] for r in train + held]
    assert sorted(prompts) == sorted(f"q{i}" for i in range(40) if i not in (3, 17, 29))
    assert data.load_pairs(path, args, eval_fraction=0.25) == (train, held)  # deterministic


def test_load_prompts_from_pairs_and_prompt_files(tmp_path):
    args = SimpleNamespace(seed=0, skip_bad_rows=False, dataset_split="train")
    pairs = write_rows(tmp_path / "pairs.jsonl", [CASES[1][1]] * 3)
    prompts = write_rows(
        tmp_path / "prompts.jsonl", [{"context_messages": [U(f"q{i}")]} for i in range(5)]
    )
    assert data.load_prompts(pairs, "train", args) == [CASES[1][2]["prompt"]] * 3
    assert data.load_prompts(prompts, "train", args, n=2) == [[U("q0")], [U("q1")]]


@pytest.mark.parametrize("n, fraction", [(100, 0.05), (10, 0.5), (7, 0.01), (2, 0.05)])
def test_split_eval_deterministic_disjoint_complete(n, fraction):
    rows = list(range(n))
    train, held = data.split_eval(rows, fraction, seed=1)
    assert (train, held) == data.split_eval(rows, fraction, seed=1)
    assert not set(train) & set(held)
    assert sorted(train + held) == rows
    assert len(held) == max(1, int(n * fraction))


def test_split_eval_edge_cases():
    assert data.split_eval(["only"], 0.05, seed=0) == (["only"], [])
    a, b = (
        data.split_eval(list(range(100)), 0.1, seed=0),
        data.split_eval(list(range(100)), 0.1, seed=1),
    )
    assert a != b  # the seed matters


# ============================================================================ the real samples
EXPECTED_ROWS = {  # from the SOURCE.md files
    "hh_rlhf/harmless-base_test.jsonl.gz": 1300,
    "hh_rlhf/test_mixed.split.jsonl": 250,
    "hh_rlhf/test_mixed.hh_format.jsonl": 250,
    "ultrafeedback_binarized/train_prefs.jsonl": 50,
    "ultrafeedback_binarized/test_prefs.jsonl": 50,
    "ultrafeedback_binarized/trl_train_clean.jsonl": 50,
    "ultrafeedback_binarized/trl_eval_clean.jsonl": 20,
    "ultrafeedback_binarized/h4_layout_with_scores.jsonl": 70,
    "ultrafeedback_prompts/train_prompts.jsonl": 100,
    "ultrafeedback_prompts/test_prompts.jsonl": 50,
}
REAL_FILES = sorted(
    set(EXPECTED_ROWS)
    | {
        str(p.relative_to(DATA))
        for p in DATA.glob("*/*")
        if p.name.endswith((".json", ".jsonl", ".gz", ".parquet"))
    }
)


# Rows whose source transcript is itself broken, so that the prompt ends with the assistant's turn: a human turn
# glued on with "  Human:" instead of "\n\nHuman:" (harmless-base test row 1254). Kept as they are, like other HH
# loaders do.
PROMPT_ENDS_WITH_ASSISTANT = {"hh_rlhf/harmless-base_test.jsonl.gz": 1}


@pytest.mark.parametrize("name", REAL_FILES)
def test_real_file_loads(name):
    rows = data.load_rows(str(DATA / name))
    assert len(rows) == EXPECTED_ROWS.get(name, len(rows))
    pairs = not name.startswith("ultrafeedback_prompts/")
    odd, empty = 0, 0
    for row in rows:
        assert set(row) == ({"prompt", "chosen", "rejected"} if pairs else {"prompt"})
        prompt = row["prompt"]
        assert prompt and all(
            set(m) == {"role", "content"} and isinstance(m["content"], str) for m in prompt
        )
        users = [m for m in prompt if m["role"] == "user"]
        assert users and users[-1]["content"].strip()
        odd += prompt[-1]["role"] != "user"
        if pairs:
            assert isinstance(row["chosen"], str) and isinstance(row["rejected"], str)
            assert row["chosen"].strip() or row["rejected"].strip()
            empty += not row["chosen"].strip() or not row["rejected"].strip()
    assert odd == PROMPT_ENDS_WITH_ASSISTANT.get(name, 0)
    # a few empty replies in the sources (kept: EOS alone is the response)
    assert empty <= 0.01 * len(rows)


def test_real_hh_transcripts_rejoin():
    path = DATA / "hh_rlhf" / "harmless-base_test.jsonl.gz"
    with gzip.open(path, "rt") as f:
        raws = [json.loads(line) for line in f]
    rows = data.load_rows(str(path))
    assert len(rows) == len(raws)
    hh = data.build_tiny_tokenizer("other")
    hh.chat_template = (
        None  # format_prompt then writes the HH layout "\n\nHuman: ...\n\nAssistant:"
    )
    exact = 0
    for raw, row in zip(raws, rows, strict=True):
        for key in ("chosen", "rejected"):
            text = raw[key]
            assert row[key] == text[text.rfind("\n\nAssistant:") + len("\n\nAssistant:") :].strip()
        last_user = [m for m in row["prompt"] if m["role"] == "user"][-1]["content"]
        assert last_user in raw["chosen"] and last_user in raw["rejected"]
        head = data.format_prompt(hh, row["prompt"])
        exact += (
            head + " " + row["chosen"] == raw["chosen"]
            and head + " " + row["rejected"] == raw["rejected"]
        )
    # well-formed rows: prompt + " " + answer is the transcript
    for raw, row in list(zip(raws, rows, strict=True))[:5]:
        assert data.format_prompt(hh, row["prompt"]) + " " + row["chosen"] == raw["chosen"]
    # the rest differ only in whitespace, or are malformed in the source
    assert exact >= 0.99 * len(rows)
    assert [i for i, r in enumerate(rows) if not r["chosen"]] == [
        86,
        516,
        925,
        1103,
    ]  # empty in the source too


def test_real_layouts_agree():
    """The same data in two layouts parses to the same rows."""

    def load(name):
        return data.load_rows(str(DATA / name))

    assert load("hh_rlhf/test_mixed.split.jsonl") == load("hh_rlhf/test_mixed.hh_format.jsonl")
    uf = "ultrafeedback_binarized/"
    trl_train = load(uf + "trl_train_clean.jsonl")
    trl = trl_train + load(uf + "trl_eval_clean.jsonl")

    def key(r):
        return json.dumps(r, sort_keys=True)

    assert sorted(map(key, load(uf + "h4_layout_with_scores.jsonl"))) == sorted(map(key, trl))
    seen = {}
    for row in trl_train + load(uf + "train_prefs.jsonl"):
        seen.setdefault(key(row["prompt"]), row["prompt"])
    assert [r["prompt"] for r in load("ultrafeedback_prompts/train_prompts.jsonl")] == list(
        seen.values()
    )


def test_real_load_pairs(capsys):
    path = str(DATA / "hh_rlhf" / "test_mixed.split.jsonl")
    train, held = data.load_pairs(
        path, SimpleNamespace(seed=0, skip_bad_rows=False, dataset_split="train")
    )
    # row 224
    assert "note: skipped 1 pairs whose chosen equals rejected" in capsys.readouterr().err
    assert (len(train), len(held)) == (237, 12)  # int(249 * 0.05) held out

    def key(r):
        return json.dumps(r, sort_keys=True)

    assert not {key(r) for r in train} & {key(r) for r in held}


# ============================================================================ tokenisation
@pytest.fixture(scope="module")
def toy_tok():
    return data.build_tiny_tokenizer("toy")


@pytest.fixture(scope="module")
def byte_tok():
    return data.build_tiny_tokenizer("other")


def ids(tok, text):
    return tok.convert_tokens_to_ids(text.split())


def test_format_prompt(toy_tok):
    msgs = [U("hi"), A("hello"), U("tell me about fruit")]
    assert data.format_prompt(toy_tok, msgs) == (
        "<|user|> hi <|assistant|> hello <|user|> tell me about fruit <|assistant|>"
    )
    plain = data.build_tiny_tokenizer("toy")
    plain.chat_template = None
    assert data.format_prompt(plain, [S("be kind"), *msgs]) == (
        "\n\nSystem: be kind\n\nHuman: hi\n\nAssistant: hello\n\nHuman: tell me about fruit\n\nAssistant:"
    )


def test_encode_examples_toy(toy_tok, capsys):
    rows = [
        {"prompt": [U("tell me about fruit")], "chosen": "apple pear .", "rejected": "asdf"},
        {"prompt": [U("hi please tell me about space now")], "chosen": "star", "rejected": "moon"},
        {
            "prompt": [U("describe music")],
            "chosen": "drum piano violin flute guitar .",
            "rejected": "song",
        },
    ]
    out = data.encode_examples(toy_tok, rows, max_prompt_len=6, max_response_len=4)
    err = capsys.readouterr().err
    assert "skipped 1 prompts over 6 tokens" in err and "truncated 1 responses to 4 tokens" in err
    eos = toy_tok.eos_token_id
    assert out == [
        {
            "prompt": ids(toy_tok, "<|user|> tell me about fruit <|assistant|>"),
            "chosen": ids(toy_tok, "apple pear .") + [eos],
            "rejected": ids(toy_tok, "asdf") + [eos],
        },
        {
            "prompt": ids(toy_tok, "<|user|> describe music <|assistant|>"),  # prompt kept whole
            "chosen": ids(toy_tok, "drum piano violin flute"),  # cut to 4: no room left for EOS
            "rejected": ids(toy_tok, "song") + [eos],
        },
    ]


def test_encode_examples_keys_and_limits_are_inclusive(toy_tok, capsys):
    # prompt 4 tokens, response 3 + EOS
    rows = [{"prompt": [U("describe music")], "response": "drum piano ."}]
    out = data.encode_examples(
        toy_tok, rows, max_prompt_len=4, max_response_len=4, keys=("response",)
    )
    assert out == [
        {
            "prompt": ids(toy_tok, "<|user|> describe music <|assistant|>"),
            "response": ids(toy_tok, "drum piano .") + [toy_tok.eos_token_id],
        }
    ]
    assert capsys.readouterr().err == ""  # nothing skipped, nothing cut


def test_encode_examples_long_prompt_fail(toy_tok):
    rows = [{"prompt": [U("tell me about fruit")], "chosen": "apple", "rejected": "pear"}]
    with pytest.raises(SystemExit, match=r"^error: a prompt has 6 tokens > --max_prompt_len 5"):
        data.encode_examples(toy_tok, rows, 5, 8, long_prompts="fail")
    with pytest.raises(SystemExit, match=r"^error: no prompt fits --max_prompt_len 5"):
        data.encode_examples(toy_tok, rows, 5, 8, long_prompts="skip")


def test_encode_examples_bytes(byte_tok, capsys):
    content, answer = "héllo wörld", "ça va"
    prompt_len = 2 + len(f" {content} ".encode())  # <|user|> + bytes + <|assistant|>
    rows = [{"prompt": [U(content)], "chosen": answer, "rejected": ""}]
    out = data.encode_examples(byte_tok, rows, prompt_len, 64)
    eos = byte_tok.eos_token_id
    assert len(out[0]["prompt"]) == prompt_len
    assert byte_tok.decode(out[0]["prompt"]) == data.format_prompt(byte_tok, [U(content)])
    assert out[0]["chosen"][-1] == eos and byte_tok.decode(out[0]["chosen"][:-1]) == answer
    assert len(out[0]["chosen"]) == len(answer.encode()) + 1
    assert out[0]["rejected"] == [eos]  # an empty reply is EOS alone
    short = data.encode_examples(byte_tok, rows, prompt_len, 3)
    assert short[0]["chosen"] == out[0]["chosen"][:3] and short[0]["prompt"] == out[0]["prompt"]


def test_encode_examples_bytes_prompt_limit(byte_tok, capsys):
    rows = [
        {"prompt": [U("a" * 10)], "chosen": "x", "rejected": "y"},
        {"prompt": [U("a" * 11)], "chosen": "x", "rejected": "y"},
    ]
    # <|user|> " " + 10 × a + " " <|assistant|>
    out = data.encode_examples(byte_tok, rows, 2 + 12, 8)
    assert [len(e["prompt"]) for e in out] == [14]
    assert "skipped 1 prompts over 14 tokens" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="15 tokens > --max_prompt_len 14"):
        data.encode_examples(byte_tok, rows, 14, 8, long_prompts="fail")


# ============================================================================ batches
def test_collate_layout():
    batch = data.collate([[11, 12, 13], [14]], [[21], [22, 23, 24]], pad_id=0)
    assert batch["prompt_len"] == 3
    assert batch["input_ids"].tolist() == [[11, 12, 13, 21, 0, 0], [0, 0, 14, 22, 23, 24]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]]
    assert batch["response_mask"].tolist() == [[1, 0, 0], [1, 1, 1]]
    assert batch["input_ids"].dtype == torch.long and batch["response_mask"].dtype == torch.float32


def test_collate_pad_equal_to_eos_is_masked_by_position():
    eos = 2  # pad == EOS (tokenizers without a pad token): the mask, not the id, says what is real
    batch = data.collate([[5, 6], [7]], [[8, eos], [eos]], pad_id=eos)
    assert batch["input_ids"].tolist() == [[5, 6, 8, eos], [eos, 7, eos, eos]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [0, 1, 1, 0]]
    assert batch["response_mask"].tolist() == [[1, 1], [1, 0]]


def test_left_pad():
    input_ids, mask = common.left_pad([[1, 2], [3], [4, 5, 6]], pad_id=9)
    assert input_ids.tolist() == [[9, 1, 2], [9, 9, 3], [4, 5, 6]]
    assert mask.tolist() == [[0, 1, 1], [0, 0, 1], [1, 1, 1]]
    assert common.left_pad([[1]], pad_id=9, width=3)[0].tolist() == [[9, 9, 1]]


def test_byte_level_tiny_tokenizer_round_trips_any_text():
    tok = data.build_tiny_tokenizer("some/file.jsonl")
    text = "Héllo, wörld! 👋 \n\tdone"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert tok.pad_token_id != tok.eos_token_id


def test_decoded_responses_keep_junk_special_tokens_but_not_the_final_eos():
    tok = data.build_tiny_tokenizer(common.TOY)
    p = data.encode_prompt(tok, [{"role": "user", "content": "tell me about fruit"}])
    r = tok("apple <unk> pear", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    batch = data.collate([p, p], [r, r[:1]], tok.pad_token_id)
    texts = data.decode_responses(tok, batch)
    assert texts == ["apple <unk> pear", "apple"]
    # <unk> is junk to the judge
    assert toy_task.oracle_reward("tell me about fruit", texts[0]) == 1.0
