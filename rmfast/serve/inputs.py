"""A request's texts as the scorer's units of work: one TokenizedGroups row per text (an empty prompt and one
response) or per group (the prompt once, K responses), tokenized exactly as rmfast-score tokenizes a `text`
or `messages` row (rmfast.score.sequence_ids) or a group row (rmfast.data.group_tokens.tokenize_groups,
with its length policy), so that every route's rewards are rmfast-score's."""

import re
from dataclasses import dataclass, field

import numpy as np

from ..data.formats import BadRow, _messages
from ..data.group_tokens import tokenize_groups
from ..data.tokens import TokenizedGroups
from ..data.groups import Group, parse_group_row
from ..errors import UserError
from ..score import sequence_ids


class BadInput(Exception):
    """A request the server refuses: answered with `status` and a JSON error naming `param`, the field."""

    def __init__(self, param, message, status=422, kind="invalid_request_error"):
        super().__init__(f"{param}: {message}" if param else message)
        self.param, self.message, self.status, self.kind = param, message, status, kind


@dataclass
class Work:
    """Units of one request. groups: one row per unit; truncated: [n] bool, whether the length policy cut
    the unit; fields: [n] the request field each unit came from (for errors and answers)."""

    groups: TokenizedGroups
    truncated: list = field(default_factory=list)

    @property
    def tokens(self):
        """Tokens the units take in the prefix-shared layout (each prompt once)."""
        return int(self.groups.lengths("prefix_shared").sum()) if len(self.groups) else 0

    def per_response(self, rewards):
        """Unit rewards ([n] arrays over each unit's responses as computed, identical ones merged; [n, 1 + A]
        with an attribute head's attributes) as read: one list per unit, a reward per response given."""
        return [[float(np.reshape(r, (len(r), -1))[o, 0]) for o in origin]
                for r, origin in zip(rewards, self.groups.origin)]

    def per_response_attributes(self, rewards):
        """An attribute head's attributes as read: one [responses given][A] list per unit (None without)."""
        return [[np.reshape(r, (len(r), -1))[o, 1:].astype(float).tolist() for o in origin]
                for r, origin in zip(rewards, self.groups.origin)]


def _single(ids):
    return np.zeros(0, np.int32), [np.asarray(ids, np.int32)]


def keep_last(ids, cut, k):
    """vLLM's truncate_prompt_tokens: only the last k tokens of a sequence (k None: all). Returns (ids, cut)."""
    if k is None or len(ids) <= k:
        return ids, cut
    return ids[-k:], True


class Inputs:
    """Tokenizes requests with the export's tokenizer and convention and the data config's length policy.
    max_text_chars: the longest text taken at all (longer is refused before any tokenization)."""

    def __init__(self, tokenizer, config, max_text_chars):
        self.tokenizer = tokenizer
        self.config = config
        self.policy = config.policy()
        self.max_text_chars = max_text_chars

    def check_length(self, value, param):
        """Refuse a text (or a message list's contents) over max_text_chars, naming it."""
        if isinstance(value, list):
            for i, m in enumerate(value):
                content = m.get("content") if isinstance(m, dict) else None
                if isinstance(content, str):
                    self.check_length(content, f"{param}[{i}].content")
            return
        if isinstance(value, str) and len(value) > self.max_text_chars:
            raise BadInput(param, f"{len(value)} characters, far over max_length={self.policy.max_length} tokens "
                                  f"(texts up to {self.max_text_chars} characters are taken, and truncated by the "
                                  f"length policy; see --max-text-chars)", status=413)

    def texts(self, texts, param, rendered=False, last=None):
        """Single texts (rmfast-score's `text` rows; rendered: already holding their special tokens); last: keep
        only each one's last tokens (vLLM's truncate_prompt_tokens)."""
        prompts, responses, truncated = [], [], []
        for i, text in enumerate(texts):
            where = f"{param}[{i}]" if param else f"[{i}]"
            if not text.strip():
                raise BadInput(where, "is empty; a text to score is needed")
            self.check_length(text, where)
            ids, cut = keep_last(*sequence_ids(self.tokenizer, self.policy.max_length, text=text, rendered=rendered,
                                               eos_after_template=self.policy.eos_after_template), last)
            p, r = _single(ids)
            prompts.append(p)
            responses.append(r)
            truncated.append(cut)
        return Work(TokenizedGroups(prompts, responses, [np.zeros(1, np.float32)] * len(texts)), truncated)

    def messages(self, messages, param, last=None):
        """One conversation (rmfast-score's `messages` rows): rendered by the chat template; last: as texts."""
        try:
            messages = _messages(messages, param)
        except BadRow as exc:
            raise BadInput(param, exc.detail or str(exc)) from None
        self.check_length(messages, param)
        self._check_template(param)
        ids, cut = keep_last(*sequence_ids(self.tokenizer, self.policy.max_length, messages=messages,
                                           chat_template=self.config.chat_template,
                                           eos_after_template=self.policy.eos_after_template), last)
        p, r = _single(ids)
        return Work(TokenizedGroups([p], [r], [np.zeros(1, np.float32)]), [cut])

    def groups(self, rows, param):
        """Group rows ({prompt | messages, responses}), read and tokenized as rmfast-score reads group rows.
        param: the request field of the list ("groups"), or None for one group at the top level."""
        parsed = []
        for g, row in enumerate(rows):
            where = f"{param}[{g}]" if param else ""
            at = lambda name, where=where: f"{where}.{name}" if where else name  # noqa: E731
            row = dict(row)
            if row.get("messages") is not None:
                if row.get("prompt") is not None:
                    raise BadInput(at("messages"), "give `prompt` or `messages`, not both")
                row["prompt"] = row.pop("messages")
            row = {k: row[k] for k in ("prompt", "responses") if row.get(k) is not None}
            self.check_length(row.get("prompt"), at("prompt"))
            for k, v in enumerate(row.get("responses") or []):
                self.check_length(v, at(f"responses[{k}]"))
            try:
                parsed.append(parse_group_row(where or "group", row, preference=False))
            except BadRow as exc:  # its detail starts with the column: 'responses'[1] is empty
                column = re.match(r"'(\w+)'(\[\d+\])?", exc.detail or "")
                raise BadInput(at("".join(column.groups(""))) if column else (where or "body"), str(exc)) from None
        return self._tokenize(parsed, param or "prompt")

    def queries(self, queries, prompts):
        """OpenRLHF's /get_reward: whole texts, and each one's prompt (or None). With prompts, the queries of one
        prompt are one group (the prompt computed once), read as a group row {prompt, responses: the rest of
        each query}. Returns (Work, where: for each query, its (unit, response))."""
        for i, q in enumerate(queries):
            self.check_length(q, f"query[{i}]")
        if prompts is None:
            work = self.texts(queries, "query")
            return work, [(i, 0) for i in range(len(queries))]
        if len(prompts) != len(queries):
            raise BadInput("prompts", f"holds {len(prompts)} prompts for {len(queries)} queries; give one per query "
                                      f"(or none)")
        units, where = {}, []
        for i, (q, p) in enumerate(zip(queries, prompts)):
            if not q.strip():
                raise BadInput(f"query[{i}]", "is empty; a text to score is needed")
            if not q.startswith(p):
                raise BadInput(f"prompts[{i}]", f"is not a prefix of query[{i}] (the query starts {q[:40]!r}, the "
                                                f"prompt {p[:40]!r}); send each query's own prompt, or no prompts")
            members = units.setdefault(p, [])
            where.append((list(units).index(p), len(members)))
            members.append(q[len(p):])
        groups = [Group(f"prompts[{i}]", "explicit", p, rs, None) for i, (p, rs) in enumerate(units.items())]
        return self._tokenize(groups, "prompts"), where

    def _check_template(self, param):
        if self.config.chat_template is None and not getattr(self.tokenizer, "chat_template", None):
            raise BadInput(param, "conversations need a chat template and this model's tokenizer has none "
                                  "(start rmfast-serve with --chat-template FILE.jinja)")

    def _tokenize(self, groups, param):
        if any(g.format == "conversational" for g in groups):
            self._check_template(param)
        prompts, responses, origins, truncated = [], [], [], []
        for g in groups:
            try:
                out, counts = tokenize_groups([g], self.tokenizer, self.policy, self.config.chat_template,
                                              scoring=True)
            except UserError as exc:
                raise BadInput(param, str(exc)) from None
            if len(out) == 0:  # the length policy left nothing of it (overlong "drop")
                raise BadInput(g.location, f"every response is over max_length={self.policy.max_length}")
            prompts.append(out.prompt[0])
            responses.append(out.responses[0])
            origins.append(out.origin[0])
            truncated.append(bool(counts.truncated))
        scores = [np.zeros(len(r), np.float32) for r in responses]
        return Work(TokenizedGroups(prompts, responses, scores, origin=origins), truncated)
