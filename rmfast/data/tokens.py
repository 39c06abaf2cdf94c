"""The one tokenized form of preference data: groups of K ≥ 2 responses to a prompt (a pair is a group of
two, chosen scored 1 over rejected scored 0), columnar, with its on-disk cache format.

Every row shape (pairs, scored or ranked groups) becomes a TokenizedGroups at tokenization; everything below
(layouts, the objective, evaluation, the scorer, the server) reads this form alone."""

import os
import shutil
import socket
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

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


class Ragged(Sequence):
    """Rows of variable-length arrays over flat storage, read without copying. A part is (data, offsets, nest,
    present): item j is data[offsets[j]:offsets[j + 1]]; row r is item r, or with `nest` the list of items
    nest[r]:nest[r + 1] (a group's responses); with `present`, row r is None where present[r] is false. Row i of
    this sequence is row rows[i] of part which[i]. text: items are UTF-8 bytes, read as str.

    The parts are held by reference: a cache entry's arrays memory-mapped from disk are shared by every process
    of a node that maps them (the page cache holds one copy), and take()/concat() make new row indices, never
    copies of the data."""

    def __init__(self, parts, which, rows, text=False, width=None):
        self.parts, self.which, self.rows, self.text, self.width = parts, which, rows, text, width

    @classmethod
    def of(cls, data, offsets, nest=None, present=None, text=False, width=None):
        """width: items are [len / width, width] matrices (stored row-major, flat)."""
        n = len(nest if nest is not None else offsets) - 1
        return cls([(data, offsets, nest, present)], None, np.arange(n, dtype=np.int64), text, width)

    def __len__(self):
        return len(self.rows)

    def _item(self, data, offsets, j):
        x = data[offsets[j]:offsets[j + 1]]
        if self.width is not None:
            return x.reshape(-1, self.width)
        return x.tobytes().decode() if self.text else x

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.take(np.arange(len(self))[i])
        r = self.rows[i]
        data, offsets, nest, present = self.parts[0 if self.which is None else self.which[i]]
        if present is not None and not present[r]:
            return None
        if nest is None:
            return self._item(data, offsets, r)
        return [self._item(data, offsets, j) for j in range(nest[r], nest[r + 1])]

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __eq__(self, other):
        if isinstance(other, (list, Ragged)) and self.text:
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None

    def __repr__(self):
        return f"Ragged({len(self)} rows over {len(self.parts)} part(s))"

    def _per_part(self, fn):
        """[n] int64 from fn(part, rows of this sequence in that part), part by part (no row is built)."""
        out = np.zeros(len(self), np.int64)
        for k, part in enumerate(self.parts):
            sel = slice(None) if self.which is None else self.which == k
            rows = self.rows[sel]
            if len(rows):
                out[sel] = fn(part, rows)
        return out

    def counts(self):
        """Each row's length (its items' count when nested), [n] int64."""
        return self._per_part(lambda part, r: (part[2] if part[2] is not None else part[1])[r + 1]
                              - (part[2] if part[2] is not None else part[1])[r])

    def totals(self):
        """Nested: the elements of each row's items together, [n] int64 (a row's items are contiguous)."""
        return self._per_part(lambda part, r: part[1][part[2][r + 1]] - part[1][part[2][r]])

    def longest(self):
        """Nested: each row's longest item, [n] int64 (0 for a row without items)."""
        def fn(part, r):
            _, offsets, nest, _ = part
            item = np.diff(offsets)
            most = np.zeros(len(nest) - 1, np.int64)
            some = np.diff(nest) > 0
            if some.any():  # the non-empty rows' items lie end to end: one segment each
                most[some] = np.maximum.reduceat(item, nest[:-1][some])
            return most[r]
        return self._per_part(fn)

    def take(self, indices):
        idx = np.asarray(indices, np.int64)
        return Ragged(self.parts, None if self.which is None else self.which[idx], self.rows[idx], self.text,
                      self.width)

    @staticmethod
    def concat(items):
        """One sequence of the items' rows in order, over their parts (by reference)."""
        parts, which, rows = [], [], []
        for item in items:
            ids = []
            for part in item.parts:
                at = next((k for k, p in enumerate(parts) if p is part), None)
                if at is None:
                    parts.append(part)
                    at = len(parts) - 1
                ids.append(at)
            which.append(np.asarray(ids, np.int32)[item.which if item.which is not None else
                                                   np.zeros(len(item), np.int64)])
            rows.append(item.rows)
        text, width = bool(items) and items[0].text, items[0].width if items else None
        if not parts:
            return Ragged.of(np.zeros(0, np.uint8 if text else np.int32), np.zeros(1, np.int64), text=text,
                             width=width)
        which = np.concatenate(which)
        return Ragged(parts, None if len(parts) == 1 else which, np.concatenate(rows), text, width)


def _take(seq, idx):
    return seq.take(idx) if isinstance(seq, Ragged) else [seq[i] for i in idx]


def _concat(seqs):
    if seqs and all(isinstance(s, Ragged) for s in seqs):
        return Ragged.concat(seqs)
    return [x for s in seqs for x in s]


def _flat(seqs, dtype):
    """(data, offsets) of a sequence of arrays laid end to end."""
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum([len(s) for s in seqs], out=offsets[1:])
    return (np.concatenate(list(seqs)).astype(dtype, copy=False) if len(seqs) else np.zeros(0, dtype)), offsets


def _flat_text(texts):
    encoded = [np.frombuffer((t or "").encode(), np.uint8) for t in texts]
    return _flat(encoded, np.uint8)


def read_arrays(path, mmap=True):
    """{name: array} of a folder written by TokenizedGroups.save (memory-mapped read-only with mmap); an array
    of Python objects is refused (ValueError), never unpickled."""
    return {name: np.asarray(np.load(Path(path) / f"{name}.npy", mmap_mode="r" if mmap else None,
                                     allow_pickle=False)) for name in ARRAYS}


ARRAYS = ("prompt", "prompt_offsets", "responses", "responses_offsets", "sizes", "scores", "scores_offsets",
          "origin", "origin_offsets", "weight", "margin", "locations", "locations_offsets", "tags",
          "tags_offsets", "tagged", "attributes", "attributes_offsets", "attributes_width")


@dataclass
class TokenizedGroups:
    """Tokenized groups, columnar. prompt: [n] int32 arrays (what every response of the group shares);
    responses: [n] lists of K_g int32 arrays (each response's own tokens; prompt + response is the whole
    sequence); scores: [n] float32 arrays [K_g], higher is better; weight: float32 [n], each group's loss
    weight; locations: where each came from; tags: the row's `subset` or None; origin: [n] int64 arrays, for
    each response of the row as read, the response it became (identical ones merged) or -1 where the length
    policy dropped it; margin: float32 [n], the row's margin column (a pair's), added to each of its
    comparisons' margins in the loss, NaN where the row had none (a zero margin is a margin, not a tie);
    attributes: None, or [n] float32 arrays [K_g, A]: each response's attribute values (data.attributes), NaN
    where the row had none.

    The per-row columns are lists as tokenization builds them, or Ragged views of a cache entry's
    memory-mapped arrays (load): rows are read alike from either."""

    prompt: list
    responses: list
    scores: list
    weight: np.ndarray = None
    locations: list = None
    tags: list = None
    origin: list = None
    margin: np.ndarray = None
    attributes: list = None

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
        if isinstance(self.responses, Ragged):
            return self.responses.counts()
        return np.fromiter((len(r) for r in self.responses), dtype=np.int64, count=len(self))

    def sequence(self, g, k):
        """The whole token sequence of response k of group g (int32)."""
        return np.concatenate([self.prompt[g], self.responses[g][k]])

    def comparisons(self, g):
        """([C, 2] int64 (better, worse) response indices, [C] float32 score differences) of group g."""
        pairs, diff, _ = comparisons(self.scores[g])
        return pairs, diff

    def lengths(self, layout="prefix_shared", indices=None):
        """Token positions each group takes in `layout` ([n] int64), as rmfast.layouts lays it out:
        prefix_shared: the prompt once and every response once; packed: every whole sequence; padded: K rows
        as long as the group's longest sequence (a batch's rows are then padded to its longest). indices: those
        groups' only (a micro-batch's: no pass over the whole set)."""
        if indices is not None:
            return self.subset(indices).lengths(layout)
        mapped = isinstance(self.responses, Ragged) and isinstance(self.prompt, Ragged)
        prompt = self.prompt.counts() if mapped else np.fromiter((len(p) for p in self.prompt), np.int64,
                                                                 count=len(self))
        total = self.responses.totals() if mapped else \
            np.fromiter((sum(len(r) for r in rs) for rs in self.responses), np.int64, count=len(self))
        if layout == "prefix_shared":
            return prompt + total
        if layout == "packed":
            return self.sizes * prompt + total
        if layout == "padded":
            longest = self.responses.longest() if mapped else \
                np.fromiter((max(len(r) for r in rs) for rs in self.responses), np.int64, count=len(self))
            return self.sizes * (prompt + longest)
        raise ValueError(f"unknown layout {layout!r}; use padded, packed or prefix_shared")

    COLUMNS = ("prompt", "responses", "scores", "locations", "tags", "origin", "attributes")

    @property
    def num_attributes(self):
        """A: the attribute values each response has (0 without attributes)."""
        if self.attributes is None:
            return 0
        if isinstance(self.attributes, Ragged):
            return self.attributes.width
        return self.attributes[0].shape[1] if len(self.attributes) else 0

    def subset(self, indices):
        """The groups at `indices` (repeats allowed); memory-mapped columns stay mapped (no copy)."""
        idx = np.asarray(indices, np.int64).reshape(-1)
        cols = {name: None if getattr(self, name) is None else _take(getattr(self, name), idx)
                for name in self.COLUMNS}
        return TokenizedGroups(weight=self.weight[idx], margin=self.margin[idx], **cols)

    @staticmethod
    def concat(parts):
        parts = list(parts)
        cols = {}
        for name in TokenizedGroups.COLUMNS:
            # a part without groups may lack a column the others have (a source whose rows were all dropped)
            held = [p for p in parts if len(p)]
            seqs = [getattr(p, name) for p in held] or [getattr(p, name) for p in parts]
            if any(s is None for s in seqs) and not all(s is None for s in seqs):
                raise ValueError(f"TokenizedGroups.concat: some parts have {name} and others not")
            seqs = [s for s in seqs if s is not None]
            cols[name] = _concat(seqs) if seqs else None
        held = [p for p in parts if len(p)] or parts
        return TokenizedGroups(weight=np.concatenate([p.weight for p in held] or [np.zeros(0, np.float32)]),
                               margin=np.concatenate([p.margin for p in held] or [np.zeros(0, np.float32)]),
                               **cols)

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

    def arrays(self):
        """The flat arrays of the cache format (ARRAYS): each column laid end to end with its offsets."""
        out = {}
        responses = [r for rs in self.responses for r in rs]
        for name, seqs, dtype in (("prompt", self.prompt, np.int32), ("responses", responses, np.int32),
                                  ("scores", self.scores, np.float32), ("origin", self.origin, np.int64)):
            out[name], out[f"{name}_offsets"] = _flat(seqs, dtype)
        out["locations"], out["locations_offsets"] = _flat_text(self.locations)
        out["tags"], out["tags_offsets"] = _flat_text(self.tags)
        A = self.num_attributes
        attrs = [] if self.attributes is None else [np.asarray(a, np.float32).reshape(-1) for a in self.attributes]
        out["attributes"], out["attributes_offsets"] = _flat(attrs, np.float32)
        out.update(sizes=self.sizes, weight=self.weight, margin=self.margin,
                   tagged=np.array([t is not None for t in self.tags], dtype=bool),
                   attributes_width=np.array([A if self.attributes is not None else -1], np.int64))
        return out

    def save(self, path, extra=None):
        """To a folder of .npy files, one per array (read back with allow_pickle=False: a cache file cannot run
        code), written beside it and renamed into place: a reader sees the whole folder or none of it. extra: {file
        name: text} written into the folder too. Returns False when another process put the same folder there
        first (it then holds the same data)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            for name, array in self.arrays().items():
                np.save(tmp / f"{name}.npy", np.ascontiguousarray(array), allow_pickle=False)
            for name, text in (extra or {}).items():
                (tmp / name).write_text(text)
            try:
                os.rename(tmp, path)
            except OSError:
                if not path.is_dir():
                    raise
                return False
            return True
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @staticmethod
    def load(path, mmap=True):
        """A folder written by save(). mmap: the arrays are memory-mapped, read-only, and the groups read them
        in place (every rank of a node maps the same pages); else read into memory."""
        return TokenizedGroups.of_arrays(read_arrays(path, mmap))

    @staticmethod
    def of_arrays(z):
        """The groups over the flat arrays of arrays() (by reference)."""
        nest = np.zeros(len(z["sizes"]) + 1, np.int64)
        np.cumsum(z["sizes"], out=nest[1:])
        return TokenizedGroups(Ragged.of(z["prompt"], z["prompt_offsets"]),
                               Ragged.of(z["responses"], z["responses_offsets"], nest=nest),
                               Ragged.of(z["scores"], z["scores_offsets"]), z["weight"],
                               Ragged.of(z["locations"], z["locations_offsets"], text=True),
                               Ragged.of(z["tags"], z["tags_offsets"], present=z["tagged"], text=True),
                               Ragged.of(z["origin"], z["origin_offsets"]), z["margin"],
                               None if int(z["attributes_width"][0]) < 0 else
                               Ragged.of(z["attributes"], z["attributes_offsets"], width=int(z["attributes_width"][0])))
