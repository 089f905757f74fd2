"""The built-in offline task: "tell me about <topic>", with a ground-truth judge.

Every stage runs on it with no hub access, and every claim about learning can be checked against
`oracle_reward`, which plays the part of a human's true preference.

The judge is built like real helpfulness: a response's quality is mostly a sum of local, token-level
contributions plus a few global terms, so the exact credit of every token is known (`token_credit`).

    per word:   new on-topic word +1.0   repeated on-topic word -1.0   word of another topic -0.5
                filler word (the, and, ...) -0.1   junk word or anything unknown -1.0
    global:     ends cleanly with a single final "." +1.0
                every word past MAX_GOOD_WORDS -0.5

The best response names all 8 words of the topic and then "." : reward 9.0 (`best_reward()`).

Demonstrations and preference pairs come from a *mediocre* behaviour policy (each response has its own
skill level, so good and poor responses are mixed), which leaves clear headroom above SFT. Preference
labels are sampled from a Bradley-Terry model on the oracle reward, so they are noisy like human labels.
Everything is a deterministic function of the seed.

The long variant (`--dataset toy-long`, `task="toy-long"`) asks about four topics in order ("tell me about fruit
then tools then space then music") and wants four sections separated by ";". Each word's credit depends on the
section it falls in, with the same per-word values, 16 words per topic, and a budget per section:

    per word:   the same values, judged against the topic of the word's section (section j = words after j ";")
                any word after the 4th section -1.0      a ";" beyond the 3rd -1.0 (the first three: 0)
                every word of a section past SECTION_WORDS (";" not counted) -0.5
    global:     ends cleanly (a single final ".", exactly three ";") +1.0

Its best response is 4 x 16 words, 3 ";" and "." : 68 tokens, reward 65.0. The judge tells the tasks apart by the
prompt (a long prompt has "then" in it), so oracle_reward and token_credit serve both. The design was fixed, and
committed, before any RL result on it was seen.
"""

import math
import random

from common import TOYS  # the --dataset names of the built-in tasks: "toy" and "toy-long"

TOPICS = {
    "fruit": ["apple", "pear", "plum", "grape", "mango", "lemon", "peach", "cherry"],
    "animals": ["cat", "dog", "horse", "sheep", "goat", "mouse", "tiger", "whale"],
    "weather": ["rain", "snow", "wind", "sun", "cloud", "storm", "fog", "frost"],
    "colors": ["red", "blue", "green", "yellow", "purple", "orange", "white", "black"],
    "music": ["drum", "piano", "violin", "flute", "guitar", "harp", "song", "choir"],
    "sports": ["tennis", "golf", "soccer", "rugby", "hockey", "boxing", "rowing", "cycling"],
    "tools": ["hammer", "saw", "drill", "wrench", "chisel", "pliers", "ladder", "shovel"],
    "space": ["star", "moon", "planet", "comet", "orbit", "galaxy", "rocket", "nebula"],
}
FILLER = ["the", "a", "and", "is", "very", "also", "so", "of", "i", "like"]
JUNK = ["asdf", "qwer", "zxcv", "uiop", "hjkl", "bnm"]
END = "."
GREETINGS = ["", "hi", "hello", "hey", "please"]
ASKS = ["tell me about {}", "what do you know about {}", "list some {}", "describe {}"]
CLOSINGS = ["", "thanks", "now", "briefly"]

RL_PROMPTS = 2000  # prompts per split (train, test): rto.py rolls out the train ones
MAX_GOOD_WORDS = 10
BT_SCALE = 1.0  # labels: P(a preferred to b) = sigmoid(BT_SCALE * (r(a) - r(b)))

WORD_TOPIC = {w: t for t, ws in TOPICS.items() for w in ws}
PROMPT_WORDS = sorted({w for s in GREETINGS + ASKS + CLOSINGS for w in s.replace("{}", "").split()})
VOCAB = sorted(set(WORD_TOPIC) | set(FILLER) | set(JUNK) | {END} | set(PROMPT_WORDS) | set(TOPICS))


# ----------------------------------------------------------------------------- the judge
def topic_of(prompt):
    """The topic a prompt asks about: the last topic name in it (prompt: str or list of messages)."""
    if isinstance(prompt, list):
        prompt = " ".join(m["content"] for m in prompt)
    names = [w for w in prompt.split() if w in TOPICS]
    if not names:
        raise ValueError(f"prompt names no topic of the built-in task: {prompt!r}")
    return names[-1]


def word_rewards(topic, words):
    """The local part of the oracle: one number per word."""
    out, seen = [], set()
    for i, w in enumerate(words):
        if w in TOPICS[topic]:
            out.append(-1.0 if w in seen else 1.0)
        elif w in WORD_TOPIC:
            out.append(-0.5)
        elif w in FILLER:
            out.append(-0.1)
        elif w == END and i == len(words) - 1:
            out.append(0.0)  # the final "." is scored by the global term
        else:
            out.append(-1.0)  # junk, unknown text, or a "." in the middle
        seen.add(w)
    return out


def token_credit(prompt, words):
    """The oracle's credit for each word: word_rewards, plus the clean-ending bonus on the final ".", plus the
    length penalty on each word past MAX_GOOD_WORDS. Sums to oracle_reward (the exact per-token credit that a
    dense reward would ideally give; scripts/reward_signal.py and scripts/oracle_credit.py use it)."""
    if is_long(prompt):
        return long_credit(topics_of(prompt), words)
    credit = word_rewards(topic_of(prompt), words)
    if words and words[-1] == END and words.count(END) == 1:
        credit[-1] += 1.0
    for i in range(MAX_GOOD_WORDS, len(words)):
        credit[i] -= 0.5
    return credit


def oracle_reward(prompt, response):
    """Ground-truth quality of `response` (str) to `prompt` (str or messages)."""
    words = response.split()
    if is_long(prompt):
        return sum(long_credit(topics_of(prompt), words))
    r = sum(word_rewards(topic_of(prompt), words))
    if words and words[-1] == END and words.count(END) == 1:
        r += 1.0
    r -= 0.5 * max(0, len(words) - MAX_GOOD_WORDS)
    return r


def best_response(prompt):
    if is_long(prompt):
        return f" {SEP} ".join(" ".join(LONG_TOPICS[t]) for t in topics_of(prompt)) + f" {END}"
    return " ".join(TOPICS[topic_of(prompt)] + [END])


def best_reward(task="toy"):
    p = make_prompt(random.Random(0), task)
    return oracle_reward(p, best_response(p))


# ----------------------------------------------------------------------------- the long task's judge
EXTRA = {  # 8 more words per topic for the long task (the short task's vocabulary is unchanged)
    "fruit": ["lime", "melon", "kiwi", "fig", "date", "berry", "olive", "banana"],
    "animals": ["lion", "bear", "wolf", "fox", "deer", "rabbit", "camel", "zebra"],
    "weather": ["hail", "mist", "thunder", "breeze", "drizzle", "sleet", "heat", "ice"],
    "colors": ["pink", "brown", "gray", "silver", "gold", "violet", "cyan", "beige"],
    "music": ["cello", "trumpet", "banjo", "organ", "melody", "rhythm", "opera", "tuba"],
    "sports": ["skiing", "surfing", "karate", "judo", "fencing", "archery", "sailing", "polo"],
    "tools": ["rake", "axe", "clamp", "file", "level", "trowel", "spade", "mallet"],
    "space": ["meteor", "asteroid", "cosmos", "satellite", "eclipse", "quasar", "pulsar", "crater"],
}
LONG_TOPICS = {t: TOPICS[t] + EXTRA[t] for t in TOPICS}  # 16 words each
LONG_WORD_TOPIC = {w: t for t, ws in LONG_TOPICS.items() for w in ws}
SECTIONS, SEP, THEN = 4, ";", "then"
SECTION_WORDS = (
    18  # 16 words (and the final ".") fit, as MAX_GOOD_WORDS leaves room on the short task
)
LONG_VOCAB = sorted(set(VOCAB) | set(LONG_WORD_TOPIC) | {SEP, THEN})


def is_long(prompt):
    return THEN in _text(prompt).split()


def topics_of(prompt):
    """The topics a long prompt asks about, in order."""
    return [w for w in _text(prompt).split() if w in TOPICS]


def _text(prompt):
    return " ".join(m["content"] for m in prompt) if isinstance(prompt, list) else prompt


def long_credit(topics, words):
    """The long task's oracle, one number per word; sums to oracle_reward."""
    credit, seen, section, in_section = [], set(), 0, 0
    for i, w in enumerate(words):
        if w == SEP:
            credit.append(0.0 if section < len(topics) - 1 else -1.0)
            section, in_section = section + 1, 0
            continue
        if section >= len(topics):
            c = -1.0  # past the last section
        elif w in LONG_TOPICS[topics[section]]:
            c = -1.0 if w in seen else 1.0
        elif w in LONG_WORD_TOPIC:
            c = -0.5  # another topic's word, asked elsewhere or not at all
        elif w in FILLER:
            c = -0.1
        elif w == END and i == len(words) - 1:
            c = 0.0  # scored by the global term
        else:
            c = -1.0
        in_section += 1
        credit.append(c - 0.5 * (in_section > SECTION_WORDS))
        seen.add(w)
    if words and words[-1] == END and words.count(END) == 1 and words.count(SEP) == len(topics) - 1:
        credit[-1] += 1.0
    return credit


# ----------------------------------------------------------------------------- the data
def make_prompt(rng, task="toy"):
    topic = (
        rng.choice(sorted(TOPICS))
        if task == "toy"
        else f" {THEN} ".join(rng.sample(sorted(TOPICS), SECTIONS))
    )
    text = " ".join(
        w
        for w in [rng.choice(GREETINGS), rng.choice(ASKS).format(topic), rng.choice(CLOSINGS)]
        if w
    )
    return [{"role": "user", "content": text}]


def behaviour_response(prompt, rng):
    """A mediocre demonstrator: a per-response skill level, random length, sometimes no clean ending. On a long
    prompt: one such section per topic, separated by ";", and one time in five it stops after fewer sections."""
    skill, words = rng.uniform(0.1, 0.9), []
    if not is_long(prompt):
        _section(words, TOPICS, topic_of(prompt), skill, rng.randint(2, 12), rng)
    else:
        topics = topics_of(prompt)
        for j in range(len(topics) if rng.random() < 0.8 else rng.randint(1, len(topics) - 1)):
            words += [SEP] if j else []
            _section(words, LONG_TOPICS, topics[j], skill, rng.randint(3, 20), rng)
    if rng.random() < 0.8:
        words.append(END)
    return " ".join(words)


def _section(words, topics, topic, skill, n, rng):
    """Appends n words about `topic` to `words`, on topic with probability `skill`."""
    for _ in range(n):
        u = rng.random()
        if u < skill:  # on topic: usually a word not said yet, sometimes a repeat
            unused = [w for w in topics[topic] if w not in words]
            words.append(rng.choice(unused if unused and rng.random() < 0.5 else topics[topic]))
        elif u < skill + (1 - skill) * 0.4:
            words.append(rng.choice(FILLER))
        elif u < skill + (1 - skill) * 0.7:
            words.append(rng.choice(topics[rng.choice([t for t in topics if t != topic])]))
        else:
            words.append(rng.choice(JUNK))


def _split_prompts(seed, n, split, task):
    """Prompts whose text hashes to the split: train and test prompts never share a text."""
    if task not in TOYS:
        raise ValueError(f"unknown built-in task {task!r}: expected one of {TOYS}")
    rng, out = random.Random(f"{seed}-{split}" if task == "toy" else f"{task}-{seed}-{split}"), []
    while len(out) < n:
        p = make_prompt(rng, task)
        if (sum(map(ord, p[0]["content"])) % 5 == 0) == (split == "test"):
            out.append(p)
    return out


def prompts(split="train", n=RL_PROMPTS, seed=0, task="toy"):
    return _split_prompts(seed, n, split, task)


def sft_data(split="train", n=4000, seed=0, task="toy"):
    """Demonstrations: rows of {prompt (messages), response (str)}."""
    rng = random.Random(f"{seed}-sft-{split}" if task == "toy" else f"{task}-{seed}-sft-{split}")
    return [
        {"prompt": p, "response": behaviour_response(p, rng)}
        for p in _split_prompts(seed + 1, n, split, task)
    ]


def preference_data(split="train", n=4000, seed=0, task="toy"):
    """Pairs {prompt, chosen, rejected}, labelled by a Bradley-Terry draw on the oracle reward."""
    rng, rows = (
        random.Random(f"{seed}-pairs-{split}" if task == "toy" else f"{task}-{seed}-pairs-{split}"),
        [],
    )
    for p in _split_prompts(seed + 2, n, split, task):
        a, b = behaviour_response(p, rng), behaviour_response(p, rng)
        while b == a:
            b = behaviour_response(p, rng)
        p_a = 1 / (1 + math.exp(-BT_SCALE * (oracle_reward(p, a) - oracle_reward(p, b))))
        chosen, rejected = (a, b) if rng.random() < p_a else (b, a)
        rows.append({"prompt": p, "chosen": chosen, "rejected": rejected})
    return rows


def task_stats(seed=0, task="toy"):
    """The task's numbers, as docs/tasks.md quotes them."""
    demos, pairs = (
        sft_data("train", seed=seed, task=task),
        preference_data("train", seed=seed, task=task),
    )
    demo_r = [oracle_reward(d["prompt"], d["response"]) for d in demos]
    agree = [
        oracle_reward(r["prompt"], r["chosen"]) > oracle_reward(r["prompt"], r["rejected"])
        for r in pairs
    ]
    ties = [
        oracle_reward(r["prompt"], r["chosen"]) == oracle_reward(r["prompt"], r["rejected"])
        for r in pairs
    ]
    return {
        "vocab_words": len(VOCAB if task == "toy" else LONG_VOCAB),
        "sft_train": len(demos),
        "pairs_train": len(pairs),
        "prompts_train": len(prompts("train", seed=seed, task=task)),
        "prompts_test": len(prompts("test", seed=seed, task=task)),
        "demo_oracle_mean": sum(demo_r) / len(demo_r),
        "demo_tokens_mean": sum(len(d["response"].split()) for d in demos) / len(demos),
        "best_oracle": best_reward(task),
        "best_tokens": len(best_response(demos[0]["prompt"]).split()),
        "label_agreement": sum(agree) / (len(pairs) - sum(ties)),
        "tied_pairs": sum(ties),
    }


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="The built-in task's numbers (seed 0).")
    parser.add_argument("task", nargs="?", default="toy", choices=TOYS)
    for k, v in task_stats(task=parser.parse_args().task).items():
        print(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}")
