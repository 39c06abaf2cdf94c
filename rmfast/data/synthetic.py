"""Learnable synthetic preference data: arithmetic questions in multi-turn chat, where the chosen answer
is right and the rejected one is wrong, so which side is better can be decided from the text alone.

Prompts carry 0–3 earlier turns and sometimes a chatty preamble, so prompt and response lengths spread
the way real chat data does (long shared prompt, short answers)."""

import json
import random
from pathlib import Path

_OPENERS = [
    "Hi there!", "Hello.", "Good morning!", "Hey, quick question.", "I hope you can help me.",
    "I'm doing my homework and I'm stuck.", "My daughter asked me this and I wasn't sure.",
]
_FILLER = [
    "I've been practising mental arithmetic every day this week.",
    "My teacher says I should always check my work twice.",
    "Sometimes I mix up the numbers when I'm tired.",
    "I'm preparing for a quiz tomorrow morning.",
    "Numbers were never my strongest subject, to be honest.",
    "I like to write each step down so I can see it.",
]
_SMALL_TALK = [
    ("How are you today?", "I'm doing well, thank you for asking! How can I help?"),
    ("Can you help me with some maths?", "Of course, I'd be glad to help with maths."),
    ("Do you like numbers?", "I do! Numbers make a lot of problems easier to think about."),
    ("Are you good at sums?", "I'm happy to work through sums with you step by step."),
]
_ASK = ["What is {a} {op} {b}?", "Could you tell me what {a} {op} {b} is?", "Please compute {a} {op} {b}.",
        "How much is {a} {op} {b}?", "What do you get for {a} {op} {b}?"]
_ANSWER = ["{a} {op} {b} = {c}.", "The answer is {c}, because {a} {op} {b} = {c}.",
           "{a} {op} {b} is {c}.", "Let me work it out: {a} {op} {b} = {c}."]
_OPS = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b}


def _question(rng, max_operand, ops):
    op = rng.choice(ops)
    a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
    return a, op, b, _OPS[op](a, b)


_OFFSETS = {"hard": [-3, -2, -1, 1, 2, 3], "easy": [7, 8, 9, 10, 11, 12]}


def _wrong(rng, c, difficulty):
    return c + rng.choice(_OFFSETS[difficulty])


def generate_pairs(n, seed=0, max_operand=9, ops=("plus",), max_history=3, style="conversational",
                   difficulty="hard", ties=0.0):
    """n preference rows. style: 'conversational' ({prompt, chosen, rejected} as message lists),
    'explicit' (prompt/chosen/rejected strings) or 'implicit' (chosen/rejected full texts, HH-RLHF style).
    difficulty: 'hard' makes the wrong answer off by 1–3 (telling them apart takes arithmetic); 'easy' off
    by 7–12, so a tiny model learns the preference in a minute. Each row also has 'margin': how far the
    wrong answer is from the right one. ties: the share of rows that are ties instead: two right answers in
    different words, marked "tie": true (no margin)."""
    if difficulty not in _OFFSETS:
        raise ValueError(f"difficulty must be one of {', '.join(_OFFSETS)}, got {difficulty!r}")
    if style not in ("conversational", "explicit", "implicit"):
        raise ValueError(f"style must be conversational, explicit or implicit, got {style!r}")
    ops = list(ops)
    unknown = [op for op in ops if op not in _OPS]
    if unknown:
        raise ValueError(f"unknown operations {unknown}; choose from {sorted(_OPS)}")
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        messages = []
        for _ in range(rng.randint(0, max_history)):
            if rng.random() < 0.4:
                q, a = rng.choice(_SMALL_TALK)
            else:
                x, op, y, c = _question(rng, max_operand, ops)
                q = rng.choice(_ASK).format(a=x, op=op, b=y)
                a = rng.choice(_ANSWER).format(a=x, op=op, b=y, c=c)
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        x, op, y, c = _question(rng, max_operand, ops)
        ask = rng.choice(_ASK).format(a=x, op=op, b=y)
        if rng.random() < 0.5:
            chatter = [rng.choice(_OPENERS)] + rng.sample(_FILLER, rng.randint(0, 3))
            ask = " ".join(chatter + [ask])
        messages.append({"role": "user", "content": ask})
        template = rng.choice(_ANSWER)
        wrong = _wrong(rng, c, difficulty)
        good = template.format(a=x, op=op, b=y, c=c)
        bad = template.format(a=x, op=op, b=y, c=wrong)
        margin = float(abs(wrong - c))
        extra = {"margin": margin}
        if ties and rng.random() < ties:  # a tie: the right answer in another template
            other = rng.choice([t for t in _ANSWER if t != template])
            bad, extra = other.format(a=x, op=op, b=y, c=c), {"tie": True}
        if style == "conversational":
            rows.append({"prompt": messages, "chosen": [{"role": "assistant", "content": good}],
                         "rejected": [{"role": "assistant", "content": bad}], **extra})
            continue
        text = "".join(f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in messages)
        text += "\n\nAssistant:"
        if style == "explicit":
            rows.append({"prompt": text, "chosen": " " + good, "rejected": " " + bad, **extra})
        else:
            rows.append({"chosen": text + " " + good, "rejected": text + " " + bad, **extra})
    return rows


_EXTRA = ["I double-checked it.", "Addition is commutative, so the order does not matter.",
          "You can verify this by counting on your fingers.", "Let me know if you want another example.",
          "Practice makes this easier over time.", "This is a common homework question."]
ATTRIBUTES = ("helpfulness", "correctness", "verbosity")


def generate_attribute_rows(n, seed=0, responses=1, missing=0.0, max_operand=9):
    """n HelpSteer2-shaped rows whose attributes (0–4, as HelpSteer2 rates them) follow from the text:
    a prompt asking a sum and `responses` answers, each right or wrong (off by 7–12) with 0–4 extra sentences.
    correctness: 4 right, 0 wrong; verbosity: the extra sentences; helpfulness: correctness less one when
    verbosity is 3 or more (at least 0). responses=1: {"prompt", "response", <attributes>} rows; more: {"prompt",
    "responses", <attribute lists>, "scores": helpfulness}. missing: the share of values left null."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        x, op, y, c = _question(rng, max_operand, ["plus"])
        prompt = f"\n\nHuman: {rng.choice(_ASK).format(a=x, op=op, b=y)}\n\nAssistant:"
        texts, values = [], {a: [] for a in ATTRIBUTES}
        for _ in range(responses):
            right = rng.random() < 0.5
            extra = rng.randint(0, 4)
            answer = rng.choice(_ANSWER).format(a=x, op=op, b=y, c=c if right else _wrong(rng, c, "easy"))
            texts.append(" " + " ".join([answer] + rng.sample(_EXTRA, extra)))
            correctness = 4 if right else 0
            values["correctness"].append(correctness)
            values["verbosity"].append(extra)
            values["helpfulness"].append(max(0, correctness - (1 if extra >= 3 else 0)))
        scores = list(values["helpfulness"])  # the preference: the helpfulness, whether shown or not
        for a in ATTRIBUTES:
            values[a] = [None if rng.random() < missing else v for v in values[a]]
        if responses == 1:
            rows.append({"prompt": prompt, "response": texts[0], **{a: v[0] for a, v in values.items()}})
        else:
            rows.append({"prompt": prompt, "responses": texts, **values, "scores": scores})
    return rows


def write_jsonl(rows, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
