"""Attention for the packed layouts, and which architectures may use them.

- ``dense``: the reference. The layout's blocks become one 4-D mask [R, 1, L, L] handed to transformers
  (boolean for sdpa, additive for eager). Simple, exact, and it pays for every masked-out block.
- ``segments``: an attention function registered with transformers' AttentionInterface. It runs one
  sdpa per block of the layout (a sequence, or a pair's prefix+chosen / rejected parts), so masked-out
  blocks cost nothing and no L×L mask is built.
- ``flex``: torch's FlexAttention with a BlockMask built from the layout (compiled on CUDA), which skips
  empty blocks and builds no L×L mask. FlexAttention has no backward on CPU, so there it serves
  evaluation only.
- ``varlen``: a flash-attention varlen kernel (flash-attn's ``flash_attn_varlen_func`` when installed,
  else torch's ``torch.nn.attention.varlen.varlen_attn``): the layout's tokens as one [T, H, D] stream cut
  into blocks by cumulative lengths. CUDA and bf16/fp16 only. A rejected block's keys are its pair's
  prefix followed by itself (gathered once per layer); the kernels' causal mask is aligned to the bottom
  right when keys outnumber queries, which is exactly "the whole prefix, then causal".

``auto``: varlen on CUDA in bf16/fp16 when a varlen kernel is present, else flex on CUDA; segments on CPU.
"""

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .errors import UserError

ATTENTIONS = ("auto", "dense", "segments", "flex", "varlen")
SEGMENTS = "rmfast_segments"
FLEX = "rmfast_flex"
VARLEN = "rmfast_varlen"
IMPLEMENTATIONS = {"segments": SEGMENTS, "flex": FLEX, "varlen": VARLEN}  # registered with transformers

# Supported for the packed layouts: their attention honours explicit position_ids and a custom mask, and
# the exactness tests pass (tests/test_layouts.py). Softcapped attention (Gemma 2) runs with the dense
# mask only. Anything else is refused for packed layouts rather than run wrong.
SUPPORTED = {"llama", "mistral", "qwen2", "qwen3", "phi3", "gpt2", "gemma2"}
DENSE_ONLY = {"gemma2"}


def check_support(config, layout, max_length, attention="auto"):
    """Raise ValueError, saying why and what to do, when `layout` cannot run exactly on this model."""
    if layout == "padded":
        return
    kind = getattr(config, "model_type", "?")
    if kind not in SUPPORTED:
        raise UserError(f"layout {layout!r} is not supported for {kind} models (not verified to honour custom "
                        f"positions and masks); use --train.layout padded. Supported: {', '.join(sorted(SUPPORTED))}")
    window = getattr(config, "sliding_window", None)
    uses_window = window and getattr(config, "use_sliding_window", True) is not False
    if uses_window and max_length > window:
        raise UserError(f"layout {layout!r}: {kind} uses a {window}-token sliding window, shorter than "
                        f"data.max_length={max_length}; packed masks do not apply it. Lower max_length to "
                        f"{window} or use --train.layout padded")
    if attention in IMPLEMENTATIONS and kind in DENSE_ONLY:
        raise UserError(f"attention {attention!r} does not support {kind} (softcapped attention); use dense or auto")


HALF = (torch.float16, torch.bfloat16)


def resolve_attention(config, attention, device_type="cpu", dtype=torch.float32, training=True):
    """The attention a packed layout runs with: `attention` itself, checked against the device and dtype,
    or the best one for them when 'auto'. training=False (scoring) allows flex on CPU (forward only)."""
    if attention == "auto":
        if getattr(config, "model_type", "") in DENSE_ONLY:
            return "dense"
        if device_type != "cuda":
            return "segments"
        if _varlen_runs(config, dtype):
            return "varlen"
        return "flex" if _head_dim(config) >= FLEX_MIN_HEAD_DIM else "segments"
    if attention == "flex" and device_type != "cuda" and training:
        raise UserError("attention 'flex': FlexAttention has no backward on CPU; use segments (or auto)")
    if attention == "flex" and device_type == "cuda" and _head_dim(config) < FLEX_MIN_HEAD_DIM:
        raise UserError(f"attention 'flex': compiled FlexAttention needs head_dim >= {FLEX_MIN_HEAD_DIM}, this "
                        f"model has {_head_dim(config)}; use segments (or varlen in bf16/fp16)")
    if attention == "varlen":
        name, _ = varlen_kernel()
        if device_type != "cuda" or not name:
            raise UserError("attention 'varlen' needs a CUDA GPU and a flash-attention varlen kernel (flash-attn "
                            "installed, or a torch that has torch.nn.attention.varlen); use flex or auto")
        if dtype not in HALF:
            raise UserError("attention 'varlen' (flash attention) runs in bf16 or fp16 only; set --model.dtype "
                            "bf16, or use flex or auto")
        if _cuda_capability() < (8, 0):
            raise UserError(f"attention 'varlen' (flash attention) needs an Ampere or newer GPU (compute "
                            f"capability 8.0); this one is {'.'.join(map(str, _cuda_capability()))}. Use flex or auto")
    return attention


FLEX_MIN_HEAD_DIM = 16  # torch's compiled FlexAttention kernel (torch 2.11) refuses smaller heads


def _head_dim(config):
    heads = getattr(config, "num_attention_heads", 0) or 1
    return getattr(config, "head_dim", None) or getattr(config, "hidden_size", 0) // heads


def row_tokens(attention, device_type):
    """Packed rows' capacity for `attention`: one row per micro-batch (layouts.ONE_ROW) where attention
    pays only for the blocks, so there is no row padding at all; None (rows as long as the longest unit)
    where it builds L×L — the dense mask, and FlexAttention off CUDA (uncompiled, it materializes scores)."""
    from .layouts import ONE_ROW

    if attention == "dense" or (attention == "flex" and device_type != "cuda"):
        return None
    return ONE_ROW


def _cuda_capability():
    return torch.cuda.get_device_capability() if torch.cuda.is_available() else (0, 0)


def _varlen_runs(config, dtype):
    """Whether a varlen kernel can run this model here: half precision, an Ampere or newer GPU, and, for
    torch's kernel (which has no dropout), no attention dropout."""
    name, _ = varlen_kernel()
    if not name or dtype not in HALF or _cuda_capability() < (8, 0):
        return False
    return name == "flash-attn" or not getattr(config, "attention_dropout", 0.0)


@functools.cache  # one import attempt per process, not one per forward
def varlen_kernel():
    """(name, fn) of the flash-attention varlen kernel to use, or (None, None). fn(q [Tq, Hq, D], k / v
    [Tk, Hkv, D], cu_q, cu_k (int32 [N + 1]), max_q, max_k, scale, dropout) → [Tq, Hq, D], causal, with
    the mask aligned to the bottom right of each block (query i of n sees keys up to i + m - n of m)."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        pass
    else:
        def run_flash_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale, dropout):
            return flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=dropout,
                                          softmax_scale=scale, causal=True)

        return "flash-attn", run_flash_attn
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, None
    return "torch varlen_attn", torch_varlen_adapter(varlen_attn)


def torch_varlen_adapter(varlen_attn):
    """The varlen_kernel contract over torch's varlen_attn, whose keywords differ between torch versions:
    causal is `window_size=(-1, 0)` in newer ones and `is_causal=True` in older ones (both bottom-right
    aligned, FA2 semantics); without `scale` the queries are pre-scaled; without `enable_gqa` the key and
    value heads are repeated."""
    import inspect

    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:
        causal = {"window_size": (-1, 0)}  # key j is seen by query i when j <= i + max(0, m - n)
    elif "is_causal" in params:
        causal = {"is_causal": True}
    else:
        raise RuntimeError(f"torch's varlen_attn{inspect.signature(varlen_attn)} takes neither window_size nor "
                           f"is_causal; use --train.attention flex")
    has_scale, has_gqa = "scale" in params, "enable_gqa" in params

    def run_torch_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale, dropout):
        if dropout:
            raise UserError("torch's varlen_attn has no attention dropout; install flash-attn, or use "
                            "--train.attention flex, or a model config with attention_dropout 0")
        kw = dict(causal)
        if scale is not None:
            if has_scale:
                kw["scale"] = scale
            else:  # the kernel's own scale is 1/sqrt(D)
                q = q * (scale * q.shape[-1] ** 0.5)
        if q.shape[1] != k.shape[1]:
            if has_gqa:
                kw["enable_gqa"] = True
            else:
                groups = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **kw)

    return run_torch_varlen


def _prefix_causal_mask(n, p, device, cache=None):
    """[n, p + n] bool: all p prefix keys, then causal over the block's own n keys. `cache`: a dict that
    lives for one forward (model_inputs makes it), so every layer reuses the masks of the first."""
    if cache is not None and (n, p) in cache:
        return cache[n, p]
    mask = torch.ones(n, p + n, dtype=torch.bool, device=device)
    mask[:, p:] = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    if cache is not None:
        cache[n, p] = mask
    return mask


def segment_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query [B, Hq, L, D], key / value [B, Hkv, L, D] → ([B, L, Hq, D], None), one sdpa per block.

    Each row is split once into its blocks (and padding gaps), so that the backward joins the pieces'
    gradients in one op per tensor, instead of one full-size zero tensor per slice and block."""
    blocks = kwargs.get("rmfast_blocks")
    if blocks is None:
        raise RuntimeError("segment attention needs the layout's blocks (pass rmfast_blocks=batch.blocks)")
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    drop = dropout if module.training else 0.0
    B, H, L, D = query.shape
    by_row = [[] for _ in range(B)]
    for b in blocks:
        by_row[b.row].append(b)
    rows = []
    for r, (q_row, k_row, v_row) in enumerate(zip(query.unbind(0), key.unbind(0), value.unbind(0))):
        row = sorted(by_row[r], key=lambda b: b.q0)
        sizes, which, at = [], [], 0  # which: the piece of each block
        for b in row:
            if b.q0 > at:  # padding
                sizes.append(b.q0 - at)
            which.append(len(sizes))
            sizes.append(b.q1 - b.q0)
            at = b.q1
        if at < L:
            sizes.append(L - at)
        qs, ks, vs = q_row.split(sizes, dim=1), k_row.split(sizes, dim=1), v_row.split(sizes, dim=1)
        starts = {b.q0: i for b, i in zip(row, which)}
        outs = [None] * len(sizes)
        for b, i in zip(row, which):
            q, k, v = qs[i], ks[i], vs[i]
            if b.prefix is None:
                outs[i] = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, dropout_p=drop)
                continue
            p0, p1 = b.prefix
            j = starts[p0]  # the pair's prefix opens its prefix+chosen block
            k = torch.cat([ks[j][:, :p1 - p0], k], dim=1)
            v = torch.cat([vs[j][:, :p1 - p0], v], dim=1)
            mask = _prefix_causal_mask(b.q1 - b.q0, p1 - p0, q.device, kwargs.get("rmfast_masks"))
            outs[i] = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, dropout_p=drop)
        for i, o in enumerate(outs):
            if o is None:  # padding positions: zeros (never read)
                outs[i] = query.new_zeros(H, sizes[i], D)
        rows.append(torch.cat(outs, dim=1))
    return torch.stack(rows).transpose(1, 2).contiguous(), None


_compiled_flex = None


def flex_attention_fn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query [B, Hq, L, D], key / value [B, Hkv, L, D] → ([B, L, Hq, D], None) through FlexAttention."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    block_mask = kwargs.get("rmfast_block_mask")
    if block_mask is None:
        raise RuntimeError("flex attention needs the layout's BlockMask (pass rmfast_block_mask=...)")
    fn = flex_attention
    if query.is_cuda:  # eager FlexAttention is a slow reference; compiled, it is a fused kernel
        if _compiled_flex is None:
            # default dynamic: the first change of row length recompiles once with a symbolic length, and
            # later lengths reuse it (dynamic=False would recompile for every new length, then fall back
            # to eager once dynamo's recompile limit is reached)
            _compiled_flex = torch.compile(flex_attention)
        fn = _compiled_flex
    out = fn(query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


def _unit_and_kind(batch):
    """Per position: its unit (sequence, pair or group; -1 for padding) and kind (0 the shared prefix or a
    whole sequence, then 1, 2, … for the unit's first, second, … response: chosen / rejected for a pair),
    [R, L] int64 each. A token sees earlier tokens of its unit of kind 0 or of its own kind."""
    R, L = batch.input_ids.shape
    unit = torch.full((R, L), -1, dtype=torch.long)
    kind = torch.zeros((R, L), dtype=torch.long)
    for u, b in enumerate(x for x in batch.blocks if x.prefix is None):
        unit[b.row, b.q0:b.q1] = u
    later = {}  # (row, prefix start) → responses laid after the first
    for b in batch.blocks:
        if b.prefix is not None:
            p0, p1 = b.prefix
            n = later.get((b.row, p0), 0)
            later[b.row, p0] = n + 1
            unit[b.row, b.q0:b.q1] = unit[b.row, p0]
            if n == 0:  # the first response shares its block with the prefix
                kind[b.row, p1:b.q0] = 1
            kind[b.row, b.q0:b.q1] = 2 + n
    return unit, kind


def block_tiles(batch, size, unit, kind):
    """Which size×size tiles of each row's attention have something to compute: (any [R, T, T], full
    [R, T, T]) booleans, T = ceil(L / size), straight from the layout's blocks and their per-position
    unit / kind (_unit_and_kind) — O(L) work and memory, where evaluating the mask on every (query, key)
    pair is O(L²)."""
    R, L = batch.input_ids.shape
    T = -(-L // size)
    any_ = np.zeros((R, T, T), dtype=bool)
    for b in batch.blocks:
        t0, t1 = b.q0 // size, (b.q1 - 1) // size
        for qt in range(t0, t1 + 1):  # causal part: keys from the block's start up to the query
            any_[b.row, qt, t0:qt + 1] = True
        if b.prefix is not None and b.prefix[1] > b.prefix[0]:
            any_[b.row, t0:t1 + 1, b.prefix[0] // size:(b.prefix[1] - 1) // size + 1] = True
    diag = np.arange(T)
    any_[:, diag, diag] = True  # padding sees itself
    # a tile is full when all its queries and keys belong to one unit, every key precedes every query, and
    # no query meets a key of another response
    unit, kind = unit.numpy(), kind.numpy()
    pad = T * size - L
    unit = np.pad(unit, ((0, 0), (0, pad)), constant_values=-1).reshape(R, T, size)
    kind = np.pad(kind, ((0, 0), (0, pad))).reshape(R, T, size)
    one = (unit.min(-1) == unit.max(-1)) & (unit.min(-1) >= 0)  # [R, T]
    same = one[:, :, None] & one[:, None, :] & (unit[:, :, None, 0] == unit[:, None, :, 0])
    before = diag[None, :] < diag[:, None]  # key tile strictly before query tile: every key precedes
    # every key visible to every query: the key tile is all prefix, or it and the query tile are one response
    top = kind.max(-1)  # [R, T]
    low = np.where(kind == 0, np.iinfo(np.int64).max, kind).min(-1)  # smallest response kind in the tile
    single = (kind.min(-1) == top)[:, :, None] & (low == top)[:, None, :] & (top[:, :, None] == top[:, None, :])
    visible = (top == 0)[:, None, :] | single
    full = same & before[None] & visible & any_
    return torch.from_numpy(any_), torch.from_numpy(full)


def block_mask(batch, device=None, size=128):
    """A FlexAttention BlockMask for a packed batch: a token sees earlier tokens of its own unit (a
    sequence, a pair or a group) that are its prefix or its own response (a rejected response never sees
    the chosen one, nor one response of a group another); padding sees itself only. The tiles come from
    the blocks (block_tiles), so no L×L mask is ever evaluated."""
    from torch.nn.attention.flex_attention import BlockMask

    R, L = batch.input_ids.shape
    device = device or batch.input_ids.device
    unit_cpu, kind_cpu = _unit_and_kind(batch)
    any_, full = block_tiles(batch, size, unit_cpu, kind_cpu)
    unit, kind = unit_cpu.to(device), kind_cpu.to(device)

    def mask_mod(b, h, q, k):
        own = (kind[b, k] == 0) | (kind[b, k] == kind[b, q])  # the prefix, or the query's own response
        same = (unit[b, q] == unit[b, k]) & (k <= q) & own
        return (same & (unit[b, q] >= 0)) | (q == k)

    def sparse(tiles):  # [R, T, T] bool → counts [R, 1, T] int32, indices [R, 1, T, T] int32 (listed first)
        counts = tiles.sum(-1, dtype=torch.int32)
        order = torch.argsort((~tiles).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return counts[:, None].to(device), order[:, None].to(device)

    partial, complete = sparse(any_ & ~full), sparse(full)
    return BlockMask.from_kv_blocks(*partial, *complete, BLOCK_SIZE=size, mask_mod=mask_mod, seq_lengths=(L, L))


@dataclass
class VarlenPlan:
    """A packed batch as varlen blocks: q_index / k_index [T] flat positions (row·L + column) of each
    block's queries / keys, block after block; cu_q / cu_k int32 cumulative lengths; max lengths as
    Python ints (no device sync); dense: the blocks cover every position in order (no gather needed)."""

    q_index: torch.Tensor
    k_index: torch.Tensor
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    dense: bool
    kernel: object


def varlen_plan(batch, device=None):
    device = device or batch.input_ids.device
    q_parts, k_parts, nq, nk = [], [], [0], [0]
    L = batch.input_ids.shape[1]
    for b in batch.blocks:
        q = torch.arange(b.row * L + b.q0, b.row * L + b.q1)
        q_parts.append(q)
        if b.prefix is None:
            k_parts.append(q)
            nk.append(b.q1 - b.q0)
        else:
            p0, p1 = b.prefix
            k_parts.append(torch.cat([torch.arange(b.row * L + p0, b.row * L + p1), q]))
            nk.append(p1 - p0 + b.q1 - b.q0)
        nq.append(b.q1 - b.q0)
    q_index = torch.cat(q_parts)
    dense = q_index.numel() == batch.input_ids.numel() and bool((q_index == torch.arange(q_index.numel())).all())
    shared_keys = all(b.prefix is None for b in batch.blocks)
    k_index = q_index if shared_keys else torch.cat(k_parts)
    # one host-to-device copy for all of it (pinned on CUDA, so it does not wait for the GPU)
    parts = [q_index, torch.tensor(nq).cumsum(0), torch.tensor(nk).cumsum(0)] + ([] if shared_keys else [k_index])
    flat = torch.cat(parts)
    if torch.device(device).type == "cuda":
        flat = flat.pin_memory().to(device, non_blocking=True)
    q_index, cu_q, cu_k, *rest = flat.split([len(p) for p in parts])
    k_index = q_index if shared_keys else rest[0]
    _, kernel = varlen_kernel()
    return VarlenPlan(q_index, k_index, cu_q.int(), cu_k.int(), max(nq), max(nk), dense, kernel)


def varlen_attention_fn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query [B, Hq, L, D], key / value [B, Hkv, L, D] → ([B, L, Hq, D], None) through a varlen kernel."""
    plan = kwargs.get("rmfast_varlen")
    if plan is None:
        raise RuntimeError("varlen attention needs the layout's plan (pass rmfast_varlen=varlen_plan(batch))")
    if plan.kernel is None:
        raise RuntimeError("no flash-attention varlen kernel: install flash-attn or a torch that has "
                           "torch.nn.attention.varlen")
    B, Hq, L, D = query.shape
    flat = lambda t: t.transpose(1, 2).reshape(B * L, t.shape[1], D)  # noqa: E731  [B·L, H, D]
    q, k, v = flat(query), flat(key), flat(value)
    if not plan.dense:
        q = q.index_select(0, plan.q_index)
    if plan.k_index is not plan.q_index or not plan.dense:  # prefix keys gathered before each rejected block
        k, v = k.index_select(0, plan.k_index), v.index_select(0, plan.k_index)
    out = plan.kernel(q, k, v, plan.cu_q, plan.cu_k, plan.max_q, plan.max_k, scaling,
                      dropout if module.training else 0.0)
    if not plan.dense:  # padding positions: zeros (never read)
        out = out.new_zeros(B * L, Hq, D).index_copy(0, plan.q_index, out)
    return out.reshape(B, L, Hq, D), None


def _no_mask(*args, **kwargs):
    return None  # the blocks are the mask


_registered = False


def register():
    """Make rmfast's attentions (IMPLEMENTATIONS) ones that transformers models can be switched to."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register(SEGMENTS, segment_attention)
        AttentionMaskInterface.register(SEGMENTS, _no_mask)
        AttentionInterface.register(FLEX, flex_attention_fn)
        AttentionMaskInterface.register(FLEX, _no_mask)
        AttentionInterface.register(VARLEN, varlen_attention_fn)
        AttentionMaskInterface.register(VARLEN, _no_mask)
        _registered = True


def model_inputs(batch, attention, dtype=torch.float32, eager=False):
    """The attention-related inputs of a backbone forward for `batch` under `attention`."""
    if batch.blocks is None:  # padded: the backbone's own attention (RewardModel.set_attention("dense"))
        if attention in IMPLEMENTATIONS:
            raise ValueError(f"a padded batch needs the backbone's own attention, not {attention!r}: "
                             f"set_attention('dense') first")
        return {"attention_mask": batch.attention_mask, "position_ids": batch.position_ids}
    if attention == "segments":
        return {"attention_mask": None, "position_ids": batch.position_ids, "rmfast_blocks": batch.blocks,
                "rmfast_masks": {}}
    if attention == "flex":
        return {"attention_mask": None, "position_ids": batch.position_ids, "rmfast_block_mask": block_mask(batch)}
    if attention == "varlen":
        return {"attention_mask": None, "position_ids": batch.position_ids, "rmfast_varlen": varlen_plan(batch)}
    from .layouts import dense_mask

    mask = dense_mask(batch).to(batch.input_ids.device)
    if eager:  # eager attention adds the mask to the scores
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return {"attention_mask": mask, "position_ids": batch.position_ids}
