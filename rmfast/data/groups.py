"""Group rows: a prompt with K ≥ 2 responses and what says which is better, detected, mapped and validated.

Row shapes (column names mapped through ``columns`` as for pairs; ``"a[].b"`` reads ``b`` from each element
of the list ``a``):

- scored:          ``{"prompt", "responses": [...], "scores": [...]}``, higher is better;
- ranked:          ``{"prompt", "responses": [...], "ranking": [...]}``: the response indices best first,
                   so ``ranking[0]`` is the index of the best response (a permutation of 0..K-1);
- conversational:  the prompt and each response as lists of {role, content} messages (rendered with the
                   tokenizer's chat template, as for pairs); without a prompt, each response is a whole
                   conversation;
- UltraFeedback:   ``{"instruction", "completions": [{"response", "overall_score"}, ...]}`` through
                   ``columns=ULTRAFEEDBACK``;
- RewardBench 2:   ``{"prompt", "chosen": [...], "rejected": [...], "subset"}``: every chosen beats every
                   rejected; chosen among themselves, and rejected among themselves, are unordered;
- a pair row (any shape rmfast.data.formats reads): the group of 2, chosen over rejected its ``margin``
  column carried (the loss adds it to the comparison's margin: rmfast.objective).

Every shape becomes one score per response (a ranking: K-1 for the best down to 0; RewardBench 2: 1 for
chosen, 0 for rejected); equal scores give no comparison but a tie (a group of nothing but ties is kept: the
davidson objective trains on its ties). A bad row raises BadRow with a reason code."""

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .formats import BadRow, Text, _field, _messages, parse_row, read_weight

ULTRAFEEDBACK = {"prompt": "instruction", "responses": "completions[].response",
                 "scores": "completions[].overall_score"}
GROUP_COLUMNS = ("prompt", "responses", "response", "scores", "ranking", "chosen", "rejected", "subset", "weight")


@dataclass
class Group:
    """One validated group, before tokenization. responses: K texts (or message lists); scores: K floats,
    higher is better (None: rows read for scoring that say nothing about the order); tag: the row's
    `subset` (where it came from within its dataset, as in RewardBench), or None."""

    location: str
    format: str  # "explicit" | "implicit" (no prompt: full texts) | "conversational"
    prompt: Optional[Text]
    responses: list
    scores: list
    tag: Optional[str] = None
    margin: Optional[float] = None  # a pair row's margin column
    weight: Optional[float] = None  # the row's loss weight column (None: 1)
    attributes: Optional[list] = None  # [K][A] floats, NaN where the row has no value (data.attributes)


def read_attributes(row, names, columns, K):
    """[K][A] floats of the attribute columns `names` (each mapped through `columns`, "a[].b" read per
    element): a number per response — a list of K numbers, or one number for a row of one response. A
    missing value (absent, null, an empty CSV cell, NaN) is NaN: masked in the loss, counted, never 0."""
    out = [[math.nan] * len(names) for _ in range(K)]
    for a, name in enumerate(names):
        spec = (columns or {}).get(name, name)
        head, sep, tail = spec.partition("[].")
        if sep and isinstance(row.get(head), list):  # per element: an element without the field has no value
            value = [item.get(tail) if isinstance(item, dict) else None for item in row[head]]
        else:
            value = read_column(row, name, spec, required=False)
        if value is None:
            continue
        values = value if isinstance(value, list) else [value] if K == 1 else None
        if values is None or len(values) != K:
            got = f"{len(values)} values" if isinstance(values, list) else repr(value)
            raise BadRow("bad_attribute", f"{spec!r} must give {K} number{'s' if K > 1 else ''}, one per "
                                          f"response; got {got}")
        for k, v in enumerate(values):
            if v is None or (isinstance(v, str) and not v.strip()):
                continue
            try:
                x = float(v) if not isinstance(v, bool) else None
            except (TypeError, ValueError):
                x = None
            if x is None or math.isinf(x):
                raise BadRow("bad_attribute", f"{spec!r}{f'[{k}]' if K > 1 else ''} is {v!r}, not a number")
            out[k][a] = x
    return out


def comparisons(scores):
    """The comparisons of a group: ([C, 2] int64 (better, worse) response indices, [C] float32 score
    differences (> 0), number of tied response pairs, which give none). Order: i < j, row-major."""
    s = np.asarray(scores, dtype=np.float64)
    i, j = np.triu_indices(len(s), k=1)
    diff = s[i] - s[j]
    keep = diff != 0
    better = np.where(diff > 0, i, j)[keep]
    worse = np.where(diff > 0, j, i)[keep]
    return (np.stack([better, worse], axis=1).astype(np.int64), np.abs(diff[keep]).astype(np.float32),
            int((~keep).sum()))


def tied_pairs(scores):
    """[T, 2] int64 response indices (i < j) of a group's tied pairs: equal scores, no strict comparison."""
    s = np.asarray(scores, dtype=np.float64)
    i, j = np.triu_indices(len(s), k=1)
    keep = s[i] == s[j]
    return np.stack([i[keep], j[keep]], axis=1).astype(np.int64)


def read_column(row, name, spec, required=True):
    """The value of the `name` column (prompt, responses, ...) of a row, read from ``spec``: "a", or
    "a[].b" for field b of every element of list a."""
    head, sep, tail = spec.partition("[].")
    value = _field(row, name, head, required)
    if not sep or value is None:
        return value
    if not isinstance(value, list):
        raise BadRow("missing_field", f"{head!r} must be a list of objects with {tail!r} (the {name} column)")
    out = []
    for k, item in enumerate(value):
        if not isinstance(item, dict) or tail not in item:
            raise BadRow("missing_field", f"{head!r}[{k}] has no {tail!r} (the {name} column)")
        out.append(item[tail])
    return out


def _check_scores(values, K, column):
    if not isinstance(values, list) or len(values) != K:
        n = len(values) if isinstance(values, list) else type(values).__name__
        raise BadRow("bad_scores", f"{column!r} must list {K} numbers, one per response; got {n}")
    out = []
    for k, v in enumerate(values):
        try:
            x = float(v) if not isinstance(v, bool) else math.nan
        except (TypeError, ValueError):
            x = math.nan
        if not math.isfinite(x):
            raise BadRow("bad_scores", f"{column!r}[{k}] is {v!r}, not a finite number")
        out.append(x)
    return out


def _ranking_scores(ranking, K, column):
    """Scores from a ranking (response indices best first): K-1 for the best, down to 0 for the worst."""
    ok = isinstance(ranking, list) and all(isinstance(r, int) and not isinstance(r, bool) for r in ranking)
    if not ok or sorted(ranking) != list(range(K)):
        raise BadRow("bad_ranking", f"{column!r} is {ranking!r}; it must list the response indices 0..{K - 1} "
                                    f"once each, best first")
    scores = [0.0] * K
    for place, r in enumerate(ranking):
        scores[r] = float(K - 1 - place)
    return scores


def _responses(values, column, least=2):
    """K texts or K message lists, validated; the format they make."""
    if not isinstance(values, list) or len(values) < least:
        n = len(values) if isinstance(values, list) else type(values).__name__
        raise BadRow("few_responses", f"{column!r} holds {n}; a group needs at least {least} response"
                                      f"{'s' if least > 1 else ''}")
    if all(isinstance(v, list) for v in values):
        out = [_messages(v, f"{column}[{k}]") for k, v in enumerate(values)]
        for k, v in enumerate(out):
            if not any(m["content"].strip() for m in v):
                raise BadRow("empty_response", f"{column!r}[{k}] has no non-empty message")
        return out, "conversational"
    for k, v in enumerate(values):
        if not isinstance(v, str):
            raise BadRow("not_text", f"{column!r}[{k}] is {type(v).__name__}, not a string")
        if not v.strip():
            raise BadRow("empty_response", f"{column!r}[{k}] is empty")
    return list(values), "explicit"


def _prompt(value, fmt, column):
    if value is None:
        return None, ("conversational" if fmt == "conversational" else "implicit")
    if fmt == "conversational":
        return _messages(value, column), fmt
    if not isinstance(value, str):
        raise BadRow("not_text", f"{column!r} is {type(value).__name__}, not a string")
    return value, fmt


def _finish(location, fmt, prompt, responses, scores, tag=None, preference=True):
    # a group whose responses all score the same is data: ties (the davidson objective trains on them; the
    # others set such a group aside, counted)
    return Group(location, fmt, prompt, responses, scores, tag)


def _scored(location, row, col, preference=True):
    responses, fmt = _responses(read_column(row, "responses", col["responses"]), col["responses"],
                                2 if preference else 1)
    prompt, fmt = _prompt(read_column(row, "prompt", col["prompt"], required=False), fmt, col["prompt"])
    scores = read_column(row, "scores", col["scores"], required=False)
    ranking = read_column(row, "ranking", col["ranking"], required=False)
    if scores is not None and ranking is not None:
        raise BadRow("ambiguous_preference", f"give {col['scores']!r} or {col['ranking']!r}, not both")
    if scores is None and ranking is None:
        if not preference:
            return Group(location, fmt, prompt, responses, None, _tag(row, col))
        read_column(row, "scores", col["scores"])  # raises missing_field, naming the columns to map
    K = len(responses)
    scores = (_check_scores(scores, K, col["scores"]) if scores is not None
              else _ranking_scores(ranking, K, col["ranking"]))
    return _finish(location, fmt, prompt, responses, scores, _tag(row, col), preference)


def _chosen_rejected_lists(location, row, col):
    """RewardBench 2: every chosen beats every rejected (scores 1 and 0; ties within each side)."""
    chosen, rejected = row[col["chosen"]], row[col["rejected"]]
    if not isinstance(rejected, list):
        raise BadRow("bad_messages", f"{col['rejected']!r} must be a list of responses like {col['chosen']!r}")
    responses, fmt = _responses(chosen + rejected, f"{col['chosen']}+{col['rejected']}")
    prompt, fmt = _prompt(read_column(row, "prompt", col["prompt"], required=False), fmt, col["prompt"])
    scores = [1.0] * len(chosen) + [0.0] * len(rejected)
    return _finish(location, fmt, prompt, responses, scores, _tag(row, col))


def _tag(row, col):
    """The row's `subset` (the mapped column), as a string, or None."""
    tag = row.get(col["subset"])
    return None if tag is None else str(tag)


def row_kind(row, columns=None):
    """What a row (a dict) holds: 'groups' (K responses, one `response`, UltraFeedback's completions, or
    RewardBench 2's lists of chosen / rejected), 'pairs' (a chosen and a rejected) or None (neither: a single text)."""
    col = lambda name: (columns or {}).get(name, name).partition("[].")[0]  # noqa: E731
    chosen = row.get(col("chosen"))
    one = col("response") in row and col("chosen") not in row  # a single response (HelpSteer2's rows)
    if (one or col("responses") in row or ULTRAFEEDBACK["responses"].partition("[].")[0] in row
            or (isinstance(chosen, list) and bool(chosen) and not isinstance(chosen[0], dict))):
        return "groups"
    return "pairs" if col("chosen") in row or col("rejected") in row else None


def source_kind(path, split="train", columns=None):
    """row_kind of the first readable row of a source (None when it has none)."""
    from .sources import iter_rows

    for raw in iter_rows(path, split):
        if not raw.reason and isinstance(raw.data, dict):
            return row_kind(raw.data, columns)
    return None


def parse_group_row(location, row, fmt="auto", columns=None, preference=True, attributes=()) -> Group:
    """Validate one row of any shape above and return its Group; raises BadRow with the reason. ``fmt``
    applies to pair rows (rmfast.data.formats.FORMATS). preference=False (scoring, attribute data): a row of
    responses without scores or ranking is taken (its Group's scores are None), and so is a single response
    (``responses`` of one, or a ``response`` column: HelpSteer2's rows). attributes: the attribute columns
    read into Group.attributes (read_attributes)."""
    group = _parse_group_row(location, row, fmt, columns or {}, preference)
    if attributes:
        group.attributes = read_attributes(row, list(attributes), columns, len(group.responses))
    return group


def _parse_group_row(location, row, fmt, columns, preference):
    col = {k: columns.get(k, k) for k in GROUP_COLUMNS}
    if not preference and col["response"] in row and col["responses"].partition("[].")[0] not in row:
        row = {**row, col["responses"]: [row[col["response"]]]}  # one response: a group of one
        col["responses"] = col["responses"].partition("[].")[0]
    if col["responses"].partition("[].")[0] in row:
        group = _scored(location, row, col, preference)
    elif isinstance(row.get(col["chosen"]), list) and row[col["chosen"]] \
            and not isinstance(row[col["chosen"]][0], dict):  # a list of responses
        group = _chosen_rejected_lists(location, row, col)
    else:
        if col["chosen"] not in row and ("responses" in columns or "chosen" not in columns):
            read_column(row, "responses", col["responses"])  # neither shape: name the group columns
        pair = parse_row(location, row, fmt, columns)
        return Group(location, pair.format, pair.prompt, [pair.chosen, pair.rejected],
                     [1.0, 1.0] if pair.tie else [1.0, 0.0], _tag(row, col), pair.margin, pair.weight)
    group.weight = read_weight(row, col["weight"])
    return group
