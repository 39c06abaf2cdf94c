"""Row formats of preference data, detected or named, with column mapping and validation.

- explicit:        ``prompt``, ``chosen``, ``rejected`` strings (the responses continue the prompt);
- implicit:        ``chosen``, ``rejected`` full texts (HH-RLHF);
- conversational:  ``chosen`` / ``rejected`` (and optional ``prompt``) as lists of {role, content} messages.
Any of them may carry a per-pair ``margin``, a loss ``weight`` (≥ 0, default 1) and a ``tie`` flag (the two
responses are equally good: kept for the davidson objective, set aside by the others). A row that breaks a
rule is reported with a reason code."""

import math
from dataclasses import dataclass
from typing import Optional, Union

FORMATS = ("auto", "explicit", "implicit", "conversational")
ROLES = ("system", "user", "assistant", "tool")

# reason code → what a person reads in the report
REASONS = {
    "malformed_json": "malformed JSON",
    "malformed_csv": "malformed CSV",
    "not_object": "row is not an object",
    "undecodable": "undecodable bytes (not UTF-8)",
    "truncated": "the file breaks off (a cut or corrupt .gz?)",
    "empty_file": "empty file",
    "missing_field": "missing field",
    "null_field": "null field",
    "not_text": "text field is not a string",
    "bad_messages": "malformed message list",
    "unknown_role": "unknown message role",
    "empty_text": "empty chosen or rejected",
    "identical": "chosen identical to rejected",
    "bad_margin": "margin is not a finite number",
    "bad_weight": "weight is not a finite number ≥ 0",
    "bad_tie": "tie is not true/false (or 1/0)",
    "bad_attribute": "an attribute column is not a number per response",
    # groups (rmfast.data.groups): a prompt with K ranked or scored responses
    "few_responses": "fewer than 2 responses",
    "empty_response": "empty response",
    "bad_scores": "scores of the wrong length or not finite numbers",
    "bad_ranking": "ranking is not a permutation of the response indices",
    "ambiguous_preference": "both scores and a ranking given",
    "all_tied": "every response tied (nothing to compare)",
}

Text = Union[str, list]


@dataclass
class Pair:
    """One validated preference pair, before tokenization."""

    location: str
    format: str
    chosen: Text
    rejected: Text
    prompt: Optional[Text] = None
    margin: Optional[float] = None
    weight: Optional[float] = None  # the pair's loss weight (None: 1)
    tie: bool = False  # chosen and rejected equally good


class BadRow(Exception):
    def __init__(self, reason, detail=""):
        super().__init__(f"{REASONS[reason]}{': ' + detail if detail else ''}")
        self.reason = reason
        self.detail = detail


def _field(row, name, column, required=True):
    if column not in row:
        if required:
            has = ", ".join(map(repr, sorted(row)[:8])) + (", …" if len(row) > 8 else "")
            raise BadRow("missing_field", f"no {column!r}" + (f" (the {name} column)" if column != name else "")
                         + f"; the row has {has or 'no fields'} (map yours with --data.columns "
                           f"'{{\"{name}\": \"your_column\"}}')")
        return None
    value = row[column]
    if value is None and required:
        raise BadRow("null_field", f"{column!r} is null")
    return value


def _messages(value, column):
    if not isinstance(value, list) or not value:
        raise BadRow("bad_messages", f"{column!r} must be a non-empty list of {{role, content}} messages")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise BadRow("bad_messages", f"{column!r}[{i}] is not a {{role, content}} message")
        if m["role"] not in ROLES:
            raise BadRow("unknown_role", f"{column!r}[{i}] has role {m['role']!r}; known: {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise BadRow("not_text", f"{column!r}[{i}].content is {type(m['content']).__name__}, not a string")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def detect_format(row, columns):
    chosen = row.get(columns.get("chosen", "chosen"))
    if isinstance(chosen, list):
        return "conversational"
    prompt = row.get(columns.get("prompt", "prompt"))
    return "explicit" if isinstance(prompt, str) else "implicit"


def read_weight(row, column):
    """A row's loss weight from `column` (None when absent or an empty CSV cell); BadRow unless a finite
    number ≥ 0."""
    value = row.get(column)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        weight = float(value)
    except (TypeError, ValueError):
        raise BadRow("bad_weight", f"{column!r} is {value!r}") from None
    if not math.isfinite(weight) or weight < 0:
        raise BadRow("bad_weight", f"{column!r} is {value!r}")
    return weight


_TRUE, _FALSE = ("true", "1", "yes", "tie"), ("false", "0", "no", "")


def read_tie(row, column):
    """A row's tie flag from `column`: true/false, 1/0, yes/no (or the word tie); absent: False."""
    value = row.get(column)
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise BadRow("bad_tie", f"{column!r} is {value!r}")


def parse_row(location, row, fmt="auto", columns=None) -> Pair:
    """Validate one row and return its Pair; raises BadRow with the reason."""
    columns = columns or {}
    col = {k: columns.get(k, k) for k in ("prompt", "chosen", "rejected", "margin", "weight", "tie")}
    if fmt == "auto":
        fmt = detect_format(row, columns)
    chosen = _field(row, "chosen", col["chosen"])
    rejected = _field(row, "rejected", col["rejected"])
    prompt = _field(row, "prompt", col["prompt"], required=fmt == "explicit")

    if fmt == "conversational":
        chosen = _messages(chosen, col["chosen"])
        rejected = _messages(rejected, col["rejected"])
        if prompt is not None:
            prompt = _messages(prompt, col["prompt"])
        if not any(m["content"].strip() for m in chosen) or not any(m["content"].strip() for m in rejected):
            raise BadRow("empty_text", "a side has no non-empty message")
        if chosen == rejected:
            raise BadRow("identical")
    else:
        texts = (("chosen", chosen), ("rejected", rejected)) + ((("prompt", prompt),) if prompt is not None else ())
        for name, value in texts:
            if not isinstance(value, str):
                raise BadRow("not_text", f"{col[name]!r} is {type(value).__name__}, not a string")
        if not chosen.strip() or not rejected.strip():
            raise BadRow("empty_text", f"{'chosen' if not chosen.strip() else 'rejected'} is empty")
        if chosen == rejected:
            raise BadRow("identical")

    margin = row.get(col["margin"])
    if isinstance(margin, str) and not margin.strip():  # an empty CSV cell
        margin = None
    if margin is not None:
        try:
            margin = float(margin)
        except (TypeError, ValueError):
            raise BadRow("bad_margin", f"{col['margin']!r} is {margin!r}") from None
        if not math.isfinite(margin):
            raise BadRow("bad_margin", f"{col['margin']!r} is {margin}")
    return Pair(location, fmt, chosen, rejected, prompt, margin, read_weight(row, col["weight"]),
                read_tie(row, col["tie"]))
