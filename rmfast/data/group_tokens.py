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

from .groups import comparisons
from .tokenize import LengthPolicy, check_chat_template, common_prefix
from .tokens import TokenizedGroups  # noqa: F401  (the one tokenized form; re-exported)


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
    attributes = None
    if group.attributes is not None:  # each kept response's, the merged ones' mean of what they have
        values = np.asarray(group.attributes, np.float64).reshape(len(texts), -1)[kept]
        have = np.isfinite(values)
        sums = np.zeros((len(seqs), values.shape[1]))
        n = np.zeros_like(sums)
        np.add.at(sums, slot, np.where(have, values, 0.0))
        np.add.at(n, slot, have)
        with np.errstate(invalid="ignore"):
            attributes = (sums / n).astype(np.float32)
    counts.truncated += truncated
    shared = min(common_prefix_all(seqs), min(len(s) for s in seqs) - 1)
    pairs, _, ties = comparisons(scores)
    counts.groups += 1
    counts.comparisons += len(pairs)
    counts.ties += ties
    return (np.asarray(seqs[0][:shared], np.int32), [np.asarray(s[shared:], np.int32) for s in seqs],
            scores.astype(np.float32), origin, attributes)


def tokenize_groups(groups, tokenizer, policy: LengthPolicy, chat_template=None, weights=None, scoring=False,
                    progress=None):
    """Tokenize validated Groups. Returns (TokenizedGroups, GroupCounts). weights: one loss weight per
    group (default 1). scoring: groups of one response, or without an order, are kept. progress: a tqdm
    bar advanced per group."""
    if any(g.format == "conversational" for g in groups):
        check_chat_template(tokenizer, chat_template)
    counts = GroupCounts()
    prompt, responses, scores, weight, locations, tags, origin, margin, attrs = [], [], [], [], [], [], [], [], []
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
        attrs.append(out[4])
        weight.append((1.0 if weights is None else weights[i]) * (1.0 if group.weight is None else group.weight))
        locations.append(group.location)
        tags.append(group.tag)
        margin.append(np.nan if group.margin is None else group.margin)
    with_attributes = [a is not None for a in attrs]
    if any(with_attributes) and not all(with_attributes):
        raise ValueError("tokenize_groups: some groups have attributes and others not")
    return TokenizedGroups(prompt, responses, scores, np.array(weight, np.float32), locations, tags,
                           origin, np.array(margin, np.float32), attrs if attrs and all(with_attributes) else None), \
        counts
