"""Data: the dataset layouts, tokenisation into the batch layout, the tiny tokenizer, the built-in task's judge.

Layouts read (`load_rows`, by column names): Anthropic HH-RLHF transcripts (chosen/rejected), UltraFeedback message
lists (chosen/rejected [+ prompt]), generic prompt/chosen/rejected, and prompt-only (prompt or context_messages),
from a hub dataset or a local json/jsonl(.gz)/parquet file. Every row becomes {prompt: messages, chosen, rejected}
or {prompt: messages}.

Batch layout used everywhere (built by `collate`):

    input_ids       (B, P + R)   [pad .. pad prompt | response pad .. pad]   prompt left-padded, response right-padded
    attention_mask  (B, P + R)   1 on real tokens
    response_mask   (B, R)       1 on response tokens (EOS included), 0 on padding
    prompt_len      int          P, the same for the whole batch, so response token j sits at column P + j

Left-padded prompts are what `generate` needs, so a rollout comes out of generation already in this layout.
"""

import json
import os
import sys

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

import common
import speed
import toy_task
from common import TOY_LONG, TOYS, fail


# ============================================================================ dataset layouts
# One parser per layout; each row becomes {prompt: messages, chosen: str, rejected: str} or {prompt: messages}.
def _messages_from_hh(text):
    """'\\n\\nHuman: a\\n\\nAssistant: b ...' -> [{role, content}, ...]"""
    msgs = []
    for chunk in ("\n\n" + text.lstrip("\n")).split("\n\nHuman:")[1:]:
        human, *assistants = chunk.split("\n\nAssistant:")
        msgs.append({"role": "user", "content": human.strip()})
        msgs += [{"role": "assistant", "content": a.strip()} for a in assistants]
    return msgs


def _as_prompt(value):
    """A prompt column: a string (HH-style transcripts are split into turns) or a list of messages."""
    if isinstance(value, str):
        if value.lstrip().startswith("Human:"):
            msgs = _messages_from_hh(value)
            if msgs and msgs[-1] == {"role": "assistant", "content": ""}:
                msgs.pop()  # a trailing "Assistant:" (Dahoas/rm-static layout) is the cue to answer, not a turn
            if msgs:
                return msgs
        return [{"role": "user", "content": value}]
    return _as_messages(value)


def _as_messages(value):
    if not isinstance(value, list) or not value:
        raise ValueError("expected a non-empty list of {role, content} messages")
    for m in value:
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("content"), str)
            or m.get("role") not in ("system", "user", "assistant")
        ):
            raise ValueError("a message is not {role: system|user|assistant, content: str}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _text(value, column):
    # An empty reply is real data, not a broken row: HH-RLHF and UltraFeedback hold a few (the assistant said
    # nothing); the response is then EOS alone.
    if not isinstance(value, str):
        raise ValueError(f"'{column}' is not a string")
    return value


def detect_format(columns):
    """The data layout, from the column names alone."""
    cols = set(columns)
    if "context_messages" in cols:
        return "prompt_only"
    if {"chosen", "rejected"} <= cols:
        return "pairs"  # HH transcripts, UltraFeedback message lists, or generic prompt/chosen/rejected
    if "prompt" in cols:
        return "prompt_only"
    return None


def parse_row(row, fmt):
    """One raw row -> {'prompt': messages, 'chosen': str, 'rejected': str} (or just 'prompt')."""
    parsed = _parse_layout(row, fmt)
    # A prompt without any text (an empty prompt column, a bare "Human:", a conversation that is only the answer)
    # leaves nothing to respond to: a broken row, not a question
    if not any(m["content"].strip() for m in parsed["prompt"]):
        raise ValueError("the prompt is empty")
    return parsed


def _parse_layout(row, fmt):
    if fmt == "prompt_only":
        return {
            "prompt": _as_prompt(
                row["context_messages"] if "context_messages" in row else row["prompt"]
            )
        }
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if chosen is None or rejected is None:
        raise ValueError("'chosen' or 'rejected' is missing")
    # UltraFeedback: full conversations, the last message is the answer
    if isinstance(chosen, list):
        chosen, rejected = _as_messages(chosen), _as_messages(rejected)
        if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
            raise ValueError("the last message of 'chosen'/'rejected' is not the assistant's")
        # no prompt column (or an empty one): the conversation before the answer; any other value must be a prompt
        prompt = chosen[:-1] if row.get("prompt") in (None, "") else _as_prompt(row["prompt"])
        return {
            "prompt": prompt,
            "chosen": _text(chosen[-1]["content"], "chosen"),
            "rejected": _text(rejected[-1]["content"], "rejected"),
        }
    chosen, rejected = _text(chosen, "chosen"), _text(rejected, "rejected")
    if row.get("prompt") is not None:  # generic prompt/chosen/rejected
        return {"prompt": _as_prompt(row["prompt"]), "chosen": chosen, "rejected": rejected}
    # Anthropic HH-RLHF: two full transcripts that differ only after the last "Assistant:"
    cut_c, cut_r = chosen.rfind("\n\nAssistant:"), rejected.rfind("\n\nAssistant:")
    if cut_c < 0 or cut_r < 0:
        raise ValueError("no '\\n\\nAssistant:' turn in 'chosen'/'rejected'")
    prompt = _messages_from_hh(chosen[:cut_c])
    if not prompt:
        raise ValueError("no '\\n\\nHuman:' turn before the last assistant turn")
    return {
        "prompt": prompt,
        "chosen": _text(chosen[cut_c + 12 :].strip(), "chosen"),
        "rejected": _text(rejected[cut_r + 12 :].strip(), "rejected"),
    }


# ============================================================================ reading files and hub datasets
# Rows of a hub dataset or a local file, every bad row refused (or skipped and counted) with the reason.
def load_rows(dataset, split="train", skip_bad_rows=False):
    """Rows of a hub dataset or a local json/jsonl(.gz)/parquet file, parsed into one layout."""
    local = os.path.exists(dataset)
    if not local and (
        dataset.startswith((".", "/", "~"))
        or dataset.endswith((".json", ".jsonl", ".gz", ".parquet"))
    ):
        fail(f"--dataset {dataset}: no such file")
    if local and not dataset.endswith(".parquet"):
        columns, raws = _read_json(dataset)
    else:
        columns, raws = _read_with_datasets(dataset, split, local)
    if len(raws) == 0:
        fail(f"--dataset {dataset}: has no rows")
    fmt = detect_format(columns)
    if fmt is None:
        fail(
            f"--dataset {dataset}: unknown format (columns {columns}); expected chosen/rejected "
            "(HH-RLHF, UltraFeedback, or with prompt), or prompt / context_messages"
        )
    rows, bad = [], 0
    for i in range(len(raws)):
        try:
            # by index: a parquet string that is not UTF-8 raises as its row is read, not before
            raw = raws[i]
            if isinstance(raw, ValueError):  # a JSON line that is not an object (see _read_json)
                raise raw
            rows.append(parse_row(raw, fmt))
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            why = "not valid UTF-8 text" if isinstance(e, UnicodeDecodeError) else e
            if not skip_bad_rows:
                fail(f"--dataset {dataset} row {i}: {why} (pass --skip_bad_rows to skip such rows)")
            bad += 1
    if bad:
        print(
            f"note: skipped {bad} of {len(raws)} rows of {dataset} that could not be parsed",
            file=sys.stderr,
        )
    if not rows:
        fail(f"--dataset {dataset}: no usable rows")
    return rows


def _read_with_datasets(dataset, split, local):
    """A parquet file or a hub dataset: (column names, rows)."""
    import datasets

    try:
        if local:
            ds = datasets.load_dataset("parquet", data_files=dataset, split="train")
        else:
            ds = datasets.load_dataset(dataset, split=split)
    except Exception as e:  # the datasets library raises many kinds; all mean the same to a user
        why = (str(e).splitlines() or [""])[0][:200]  # some come with no message at all
        fail(
            f"--dataset {dataset}: cannot be read as a dataset ({type(e).__name__}{f': {why}' if why else ''})"
        )
    return ds.column_names, ds


def _read_json(path):
    """A local JSON-lines file, or one JSON array, either possibly gzipped: (column names, rows), where a row is a
    dict holding every column (None where it lacks one) or the ValueError that says why its line is not a row.

    The json module rather than the datasets library's JSON reader, which changes values where it should let
    parse_row refuse them: past its first 10 MB it casts a column to the type seen so far (an int `chosen` comes
    back as "5", a dict as its JSON text); a column of mixed types is stored as JSON, so that an answer which
    happens to read as JSON ("[1, 2]", '"yes"') comes back as a list or loses its quotes; it lets invalid UTF-8
    through; and its pyarrow (26) crashes the interpreter on a file whose first row is `null`."""
    import gzip
    import zlib

    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            data = f.read().removeprefix(b"\xef\xbb\xbf")
    except (
        OSError,
        EOFError,
        zlib.error,
    ) as e:  # a folder, not gzip after all, gzip cut short, ...
        fail(f"--dataset {path}: cannot be read ({type(e).__name__}: {str(e)[:200]})")
    if data.lstrip().startswith(b"["):  # one JSON array: it stands or falls as a whole
        values = _json_value(data)
        if isinstance(values, ValueError):
            fail(f"--dataset {path}: cannot be read as a dataset (a JSON array that is {values})")
        rows = [_json_object(v) for v in values]
    else:
        rows = [_json_object(_json_value(line)) for line in data.splitlines() if line.strip()]
    if not rows:
        fail(f"--dataset {path}: is empty (no rows)")
    if not any(isinstance(r, dict) for r in rows):
        what = (
            "one JSON object over many lines"
            if isinstance(_json_value(data), dict)
            else f"row 0: {rows[0]}"
        )
        fail(
            f"--dataset {path}: cannot be read as a dataset ({what}; expected an object per line or an array of "
            "objects)"
        )
    columns = list(dict.fromkeys(k for r in rows if isinstance(r, dict) for k in r))
    return columns, [{c: r.get(c) for c in columns} if isinstance(r, dict) else r for r in rows]


def _json_value(text):
    """Bytes of JSON -> the value, or a ValueError saying why not."""
    try:
        value = json.loads(text.decode())  # strict UTF-8
        # escapes of lone surrogates ("\ud800") parse, but no tokenizer takes them
        if b"\\ud" in text.lower():
            json.dumps(value, ensure_ascii=False).encode()
    except UnicodeError:
        return ValueError("not valid UTF-8 text")
    except (ValueError, RecursionError) as e:
        return ValueError(f"not valid JSON ({str(e)[:200]})")
    return value


def _json_object(value):
    if isinstance(value, (dict, ValueError)):
        return value
    return ValueError(f"{json.dumps(value)[:40]} is not a JSON object")


# ============================================================================ what the stages load
# Preference pairs (sft, dpo, reward model) and prompts (rto, evaluate), on the built-in task or a dataset.
def split_eval(rows, eval_fraction, seed):
    """Hold out a fixed, seeded fraction of a single file for evaluation."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(rows), generator=g).tolist()
    n_eval = max(1, int(len(rows) * eval_fraction)) if len(rows) > 1 else 0
    return [rows[i] for i in order[n_eval:]], [rows[i] for i in order[:n_eval]]


def load_pairs(dataset, args, eval_fraction=0.05):
    """(train, eval) preference pairs: {prompt: messages, chosen: str, rejected: str}."""
    if dataset in TOYS:
        return (
            toy_task.preference_data("train", seed=args.seed, task=dataset),
            toy_task.preference_data("test", 500, args.seed, task=dataset),
        )
    rows = [r for r in load_rows(dataset, args.dataset_split, args.skip_bad_rows) if "chosen" in r]
    if not rows:
        fail(f"--dataset {dataset}: holds prompts only; this stage needs chosen/rejected pairs")
    same = [r for r in rows if r["chosen"] == r["rejected"]]
    if same:
        print(f"note: skipped {len(same)} pairs whose chosen equals rejected", file=sys.stderr)
        rows = [r for r in rows if r["chosen"] != r["rejected"]]
    if not rows:  # else an empty training set, and a crash far from its cause
        fail(f"--dataset {dataset}: every pair has chosen equal to rejected; nothing to learn from")
    return split_eval(rows, eval_fraction, args.seed)


def load_prompts(dataset, split, args, n=None):
    """Prompts (lists of messages): a prompt-only set, or the prompts of a preference set."""
    if dataset in TOYS:
        return toy_task.prompts(split, n or toy_task.RL_PROMPTS, seed=args.seed, task=dataset)
    prompts = [r["prompt"] for r in load_rows(dataset, split, args.skip_bad_rows)]
    return prompts[:n] if n else prompts


def held_out_prompts(tokenizer, dataset, split, n, args):
    """(prompts as messages, their token ids): the first n of a split that fit --max_prompt_len, in file order; on the
    built-in tasks n test prompts drawn with --seed. Over-long prompts before them are skipped (counted) or fatal
    (--long_prompts)."""
    prompts = load_prompts(dataset, split, args, n if dataset in TOYS else None)
    keep = fit_prompts(tokenizer, prompts, args.max_prompt_len, args.long_prompts, limit=n)
    if len(keep) < n:
        print(
            f"note: only {len(keep)} of the {n} prompts asked for fit --max_prompt_len",
            file=sys.stderr,
        )
    return [p for p, _ in keep], [ids for _, ids in keep]


# ============================================================================ tokenisation and batches
# Messages -> token ids (prompts never cut, responses cut to length) -> the batch layout above, and back to text.
def format_prompt(tokenizer, messages):
    """Prompt text ending where the assistant's answer starts; HH-style text when there is no chat template."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    who = {"user": "Human", "assistant": "Assistant", "system": "System"}
    return "".join(f"\n\n{who[m['role']]}: {m['content']}" for m in messages) + "\n\nAssistant:"


def encode_prompt(tokenizer, messages):
    return tokenizer(format_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"]


def encode_response(tokenizer, text, max_len):
    """Response ids + EOS, cut to max_len (EOS kept only if it fits); returns (ids, was_truncated)."""
    prefix = "" if tokenizer.chat_template else " "  # "Assistant: answer" in the HH layout
    ids = tokenizer(prefix + text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return ids[:max_len], len(ids) > max_len


def fit_prompts(tokenizer, items, max_prompt_len, long_prompts="skip", limit=None, key=None):
    """The long-prompt policy, for every stage: [(item, prompt ids)] of the items whose prompt fits max_prompt_len,
    in order, at most `limit` of them. An item is a prompt (a list of messages), or a row whose item[key] is.
    A longer prompt is skipped and counted (one note on stderr), or fatal with long_prompts == "fail"; prompts
    are never cut, since the response would then answer a question that was never asked."""
    keep, long = [], 0
    for item in items:
        if limit is not None and len(keep) == limit:
            break
        ids = encode_prompt(tokenizer, item[key] if key else item)
        if len(ids) <= max_prompt_len:
            keep.append((item, ids))
        elif long_prompts == "fail":
            fail(
                f"a prompt has {len(ids)} tokens > --max_prompt_len {max_prompt_len} (or pass --long_prompts skip)"
            )
        else:
            long += 1
    if long:
        print(
            f"note: skipped {long} prompts over {max_prompt_len} tokens (--max_prompt_len)",
            file=sys.stderr,
        )
    if not keep:
        fail(f"no prompt fits --max_prompt_len {max_prompt_len} (all {long} are longer); raise it")
    return keep


def encode_examples(
    tokenizer,
    rows,
    max_prompt_len,
    max_response_len,
    long_prompts="skip",
    keys=("chosen", "rejected"),
):
    """Tokenise rows; responses are truncated (never prompts); over-long prompts as fit_prompts says."""
    out, cut = [], 0
    for row, p in fit_prompts(tokenizer, rows, max_prompt_len, long_prompts, key="prompt"):
        ex = {"prompt": p}
        for k in keys:
            ex[k], was_cut = encode_response(tokenizer, row[k], max_response_len)
            cut += was_cut
        out.append(ex)
    if cut:
        print(
            f"note: truncated {cut} responses to {max_response_len} tokens (--max_response_len)",
            file=sys.stderr,
        )
    return out


def collate(prompts, responses, pad_id):
    """Lists of token-id lists -> the batch layout in this module's docstring."""
    prompt_ids, prompt_mask = common.left_pad(prompts, pad_id)  # (B, P)
    R = max(map(len, responses))
    response_ids = torch.tensor(
        [list(r) + [pad_id] * (R - len(r)) for r in responses], dtype=torch.long
    ).view(-1, R)
    response_mask = torch.tensor(
        [[1] * len(r) + [0] * (R - len(r)) for r in responses], dtype=torch.long
    ).view(-1, R)
    return {
        "input_ids": torch.cat([prompt_ids, response_ids], 1),
        "attention_mask": torch.cat([prompt_mask, response_mask], 1),
        "response_mask": response_mask.float(),
        "prompt_len": prompt_ids.shape[1],
    }


def collate_pairs(examples, pad_id):
    """Chosen and rejected stacked into one batch of 2B: rows [0, B) chosen, [B, 2B) rejected."""
    return collate(
        [e["prompt"] for e in examples] * 2,
        [e["chosen"] for e in examples] + [e["rejected"] for e in examples],
        pad_id,
    )


def cat_batches(batches, pad_id):
    """Concatenate batches of the common layout that share P but not R, whatever their keys (a fork's own tensors
    too): each (b, P + R_b) or (b, R_b) tensor is right-padded to the longest R (input_ids with pad_id, the rest
    with 0); any other tensor is concatenated as it is."""
    P = batches[0]["prompt_len"]
    R = max(b["response_mask"].shape[1] for b in batches)
    out = {"prompt_len": P}
    for key in batches[0]:
        if key == "prompt_len":
            continue
        parts = []
        for b in batches:
            width = b["response_mask"].shape[1]  # R_b
            part = b[key]
            if part.dim() == 2 and part.shape[1] in (width, P + width):  # per token: pad to R
                part = F.pad(part, (0, R - width), value=pad_id if key == "input_ids" else 0)
            parts.append(part)
        out[key] = torch.cat(parts)
    return out


def micro_batches(batch, size, order):
    """(indices, slice) of a rollout, `size` sequences at a time in `order`, each cut to its own longest sequence:
    the columns that are padding in every row go from each (b, P + R) and (b, R) tensor, whatever its key."""
    P = batch["prompt_len"]
    R = batch["response_mask"].shape[1]
    for idx in order.split(size):
        micro = {k: v[idx] if torch.is_tensor(v) else v for k, v in batch.items()}
        real = micro["attention_mask"].any(0).nonzero()  # columns with a real token in some row
        first = real.min().item()  # the columns before it were prompt padding in every row
        end = real.max().item() + 1  # and those from here response padding
        for k, v in micro.items():
            if torch.is_tensor(v) and v.dim() == 2 and v.shape[1] == P + R:
                micro[k] = v[:, first:end]
            elif torch.is_tensor(v) and v.dim() == 2 and v.shape[1] == R:
                micro[k] = v[:, : end - P]
        yield idx, {**micro, "prompt_len": P - first}


def iteration_prompts(prompts, order, it, args, process_index, local):
    """Prompts of iteration `it` for process k (its slice of a walk through one shuffle, `order`), and their seeds."""
    # places in the walk
    positions = [it * args.rollout_batch_size + process_index * local + j for j in range(local)]
    chosen = [prompts[order[p % len(prompts)]] for p in positions]  # the walk wraps
    seeds = [args.seed * 2**32 + p for p in positions]
    return chosen, seeds


def decode_responses(tokenizer, batch):
    """Response texts without the final EOS. Other special tokens stay in the text: a policy that learns to
    emit <unk> or a role marker is writing junk, and a judge must be able to see it."""
    P = batch["prompt_len"]
    texts = []
    for ids, m in zip(batch["input_ids"][:, P:], batch["response_mask"], strict=True):
        ids = ids[m.bool()].tolist()
        ids = ids[:-1] if ids and ids[-1] == tokenizer.eos_token_id else ids
        texts.append(tokenizer.decode(ids, skip_special_tokens=False).strip())
    return texts


# ============================================================================ the built-in task
# Its offline tokenizer, and its ground-truth judge of a model (toy_task.oracle_reward over sampled responses).
CHAT_TEMPLATE = (  # for the tiny tokenizers; real chat models bring their own
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIALS = ["<pad>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]


def build_tiny_tokenizer(dataset):
    """Offline tokenizer: the built-in task's words (fast), or bytes (any text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if dataset in TOYS:
        vocab = toy_task.LONG_VOCAB if dataset == TOY_LONG else toy_task.VOCAB
        tok = Tokenizer(
            models.WordLevel({w: i for i, w in enumerate(SPECIALS + vocab)}, unk_token="<unk>")
        )
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    else:
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        tok = Tokenizer(
            models.BPE(
                {c: i for i, c in enumerate(SPECIALS + sorted(alphabet))}, [], unk_token="<unk>"
            )
        )
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=SPECIALS[3:],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@torch.no_grad()
def mean_oracle_reward(
    accelerator, model, tokenizer, prompts, max_new_tokens, batch_size=64, seed=0
):
    """Mean ground-truth reward of sampled responses to built-in-task prompts (messages), prompt k drawn with the
    same seed at every call (common.prompt_seeds). Every process samples the same responses; the training RNG is
    left untouched."""
    model = accelerator.unwrap_model(model)
    ids = [encode_prompt(tokenizer, p) for p in prompts]
    seeds = common.prompt_seeds(seed, "oracle", len(prompts))
    scores = []
    with speed.gathered_weights(model):  # FSDP2: no collective per token
        for i in range(0, len(prompts), batch_size):
            chunk = slice(i, i + batch_size)
            batch = speed.sample(model, tokenizer, ids[chunk], seeds[chunk], max_new_tokens)
            texts = decode_responses(tokenizer, batch)
            scores += [
                toy_task.oracle_reward(p, t) for p, t in zip(prompts[chunk], texts, strict=True)
            ]
    return sum(scores) / len(scores)


def end_of_turn_token(tokenizer):
    """The special token the chat template writes right after an assistant message (ChatML: <|im_end|>), or None."""
    if not tokenizer.chat_template:
        return None
    mark = "RESPONSE_ENDS_HERE"
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": mark}]
    try:
        text = tokenizer.apply_chat_template(turns, tokenize=False)
    # a template may reject this conversation (jinja raise_exception); then it tells us nothing
    except Exception:
        return None
    after = text.split(mark, 1)[1].lstrip() if mark in text else ""
    ids = tokenizer(after, add_special_tokens=False)["input_ids"][:1]
    special = ids and getattr(tokenizer.added_tokens_decoder.get(ids[0]), "special", False)
    return tokenizer.convert_ids_to_tokens(ids[0]) if special else None


def load_tokenizer(name, flag="--model_name_or_path"):
    """A checkpoint's tokenizer (hub id, folder or .gguf file).

    EOS is the token that ends a response: encode_response appends it and sampling stops at it. When the chat
    template ends an assistant turn with another special token (a base model's <|endoftext|> under a ChatML
    template that ends turns with <|im_end|>), that token becomes EOS, so that responses end the way the
    template's turns do and an instruct model stops where it was taught to. Sets pad = EOS when the tokenizer
    has no pad token (masks compensate). The tiny model's tokenizer is data.build_tiny_tokenizer (sft.py)."""
    if name == common.TINY:
        fail(
            f"{flag} {common.TINY}: the small random model is sft.py's starting point only; pass a checkpoint folder"
        )
    common.check_model_path(name, flag)
    path, kwargs = common.from_pretrained_args(name, flag)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs, **common.LOAD_OPTIONS)
    except (OSError, ValueError) as e:
        fail(f"{flag} {name}: cannot load a tokenizer ({str(e).splitlines()[0]})")
    eot = end_of_turn_token(tokenizer)
    if eot and eot != tokenizer.eos_token:
        print(
            f"note: the chat template of {name} ends an assistant turn with {eot!r}, not its EOS "
            f"{tokenizer.eos_token!r}; using {eot!r} as EOS",
            file=sys.stderr,
        )
        tokenizer.eos_token = eot
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        print(
            f"note: tokenizer of {name} has no pad token; using EOS ({tokenizer.eos_token!r}) as pad",
            file=sys.stderr,
        )
    return tokenizer


def same_vocab(path, tokenizer, flag, first):
    """The vocabulary check: fail unless the checkpoint at `path` (given as `flag`) has `tokenizer`'s vocabulary.
    Models of one run pass token ids to each other as they are (a DPO model or a judge reads the policy's ids),
    so they must share one; `first` names where `tokenizer` came from ("--sft_ckpt", "the first model")."""
    if load_tokenizer(path, flag).get_vocab() != tokenizer.get_vocab():
        fail(
            f"{flag} {path}: its tokenizer differs from {first}'s; all models of a run must share one vocabulary"
        )
