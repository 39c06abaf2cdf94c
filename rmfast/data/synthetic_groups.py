"""Learnable synthetic groups: an arithmetic question in multi-turn chat and K answers, the right one and
K-1 wrong ones; an answer ranks lower the further it is from the truth (as rmfast.data.synthetic's pairs,
which are its K = 2 case). Every answer uses the same sentence, so the responses share most of their
tokens with one another and differ in the number: what the group layout and loss are for."""

import random

from .synthetic import _ANSWER, _OPS, generate_pairs

SHAPES = ("scores", "ranking")


def _offsets(rng, k, max_offset):
    """0 (the right answer) and k-1 distinct wrong offsets, distinct in size too (no ties), e.g. [0, -3, 5]."""
    sizes = rng.sample(range(1, max_offset + 1), k - 1)
    return [0] + [s * rng.choice((-1, 1)) for s in sizes]


def generate_groups(n, k=4, seed=0, max_operand=9, ops=("plus",), max_history=3, style="conversational",
                    shape="scores", max_offset=12):
    """n group rows of k answers each. style: 'conversational' (prompt and responses as message lists) or
    'explicit' (strings); shape: 'scores' (score = −|answer − truth|, higher is better) or 'ranking'
    (response indices best first). The prompts are those of generate_pairs(n, seed, ...)."""
    if not 2 <= k <= max_offset + 1:
        raise ValueError(f"k must be between 2 and max_offset + 1 = {max_offset + 1}, got {k}")
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {', '.join(SHAPES)}, got {shape!r}")
    if style not in ("conversational", "explicit"):
        raise ValueError(f"style must be conversational or explicit, got {style!r}")
    unknown = [op for op in ops if op not in _OPS]
    if unknown:
        raise ValueError(f"unknown operations {unknown}; choose from {sorted(_OPS)}")
    rng = random.Random(seed + 1)
    rows = []
    for pair in generate_pairs(n, seed, max_operand, ops, max_history, style):
        question = pair["prompt"][-1]["content"] if style == "conversational" else pair["prompt"]
        a, op, b, c = _parse(question, ops)
        template = rng.choice(_ANSWER)
        offsets = _offsets(rng, k, max_offset)
        rng.shuffle(offsets)
        texts = [template.format(a=a, op=op, b=b, c=c + d) for d in offsets]
        if style == "conversational":
            responses = [[{"role": "assistant", "content": t}] for t in texts]
        else:
            responses = [" " + t for t in texts]
        row = {"prompt": pair["prompt"], "responses": responses}
        if shape == "scores":
            row["scores"] = [0.0 - abs(d) for d in offsets]
        else:
            row["ranking"] = sorted(range(k), key=lambda i: abs(offsets[i]))
        rows.append(row)
    return rows


def _parse(question, ops):
    """(a, op, b, a op b) of the last question in a prompt text: the numbers around the last operation."""
    words = question.replace("?", " ").replace(".", " ").split()
    at = max(i for i, w in enumerate(words) if w in ops and 0 < i < len(words) - 1)
    a, op, b = int(words[at - 1]), words[at], int(words[at + 1])
    return a, op, b, _OPS[op](a, b)
