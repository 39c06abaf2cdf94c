"""Rendering, tokenization, the length policy and the token-level shared prefix of preference pairs.

Each pair becomes token ids for both sides, ending in EOS (plain text) or where the chat template ends
(conversations; see LengthPolicy.eos_after_template), and then a group of two (rmfast.data.tokens): the
prompt is the longest common prefix of the two id sequences, capped so that each side keeps at least one
token of its own (the prefix-shared layout computes those tokens once), chosen scored 1 over rejected 0.
"""

from dataclasses import dataclass

import numpy as np

from .formats import Pair
from .tokens import TokenizedGroups, common_prefix, shared_prefix  # noqa: F401  (re-exported)
from ..errors import UserError

OVERLONG = ("truncate", "drop")


@dataclass
class LengthPolicy:
    """max_length: tokens per sequence (chosen or rejected, prompt included). overlong: 'truncate' removes
    prompt tokens from the left first (keeping BOS and at least min_prompt_tokens), then response tokens
    from the right (keeping the final EOS); 'drop' drops the pair."""

    max_length: int = 1024
    overlong: str = "truncate"
    min_prompt_tokens: int = 16
    # the reward-token convention: a sequence a chat template rendered ends where the template ends (what
    # apply_chat_template gives, and what transformers, vLLM and RewardBench read the reward at); True appends
    # EOS after it too, as rmfast runs before the convention did. Plain text always gets EOS.
    eos_after_template: bool = False

    def appends_eos(self, rendered_by_template):
        """Whether a sequence gets EOS at its end: plain text always; what a chat template rendered only with
        eos_after_template (the reward-token convention)."""
        return not rendered_by_template or self.eos_after_template

    def __post_init__(self):
        if self.overlong not in OVERLONG:
            raise UserError(f"overlong must be one of {', '.join(OVERLONG)}, got {self.overlong!r}")
        if self.max_length < 2:
            raise UserError(f"max_length must be at least 2, got {self.max_length}")


def render(pair: Pair, tokenizer, chat_template=None):
    """(chosen text, rejected text, prompt text or None, whether the text already holds special tokens)."""
    if pair.format == "implicit":
        return pair.chosen, pair.rejected, None, False
    if pair.format == "explicit":
        return pair.prompt + pair.chosen, pair.prompt + pair.rejected, pair.prompt, False
    prompt = pair.prompt or []
    kwargs = {"tokenize": False}
    if chat_template is not None:
        kwargs["chat_template"] = chat_template
    chosen = tokenizer.apply_chat_template(prompt + pair.chosen, **kwargs)
    rejected = tokenizer.apply_chat_template(prompt + pair.rejected, **kwargs)
    prompt_text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, **kwargs) if prompt else None
    if prompt_text is not None and not (chosen.startswith(prompt_text) and rejected.startswith(prompt_text)):
        prompt_text = None  # the template renders the prompt differently inside the conversation
    return chosen, rejected, prompt_text, True


def check_chat_template(tokenizer, chat_template):
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise UserError(
            "conversational rows need a chat template, and this tokenizer has none: pass one "
            "(--chat-template FILE.jinja, or data.chat_template in the config) or use a tokenizer that has one")


def fit_length(chosen, rejected, prompt_len, policy: LengthPolicy, bos_id):
    """Apply the length policy to one pair of id lists. Returns (chosen, rejected, prompt_len, truncated)
    or None when the pair is dropped."""
    limit = policy.max_length
    if len(chosen) <= limit and len(rejected) <= limit:
        return chosen, rejected, prompt_len, False
    if policy.overlong == "drop":
        return None
    # The prompt is the same on both sides: remove the same tokens from both, from the left.
    prompt_len = min(prompt_len, common_prefix(chosen, rejected))
    keep_head = 1 if bos_id is not None and chosen and chosen[0] == bos_id else 0
    over = max(len(chosen), len(rejected)) - limit
    cut = max(0, min(over, prompt_len - keep_head - policy.min_prompt_tokens))
    if cut:
        chosen = chosen[:keep_head] + chosen[keep_head + cut:]
        rejected = rejected[:keep_head] + rejected[keep_head + cut:]
        prompt_len -= cut

    def right(ids):  # responses lose tokens from the right; the final token (EOS) stays
        return ids if len(ids) <= limit else ids[: limit - 1] + ids[-1:]

    chosen, rejected = right(chosen), right(rejected)
    return chosen, rejected, min(prompt_len, len(chosen) - 1, len(rejected) - 1), True


def tokenize_pairs(pairs, tokenizer, policy: LengthPolicy, chat_template=None, batch_size=512, progress=None):
    """Tokenize validated pairs. Returns (TokenizedGroups of two, counts) with counts of truncated pairs and
    of dropped pairs by reason ('too_long', 'identical_after_truncation')."""
    if any(p.format == "conversational" for p in pairs):
        check_chat_template(tokenizer, chat_template)
    eos_id = tokenizer.eos_token_id
    bos_id = tokenizer.bos_token_id
    chosen_out, rejected_out, margin_out, locations, weight_out, tie_out = [], [], [], [], [], []
    counts = {"truncated": 0, "ties": 0, "dropped_too_long": 0, "dropped_identical_after_truncation": 0}
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start:start + batch_size]
        rendered = [render(p, tokenizer, chat_template) for p in batch]
        encoded = [None] * len(batch)
        for special in (False, True):  # chat-rendered text already holds its special tokens
            idx = [i for i, r in enumerate(rendered) if r[3] == special]
            if not idx:
                continue
            texts = [rendered[i][0] for i in idx] + [rendered[i][1] for i in idx]
            enc = tokenizer(texts, add_special_tokens=not special, return_offsets_mapping=True)
            for k, i in enumerate(idx):
                encoded[i] = (enc["input_ids"][k], enc["input_ids"][len(idx) + k], enc["offset_mapping"][k])
        for pair, (_, _, prompt_text, special), (ids_c, ids_r, offsets) in zip(batch, rendered, encoded):
            ids_c, ids_r = list(ids_c), list(ids_r)
            if prompt_text is None:
                prompt_len = common_prefix(ids_c, ids_r)
            else:  # tokens that start inside the prompt text (the length policy keeps them apart)
                prompt_len = sum(1 for (s, e) in offsets if s < len(prompt_text))
            if eos_id is not None and policy.appends_eos(special):
                if not ids_c or ids_c[-1] != eos_id:
                    ids_c.append(eos_id)
                if not ids_r or ids_r[-1] != eos_id:
                    ids_r.append(eos_id)
            fitted = fit_length(ids_c, ids_r, prompt_len, policy, bos_id)
            if fitted is None:
                counts["dropped_too_long"] += 1
                continue
            ids_c, ids_r, _, truncated = fitted
            if ids_c == ids_r:
                counts["dropped_identical_after_truncation"] += 1
                continue
            counts["truncated"] += truncated
            chosen_out.append(np.asarray(ids_c, dtype=np.int32))
            rejected_out.append(np.asarray(ids_r, dtype=np.int32))
            margin_out.append(np.nan if pair.margin is None else pair.margin)
            locations.append(pair.location)
            weight_out.append(1.0 if pair.weight is None else pair.weight)
            tie_out.append(pair.tie)
            counts["ties"] += pair.tie
        if progress is not None:
            progress.update(len(batch))
    out = TokenizedGroups.of_pairs(chosen_out, rejected_out, np.array(margin_out, dtype=np.float32), locations,
                                   np.array(weight_out, np.float32))
    for i in np.flatnonzero(tie_out):  # a tie: both responses scored the same (no strict comparison)
        out.scores[i] = np.array([1.0, 1.0], np.float32)
    return out, counts


def _tokenize_chunk(args):
    return tokenize_pairs(*args)


def tokenize_pairs_parallel(pairs, tokenizer, policy: LengthPolicy, chat_template=None, num_proc=1, progress=None):
    """tokenize_pairs over ``num_proc`` worker processes (chat-template rendering is Python and pays for
    them on large datasets; the fast tokenizer's own threads are used either way). Same result, same order."""
    if num_proc <= 1 or len(pairs) < 2 * 512:
        return tokenize_pairs(pairs, tokenizer, policy, chat_template, progress=progress)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    n_chunks = num_proc * 4
    size = -(-len(pairs) // n_chunks)
    chunks = [pairs[i:i + size] for i in range(0, len(pairs), size)]
    parts, counts = [], {}
    with ProcessPoolExecutor(num_proc, mp_context=multiprocessing.get_context("fork")) as pool:
        results = pool.map(_tokenize_chunk, [(c, tokenizer, policy, chat_template) for c in chunks])
        for (part, part_counts), chunk in zip(results, chunks):
            parts.append(part)
            for k, v in part_counts.items():
                counts[k] = counts.get(k, 0) + v
            if progress is not None:
                progress.update(len(chunk))
    return TokenizedGroups.concat(parts), counts
