"""Groups as tokens: rendering, the length policy, merging of identical responses, and the shared prompt.

Each response of a group is rendered and tokenized as a whole sequence (prompt + response, ending in EOS,
exactly as the pair path does for chosen and rejected), then:
- the length policy cuts the prompt from the left, the same tokens from every response (keeping BOS and
  ``min_prompt_tokens``), then each response from the right keeping its final EOS (``overlong="drop"``
  drops the overlong responses instead, and the group when fewer than 2 remain);
- responses with identical ids are merged into one (their scores averaged) and counted;
- the prompt is the longest common prefix of all the sequences, capped so that each response keeps at
  least one token of its own: the prefix-shared layout computes it once for all K.
For K = 2 this is the pair path: the same ids, the same truncation, the prompt equal to ``shared``."""

from dataclasses import dataclass, field

import numpy as np

from .groups import comparisons, parse_group_row
from .tokenize import LengthPolicy, check_chat_template, common_prefix


@dataclass
class TokenizedGroups:
    """Tokenized groups, columnar. prompt: [n] int32 arrays (what every response of the group shares);
    responses: [n] lists of K_g int32 arrays (each response's own tokens; prompt + response is the whole
    sequence, ending in EOS); scores: [n] float32 arrays [K_g], higher is better; weight: float32 [n],
    each group's loss weight; locations: where each came from; tags: the row's `subset` or None;
    origin: [n] int64 arrays, for each response of the row as read, the response it became (identical ones
    merged) or -1 where the length policy dropped it."""

    prompt: list
    responses: list
    scores: list
    weight: np.ndarray = None
    locations: list = None
    tags: list = None
    origin: list = None

    def __post_init__(self):
        n = len(self.prompt)
        if self.origin is None:
            self.origin = [np.arange(len(r), dtype=np.int64) for r in self.responses]
        self.weight = np.ones(n, np.float32) if self.weight is None else np.asarray(self.weight, np.float32)
        self.locations = self.locations if self.locations is not None else [f"group {i}" for i in range(n)]
        self.tags = self.tags if self.tags is not None else [None] * n

    def __len__(self):
        return len(self.prompt)

    @property
    def sizes(self):
        """K of each group, int64 [n]."""
        return np.fromiter((len(r) for r in self.responses), dtype=np.int64, count=len(self))

    def sequence(self, g, k):
        """The whole token sequence of response k of group g (int32)."""
        return np.concatenate([self.prompt[g], self.responses[g][k]])

    def comparisons(self, g):
        """([C, 2] int64 (better, worse) response indices, [C] float32 score differences) of group g."""
        pairs, diff, _ = comparisons(self.scores[g])
        return pairs, diff

    def subset(self, indices):
        idx = [int(i) for i in indices]
        return TokenizedGroups([self.prompt[i] for i in idx], [self.responses[i] for i in idx],
                               [self.scores[i] for i in idx], self.weight[idx],
                               [self.locations[i] for i in idx], [self.tags[i] for i in idx],
                               [self.origin[i] for i in idx])

    @staticmethod
    def concat(parts):
        parts = list(parts)
        return TokenizedGroups([x for p in parts for x in p.prompt], [x for p in parts for x in p.responses],
                               [x for p in parts for x in p.scores],
                               np.concatenate([p.weight for p in parts] or [np.zeros(0, np.float32)]),
                               [x for p in parts for x in p.locations], [x for p in parts for x in p.tags],
                               [x for p in parts for x in p.origin])

    def save(self, path):
        """To an .npz of flat arrays (read back with allow_pickle=False: a cache file cannot run code)."""
        def flat(seqs, dtype):
            offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
            np.cumsum([len(s) for s in seqs], out=offsets[1:])
            return (np.concatenate(seqs).astype(dtype) if seqs else np.zeros(0, dtype)), offsets

        responses = [r for rs in self.responses for r in rs]
        arrays = {}
        for name, seqs, dtype in (("prompt", self.prompt, np.int32), ("responses", responses, np.int32),
                                  ("scores", self.scores, np.float32), ("origin", self.origin, np.int64)):
            arrays[name], arrays[f"{name}_offsets"] = flat(seqs, dtype)
        np.savez(path, **arrays, sizes=self.sizes, weight=self.weight, locations=np.array(self.locations, dtype=str),
                 tags=np.array(["" if t is None else t for t in self.tags], dtype=str),
                 tagged=np.array([t is not None for t in self.tags], dtype=bool))

    @staticmethod
    def load(path):
        z = np.load(path, allow_pickle=False)

        def split(name):
            data, offsets = z[name], z[f"{name}_offsets"]
            return [data[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]

        flat, at, responses = split("responses"), 0, []
        for k in z["sizes"].tolist():
            responses.append(flat[at:at + k])
            at += k
        tags = [t if tagged else None for t, tagged in zip(z["tags"].tolist(), z["tagged"].tolist())]
        return TokenizedGroups(split("prompt"), responses, split("scores"), z["weight"], z["locations"].tolist(),
                               tags, split("origin"))

    @staticmethod
    def from_pairs(pairs):
        """TokenizedPairs as groups of 2: the shared prefix as the prompt, chosen (score 1) over rejected (0)."""
        prompt, responses = [], []
        for c, r, s in zip(pairs.chosen, pairs.rejected, pairs.shared):
            prompt.append(np.asarray(c[:s], np.int32))
            responses.append([np.asarray(c[s:], np.int32), np.asarray(r[s:], np.int32)])
        scores = [np.array([1.0, 0.0], np.float32) for _ in prompt]
        return TokenizedGroups(prompt, responses, scores, None, list(pairs.locations))


def common_prefix_all(seqs):
    """Length of the longest common prefix of several id sequences."""
    return min(common_prefix(seqs[0], s) for s in seqs[1:]) if len(seqs) > 1 else len(seqs[0])


def fit_group_length(seqs, prompt_len, policy: LengthPolicy, bos_id):
    """The length policy on a group's whole sequences (id lists). Returns (seqs, kept: indices of the input
    sequences still there, truncated). With K = 2 it is rmfast.data.tokenize.fit_length."""
    limit = policy.max_length
    if all(len(s) <= limit for s in seqs):
        return seqs, list(range(len(seqs))), False
    if policy.overlong == "drop":
        kept = [k for k, s in enumerate(seqs) if len(s) <= limit]
        return [seqs[k] for k in kept], kept, False
    # the prompt is the same in every response: the same tokens go from all, from the left
    prompt_len = min(prompt_len, common_prefix_all(seqs))
    keep_head = 1 if bos_id is not None and seqs[0] and seqs[0][0] == bos_id else 0
    over = max(len(s) for s in seqs) - limit
    cut = max(0, min(over, prompt_len - keep_head - policy.min_prompt_tokens))
    if cut:
        seqs = [s[:keep_head] + s[keep_head + cut:] for s in seqs]
    seqs = [s if len(s) <= limit else s[: limit - 1] + s[-1:] for s in seqs]  # the final EOS stays
    return seqs, list(range(len(seqs))), True


def merge_identical(seqs, scores):
    """Identical sequences merged into one (first place kept), its score the mean of theirs. Returns
    (seqs, scores float32 [K'], how many were merged away, [K] the merged sequence each input became)."""
    where, out, sums, counts, slot = {}, [], [], [], []
    for s, x in zip(seqs, scores):
        key = tuple(s)
        if key not in where:
            where[key] = len(out)
            out.append(s)
            sums.append(0.0)
            counts.append(0)
        sums[where[key]] += x
        counts[where[key]] += 1
        slot.append(where[key])
    return out, np.array(sums, np.float64) / np.array(counts), len(seqs) - len(out), slot


def render_group(group, tokenizer, chat_template=None):
    """(whole texts [K], prompt text or None, whether the texts already hold their special tokens)."""
    if group.format == "implicit":
        return list(group.responses), None, False
    if group.format == "explicit":
        return [group.prompt + r for r in group.responses], group.prompt, False
    prompt = group.prompt or []
    kwargs = {"tokenize": False}
    if chat_template is not None:
        kwargs["chat_template"] = chat_template
    texts = [tokenizer.apply_chat_template(prompt + r, **kwargs) for r in group.responses]
    prompt_text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, **kwargs) if prompt else None
    if prompt_text is not None and not all(t.startswith(prompt_text) for t in texts):
        prompt_text = None  # the template renders the prompt differently inside the conversation
    return texts, prompt_text, True


@dataclass
class GroupCounts:
    """What tokenization did: groups kept, comparisons made, tied response pairs (no comparison),
    responses merged as identical, groups truncated, responses and groups dropped (by reason)."""

    groups: int = 0
    comparisons: int = 0
    ties: int = 0
    merged: int = 0
    truncated: int = 0
    dropped_responses_too_long: int = 0
    dropped: dict = field(default_factory=dict)

    def drop(self, reason):
        self.dropped[reason] = self.dropped.get(reason, 0) + 1


def _encode(texts, prompt_text, special, tokenizer, eos_id):
    """Id lists of the texts (eos_id appended where missing, unless None) and how many tokens the prompt text
    covers."""
    enc = tokenizer(texts, add_special_tokens=not special, return_offsets_mapping=True)
    seqs = [list(ids) for ids in enc["input_ids"]]
    if prompt_text is None:
        prompt_len = common_prefix_all(seqs)
    else:  # tokens that start inside the prompt text
        prompt_len = sum(1 for (s, _) in enc["offset_mapping"][0] if s < len(prompt_text))
    if eos_id is not None:
        seqs = [s if s and s[-1] == eos_id else s + [eos_id] for s in seqs]
    return seqs, prompt_len


def _tokenize_one(group, tokenizer, policy, chat_template, counts, scoring=False):
    """(prompt ids, response ids, scores, origin) of one group, or None when it is dropped (counted).
    scoring: keep groups with one response or no order (they are scored, not trained on)."""
    texts, prompt_text, special = render_group(group, tokenizer, chat_template)
    eos = tokenizer.eos_token_id if policy.appends_eos(special) else None
    seqs, prompt_len = _encode(texts, prompt_text, special, tokenizer, eos)
    seqs, kept, truncated = fit_group_length(seqs, prompt_len, policy, tokenizer.bos_token_id)
    counts.dropped_responses_too_long += len(texts) - len(kept)
    given = group.scores if group.scores is not None else [0.0] * len(texts)
    seqs, scores, merged, slot = merge_identical(seqs, [given[k] for k in kept])
    counts.merged += merged
    origin = np.full(len(texts), -1, np.int64)
    origin[kept] = slot
    if len(seqs) < (1 if scoring else 2):
        counts.drop("fewer_than_two_responses" if not scoring else "all_responses_too_long")
        return None
    if not scoring and np.all(scores == scores[0]):
        counts.drop("all_tied")
        return None
    counts.truncated += truncated
    shared = min(common_prefix_all(seqs), min(len(s) for s in seqs) - 1)
    pairs, _, ties = comparisons(scores)
    counts.groups += 1
    counts.comparisons += len(pairs)
    counts.ties += ties
    return (np.asarray(seqs[0][:shared], np.int32), [np.asarray(s[shared:], np.int32) for s in seqs],
            scores.astype(np.float32), origin)


def tokenize_groups(groups, tokenizer, policy: LengthPolicy, chat_template=None, weights=None, scoring=False,
                    progress=None):
    """Tokenize validated Groups. Returns (TokenizedGroups, GroupCounts). weights: one loss weight per
    group (default 1). scoring: groups of one response, or without an order, are kept. progress: a tqdm
    bar advanced per group."""
    if any(g.format == "conversational" for g in groups):
        check_chat_template(tokenizer, chat_template)
    counts = GroupCounts()
    prompt, responses, scores, weight, locations, tags, origin = [], [], [], [], [], [], []
    for i, group in enumerate(groups):
        out = _tokenize_one(group, tokenizer, policy, chat_template, counts, scoring)
        if progress is not None:
            progress.update(1)
        if out is None:
            continue
        prompt.append(out[0])
        responses.append(out[1])
        scores.append(out[2])
        origin.append(out[3])
        weight.append(1.0 if weights is None else weights[i])
        locations.append(group.location)
        tags.append(group.tag)
    return TokenizedGroups(prompt, responses, scores, np.array(weight, np.float32), locations, tags,
                           origin), counts


def read_groups(source, config):
    """Read and validate one source's group rows (rmfast.data.loader.Source, DataConfig: format, columns).
    Returns (groups, DataReport) — bad rows are counted with file:line and reason, never silently lost."""
    from .loader import read_rows

    return read_rows(source, config, parse_group_row)


def tokenize_group_source(source, tokenizer, config, progress=True):
    """Read, validate and tokenize one source of groups (no cache; rmfast.data.loader.load_source caches
    it). Returns (TokenizedGroups, DataReport with its `groups` counts)."""
    from collections import Counter

    from .loader import _check_bad, progress_bar

    groups, report = read_groups(source, config)
    _check_bad(report, config, source.path)
    bar = progress_bar(progress, len(groups), source.path, "group")
    tokenized, counts = tokenize_groups(groups, tokenizer, config.policy(), config.chat_template, progress=bar)
    if bar is not None:
        bar.close()
    report.pairs = counts.comparisons
    report.truncated = counts.truncated
    report.dropped.update(counts.dropped)
    report.groups = Counter(groups=counts.groups, comparisons=counts.comparisons, ties=counts.ties,
                            merged=counts.merged, responses_dropped=counts.dropped_responses_too_long)
    return tokenized, report


def load_groups(source, tokenizer, config, progress=True):
    """One source of group rows, validated (on_bad_row as for pairs: error stops with file:line and reason)
    and tokenized, from the cache when seen before. Returns (TokenizedGroups, DataReport, GroupCounts)."""
    from .loader import Source, load_source

    tokenized, report = load_source(Source.parse(source), tokenizer, config, progress=progress, kind="groups")
    g = report.groups
    counts = GroupCounts(g["groups"], g["comparisons"], g["ties"], g["merged"], report.truncated,
                         g["responses_dropped"], dict(report.dropped))
    return tokenized, report, counts
