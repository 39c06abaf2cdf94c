"""The one tokenized form of preference data: groups of K ≥ 2 responses to a prompt (a pair is a group of
two, chosen scored 1 over rejected scored 0), columnar, with its on-disk cache format.

Every row shape (pairs, scored or ranked groups) becomes a TokenizedGroups at tokenization; everything below
(layouts, the objective, evaluation, the scorer, the server) reads this form alone."""

from dataclasses import dataclass

import numpy as np

from .groups import comparisons


def common_prefix(a, b):
    """Length of the longest common prefix of two id sequences."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n


def shared_prefix(a, b):
    """The longest common prefix, capped so that each side keeps at least one token of its own."""
    return min(common_prefix(a, b), len(a) - 1, len(b) - 1)


@dataclass
class TokenizedGroups:
    """Tokenized groups, columnar. prompt: [n] int32 arrays (what every response of the group shares);
    responses: [n] lists of K_g int32 arrays (each response's own tokens; prompt + response is the whole
    sequence); scores: [n] float32 arrays [K_g], higher is better; weight: float32 [n], each group's loss
    weight; locations: where each came from; tags: the row's `subset` or None; origin: [n] int64 arrays, for
    each response of the row as read, the response it became (identical ones merged) or -1 where the length
    policy dropped it; margin: float32 [n], the row's margin column (a pair's), added to each of its
    comparisons' margins in the loss, NaN where the row had none (a zero margin is a margin, not a tie)."""

    prompt: list
    responses: list
    scores: list
    weight: np.ndarray = None
    locations: list = None
    tags: list = None
    origin: list = None
    margin: np.ndarray = None

    def __post_init__(self):
        n = len(self.prompt)
        if self.origin is None:
            self.origin = [np.arange(len(r), dtype=np.int64) for r in self.responses]
        self.weight = np.ones(n, np.float32) if self.weight is None else np.asarray(self.weight, np.float32)
        self.margin = np.full(n, np.nan, np.float32) if self.margin is None else np.asarray(self.margin, np.float32)
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

    def lengths(self, layout="prefix_shared"):
        """Token positions each group takes in `layout` ([n] int64), as rmfast.layouts lays it out:
        prefix_shared: the prompt once and every response once; packed: every whole sequence; padded: K rows
        as long as the group's longest sequence (a batch's rows are then padded to its longest)."""
        prompt = np.fromiter((len(p) for p in self.prompt), np.int64, count=len(self))
        total = np.fromiter((sum(len(r) for r in rs) for rs in self.responses), np.int64, count=len(self))
        if layout == "prefix_shared":
            return prompt + total
        if layout == "packed":
            return self.sizes * prompt + total
        if layout == "padded":
            longest = np.fromiter((max(len(r) for r in rs) for rs in self.responses), np.int64, count=len(self))
            return self.sizes * (prompt + longest)
        raise ValueError(f"unknown layout {layout!r}; use padded, packed or prefix_shared")

    def subset(self, indices):
        idx = [int(i) for i in indices]
        return TokenizedGroups([self.prompt[i] for i in idx], [self.responses[i] for i in idx],
                               [self.scores[i] for i in idx], self.weight[idx],
                               [self.locations[i] for i in idx], [self.tags[i] for i in idx],
                               [self.origin[i] for i in idx], self.margin[idx])

    @staticmethod
    def concat(parts):
        parts = list(parts)
        return TokenizedGroups([x for p in parts for x in p.prompt], [x for p in parts for x in p.responses],
                               [x for p in parts for x in p.scores],
                               np.concatenate([p.weight for p in parts] or [np.zeros(0, np.float32)]),
                               [x for p in parts for x in p.locations], [x for p in parts for x in p.tags],
                               [x for p in parts for x in p.origin],
                               np.concatenate([p.margin for p in parts] or [np.zeros(0, np.float32)]))

    @staticmethod
    def of_pairs(chosen, rejected, margin=None, locations=None, weight=None):
        """Pairs as groups of 2 (chosen scored 1 over rejected scored 0) from whole id sequences: the prompt
        is their longest common prefix, capped so that each keeps at least one token of its own."""
        prompt, responses = [], []
        for c, r in zip(chosen, rejected):
            c, r = np.asarray(c, np.int32), np.asarray(r, np.int32)
            s = shared_prefix(c, r)
            prompt.append(c[:s])
            responses.append([c[s:], r[s:]])
        scores = [np.array([1.0, 0.0], np.float32) for _ in prompt]
        return TokenizedGroups(prompt, responses, scores, weight, locations, None, None, margin)

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
        np.savez(path, **arrays, sizes=self.sizes, weight=self.weight, margin=self.margin,
                 locations=np.array(self.locations, dtype=str),
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
                               tags, split("origin"), z["margin"])
