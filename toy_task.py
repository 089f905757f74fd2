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
"""

import math
import random

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
    credit = word_rewards(topic_of(prompt), words)
    if words and words[-1] == END and words.count(END) == 1:
        credit[-1] += 1.0
    for i in range(MAX_GOOD_WORDS, len(words)):
        credit[i] -= 0.5
    return credit


def oracle_reward(prompt, response):
    """Ground-truth quality of `response` (str) to `prompt` (str or messages)."""
    words = response.split()
    r = sum(word_rewards(topic_of(prompt), words))
    if words and words[-1] == END and words.count(END) == 1:
        r += 1.0
    r -= 0.5 * max(0, len(words) - MAX_GOOD_WORDS)
    return r


def best_response(prompt):
    return " ".join(TOPICS[topic_of(prompt)] + [END])


def best_reward():
    return oracle_reward("tell me about fruit", best_response("tell me about fruit"))


# ----------------------------------------------------------------------------- the data
def make_prompt(rng):
    topic = rng.choice(sorted(TOPICS))
    text = " ".join(w for w in [rng.choice(GREETINGS), rng.choice(ASKS).format(topic), rng.choice(CLOSINGS)] if w)
    return [{"role": "user", "content": text}]


def behaviour_response(prompt, rng):
    """A mediocre demonstrator: a per-response skill level, random length, sometimes no clean ending."""
    topic, skill = topic_of(prompt), rng.uniform(0.1, 0.9)
    words = []
    for _ in range(rng.randint(2, 12)):
        u = rng.random()
        if u < skill:  # on topic: usually a word not said yet, sometimes a repeat
            unused = [w for w in TOPICS[topic] if w not in words]
            words.append(rng.choice(unused if unused and rng.random() < 0.5 else TOPICS[topic]))
        elif u < skill + (1 - skill) * 0.4:
            words.append(rng.choice(FILLER))
        elif u < skill + (1 - skill) * 0.7:
            words.append(rng.choice(TOPICS[rng.choice([t for t in TOPICS if t != topic])]))
        else:
            words.append(rng.choice(JUNK))
    if rng.random() < 0.8:
        words.append(END)
    return " ".join(words)


def _split_prompts(seed, n, split):
    """Prompts whose text hashes to the split: train and test prompts never share a text."""
    rng, out = random.Random(f"{seed}-{split}"), []
    while len(out) < n:
        p = make_prompt(rng)
        if (sum(map(ord, p[0]["content"])) % 5 == 0) == (split == "test"):
            out.append(p)
    return out


def prompts(split="train", n=2000, seed=0):
    return _split_prompts(seed, n, split)


def sft_data(split="train", n=4000, seed=0):
    """Demonstrations: rows of {prompt (messages), response (str)}."""
    rng = random.Random(f"{seed}-sft-{split}")
    return [{"prompt": p, "response": behaviour_response(p, rng)} for p in _split_prompts(seed + 1, n, split)]


def preference_data(split="train", n=4000, seed=0):
    """Pairs {prompt, chosen, rejected}, labelled by a Bradley-Terry draw on the oracle reward."""
    rng, rows = random.Random(f"{seed}-pairs-{split}"), []
    for p in _split_prompts(seed + 2, n, split):
        a, b = behaviour_response(p, rng), behaviour_response(p, rng)
        while b == a:
            b = behaviour_response(p, rng)
        p_a = 1 / (1 + math.exp(-BT_SCALE * (oracle_reward(p, a) - oracle_reward(p, b))))
        chosen, rejected = (a, b) if rng.random() < p_a else (b, a)
        rows.append({"prompt": p, "chosen": chosen, "rejected": rejected})
    return rows


def task_stats(seed=0):
    """The task's numbers, as the README quotes them."""
    demos, pairs = sft_data("train", seed=seed), preference_data("train", seed=seed)
    demo_r = [oracle_reward(d["prompt"], d["response"]) for d in demos]
    agree = [oracle_reward(r["prompt"], r["chosen"]) > oracle_reward(r["prompt"], r["rejected"]) for r in pairs]
    ties = [oracle_reward(r["prompt"], r["chosen"]) == oracle_reward(r["prompt"], r["rejected"]) for r in pairs]
    return {
        "vocab_words": len(VOCAB),
        "sft_train": len(demos), "pairs_train": len(pairs),
        "prompts_train": len(prompts("train", seed=seed)), "prompts_test": len(prompts("test", seed=seed)),
        "demo_oracle_mean": sum(demo_r) / len(demo_r),
        "best_oracle": best_reward(),
        "label_agreement": sum(agree) / (len(pairs) - sum(ties)),
        "tied_pairs": sum(ties),
    }


if __name__ == "__main__":
    for k, v in task_stats().items():
        print(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}")
