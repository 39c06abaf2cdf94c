"""Packed and prefix-shared layouts: structure, exactness against padded on every supported architecture
(rewards and parameter gradients, dense-mask, segment and varlen attention), and refusals."""

import warnings

import pytest
import torch

from helpers import (ARCHS, assert_equal_to_padded, build, edge_pairs, pairs_of, reference_varlen, rewards_and_grads,
                     tiny_config)
from rmfast import attention, layouts
from rmfast.model import enable_activation_checkpointing


def configs():
    for arch in ARCHS:
        for layout in ("packed", "prefix_shared"):
            for how in ("dense", "segments"):
                marks = []
                if how == "segments" and arch in attention.DENSE_ONLY:
                    continue
                yield pytest.param(arch, layout, how, id=f"{arch}-{layout}-{how}", marks=marks)


@pytest.mark.parametrize("arch,layout,how", list(configs()))
def test_rewards_and_gradients_equal_padded(arch, layout, how):
    pairs = edge_pairs()
    idx = list(range(len(pairs)))
    model = build(None, arch)
    ref_r, ref_g = rewards_and_grads(model, layouts.padded(pairs, idx, 0))
    batch = getattr(layouts, layout)(pairs, idx, 0, max_tokens=48)
    got_r, got_g = rewards_and_grads(model, batch, how)
    assert_equal_to_padded(got_r, got_g, ref_r, ref_g)


def test_prefix_shared_positions_and_indices():
    pairs = pairs_of([[1, 5, 6, 7, 2]], [[1, 5, 8, 2]])
    b = layouts.prefix_shared(pairs, [0], pad_id=0)
    assert b.input_ids.tolist() == [[1, 5, 6, 7, 2, 8, 2]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 4, 2, 3]]
    assert b.chosen_index.tolist() == [4] and b.rejected_index.tolist() == [6]
    mask = layouts.dense_mask(b)[0, 0]
    assert mask[5].tolist() == [True, True, False, False, False, True, False]  # rejected sees prefix, not chosen
    assert mask[3].tolist() == [True, True, True, True, False, False, False]
    assert b.tokens == 7 and b.positions == 7


def test_packed_rows_restart_positions_and_respect_capacity():
    pairs = pairs_of([[3, 4, 2], [5, 2]], [[6, 7, 8, 2], [9, 2]])
    b = layouts.packed(pairs, [0, 1], pad_id=0, max_tokens=6)
    assert b.input_ids.shape[1] <= 6
    for pos in b.position_ids.tolist():
        starts = [i for i, p in enumerate(pos) if p == 0]
        assert starts[0] == 0
    flat = b.input_ids.reshape(-1)
    assert flat[b.chosen_index].tolist() == [2, 2] and flat[b.rejected_index].tolist() == [2, 2]
    with pytest.raises(ValueError, match="max_tokens"):
        layouts.packed(pairs, [0, 1], pad_id=0, max_tokens=3)


def test_prefix_sharing_computes_fewer_positions():
    pairs = edge_pairs()
    idx = list(range(len(pairs)))
    padded = layouts.padded(pairs, idx, 0)
    packed = layouts.packed(pairs, idx, 0)
    shared = layouts.prefix_shared(pairs, idx, 0)
    assert shared.tokens < packed.tokens == padded.tokens
    assert shared.positions <= packed.positions < padded.positions


def test_unsupported_architectures_are_refused_with_a_reason():
    from transformers import OPTConfig

    with pytest.raises(ValueError, match="--train.layout padded"):
        attention.check_support(OPTConfig(), "prefix_shared", 512)
    attention.check_support(OPTConfig(), "padded", 512)
    window = tiny_config("gemma2")
    with pytest.raises(ValueError, match="sliding window"):
        attention.check_support(window, "packed", 4096)
    attention.check_support(window, "packed", 64)
    with pytest.raises(ValueError, match="softcapped"):
        attention.check_support(window, "packed", 64, "segments")


def flex_rewards(model, batch):
    model.set_attention("flex")
    out = model(batch)
    return out, torch.cat([out.chosen_rewards, out.rejected_rewards])


@pytest.mark.parametrize("layout", ["packed", "prefix_shared"])
@pytest.mark.parametrize("arch", [a for a in ARCHS if a not in attention.DENSE_ONLY])
def test_flex_attention_rewards_equal_padded(arch, layout):
    # FlexAttention has no CPU backward: on CPU the forward is checked; gradients on CUDA below
    pairs = edge_pairs()
    idx = list(range(len(pairs)))
    model = build(None, arch)
    with torch.no_grad():
        b = layouts.padded(pairs, idx, 0)
        ref = model(b)
        ref = torch.cat([ref.chosen_rewards, ref.rejected_rewards])
        _, got = flex_rewards(model, getattr(layouts, layout)(pairs, idx, 0, max_tokens=layouts.ONE_ROW))
    assert (got - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("rows", [48, layouts.ONE_ROW], ids=["rows", "one-row"])
@pytest.mark.parametrize("layout", ["packed", "prefix_shared"])
def test_flex_block_mask_from_blocks_equals_evaluating_the_mask(layout, rows):
    # the tiles built from the layout's blocks are exactly those create_block_mask finds by evaluating the
    # mask on every (query, key) pair: same partial tiles, same full tiles (small tiles, so many of them)
    from torch.nn.attention.flex_attention import create_block_mask

    pairs = edge_pairs(1)
    batch = getattr(layouts, layout)(pairs, list(range(len(pairs))), 0, max_tokens=rows)
    R, L = batch.input_ids.shape
    ours = attention.block_mask(batch, size=4)
    ref = create_block_mask(ours.mask_mod, R, None, L, L, device="cpu", BLOCK_SIZE=4)

    def tiles(counts, indices):
        return [[sorted(indices[r, 0, t, :counts[r, 0, t]].tolist()) for t in range(counts.shape[-1])]
                for r in range(R)]

    assert tiles(ours.kv_num_blocks, ours.kv_indices) == tiles(ref.kv_num_blocks, ref.kv_indices)
    assert tiles(ours.full_kv_num_blocks, ours.full_kv_indices) == tiles(ref.full_kv_num_blocks, ref.full_kv_indices)
    assert int(ours.full_kv_num_blocks.sum()) > 0 and int(ours.kv_num_blocks.sum()) > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("layout", ["packed", "prefix_shared"])
def test_flex_attention_gradients_equal_padded_on_cuda(layout):
    pairs = edge_pairs()
    idx = list(range(len(pairs)))
    model = build(None, "llama").cuda()
    ref_r, ref_g = rewards_and_grads(model, layouts.padded(pairs, idx, 0).to("cuda"))
    model.zero_grad()
    out, got = flex_rewards(model, getattr(layouts, layout)(pairs, idx, 0, max_tokens=layouts.ONE_ROW).to("cuda"))
    (out.loss + 0.1 * out.chosen_rewards.sum()).backward()
    assert (got.detach() - ref_r).abs().max() <= 1e-4
    for name, p in model.named_parameters():
        g = ref_g[name]
        assert (p.grad - g).abs().max().item() <= 1e-3 * (g.abs().max().item() or 1.0) + 1e-6, name


# ---------------------------------------------------------------- varlen (flash-attention varlen kernels)


def varlen_configs():
    for arch in ARCHS:
        if arch in attention.DENSE_ONLY:
            continue
        for layout in ("packed", "prefix_shared"):
            for rows in ("rows", "one-row"):
                yield pytest.param(arch, layout, rows, id=f"{arch}-{layout}-{rows}")


@pytest.mark.parametrize("arch,layout,rows", list(varlen_configs()))
def test_varlen_attention_equals_padded(reference_kernel, arch, layout, rows):
    # The kernel is the reference above (flash kernels need CUDA and half precision): this checks how the
    # layout becomes varlen blocks — gathers, prefix keys, cumulative lengths, padding — on every
    # architecture; the real kernels are checked against the same reference on CUDA below.
    pairs = edge_pairs()
    idx = list(range(len(pairs)))
    model = build(None, arch)
    ref_r, ref_g = rewards_and_grads(model, layouts.padded(pairs, idx, 0))
    batch = getattr(layouts, layout)(pairs, idx, 0, max_tokens=48 if rows == "rows" else layouts.ONE_ROW)
    plan = attention.varlen_plan(batch)
    assert plan.dense == (rows == "one-row")  # several rows carry padding; one row carries none
    assert (plan.k_index is plan.q_index) == (layout == "packed")
    got_r, got_g = rewards_and_grads(model, batch, "varlen")
    assert_equal_to_padded(got_r, got_g, ref_r, ref_g)


def test_varlen_plan_of_prefix_shared_pairs():
    pairs = pairs_of([[1, 5, 6, 7, 2]], [[1, 5, 8, 2]])
    plan = attention.varlen_plan(layouts.prefix_shared(pairs, [0], pad_id=0))
    # [1 5 | 6 7 2 | 8 2]: prefix+chosen is one block; the rejected block's keys are the prefix, then itself
    assert plan.q_index.tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert plan.k_index.tolist() == [0, 1, 2, 3, 4, 0, 1, 5, 6]
    assert plan.cu_q.tolist() == [0, 5, 7] and plan.cu_k.tolist() == [0, 5, 9]
    assert (plan.max_q, plan.max_k) == (5, 5) and plan.dense


def test_attention_choice_follows_device_dtype_and_kernel(monkeypatch):
    llama = tiny_config("llama")
    llama.hidden_size, llama.head_dim = 64, 16  # compiled FlexAttention takes no smaller heads
    small_heads = tiny_config("llama")  # head_dim 8
    bf16, fp32 = torch.bfloat16, torch.float32
    monkeypatch.setattr(attention, "varlen_kernel", lambda: ("reference", reference_varlen))
    monkeypatch.setattr(attention, "_cuda_capability", lambda: (9, 0))
    assert attention.resolve_attention(llama, "auto", "cpu", bf16) == "segments"
    assert attention.resolve_attention(llama, "auto", "cuda", bf16) == "varlen"
    # torch's kernel has no dropout: a model with attention dropout gets flex
    dropout = tiny_config("llama")
    dropout.hidden_size, dropout.head_dim, dropout.attention_dropout = 64, 16, 0.1
    assert attention.resolve_attention(dropout, "auto", "cuda", bf16) == "flex"
    assert attention.resolve_attention(llama, "auto", "cuda", fp32) == "flex"
    assert attention.resolve_attention(small_heads, "auto", "cuda", fp32) == "segments"
    with pytest.raises(ValueError, match="needs head_dim >= 16, this model has 8"):
        attention.resolve_attention(small_heads, "flex", "cuda", fp32)
    assert attention.resolve_attention(tiny_config("gemma2"), "auto", "cuda", bf16) == "dense"
    with pytest.raises(ValueError, match="bf16 or fp16"):
        attention.resolve_attention(llama, "varlen", "cuda", fp32)
    with pytest.raises(ValueError, match="CUDA"):
        attention.resolve_attention(llama, "varlen", "cpu", bf16)
    with pytest.raises(ValueError, match="no backward on CPU"):
        attention.resolve_attention(llama, "flex", "cpu", fp32)
    monkeypatch.setattr(attention, "_cuda_capability", lambda: (7, 5))  # before Ampere: no flash kernels
    assert attention.resolve_attention(llama, "auto", "cuda", bf16) == "flex"
    with pytest.raises(ValueError, match="Ampere"):
        attention.resolve_attention(llama, "varlen", "cuda", bf16)
    monkeypatch.setattr(attention, "_cuda_capability", lambda: (9, 0))
    monkeypatch.setattr(attention, "varlen_kernel", lambda: (None, None))
    assert attention.resolve_attention(llama, "auto", "cuda", bf16) == "flex"
    with pytest.raises(ValueError, match="varlen kernel"):
        attention.resolve_attention(llama, "varlen", "cuda", bf16)


@pytest.mark.skipif(not torch.cuda.is_available() or attention.varlen_kernel()[0] is None,
                    reason="no CUDA GPU or no varlen kernel")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_varlen_kernel_matches_reference_on_cuda(dtype):
    # The real kernel against the contract: blocks of unequal query and key lengths (bottom-right causal),
    # grouped-query heads, forward and backward.
    torch.manual_seed(0)
    name, kernel = attention.varlen_kernel()
    nq, nk = [5, 1, 130, 7, 64], [5, 4, 130, 19, 200]
    cu = lambda n: torch.tensor([0] + n, device="cuda").cumsum(0, dtype=torch.int32)  # noqa: E731
    q = torch.randn(sum(nq), 4, 64, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(sum(nk), 2, 64, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(sum(nk), 2, 64, device="cuda", dtype=dtype, requires_grad=True)
    up = torch.randn(sum(nq), 4, 64, device="cuda", dtype=torch.float32)
    out = kernel(q, k, v, cu(nq), cu(nk), max(nq), max(nk), 0.125, 0.0)
    grads = torch.autograd.grad((out.float() * up).sum(), (q, k, v))
    x = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = reference_varlen(*x, cu(nq), cu(nk), max(nq), max(nk), 0.125, 0.0)
    ref_grads = torch.autograd.grad((ref * up).sum(), x)
    assert (out.float() - ref).abs().max() <= 2e-2, name
    for g, r in zip(grads, ref_grads):
        assert (g.float() - r).abs().max() <= 2e-2 * r.abs().max(), name


@pytest.mark.skipif(not torch.cuda.is_available() or attention.varlen_kernel()[0] is None,
                    reason="no CUDA GPU or no varlen kernel")
@pytest.mark.parametrize("layout", ["packed", "prefix_shared"])
def test_varlen_attention_follows_padded_on_cuda_in_bf16(layout):
    pairs = edge_pairs()
    idx = list(range(len(pairs)))
    model = build(None, "llama").cuda().to(torch.bfloat16)
    ref_r, ref_g = rewards_and_grads(model, layouts.padded(pairs, idx, 0).to("cuda"))
    batch = getattr(layouts, layout)(pairs, idx, 0, max_tokens=48).to("cuda")
    got_r, got_g = rewards_and_grads(model, batch, "varlen")
    assert (got_r.float() - ref_r.float()).abs().max() <= 3e-2 * (ref_r.float().abs().max() + 1)
    for name, g in ref_g.items():
        assert (got_g[name].float() - g.float()).abs().max() <= 5e-2 * (g.float().abs().max() + 1e-3), name


@pytest.mark.parametrize("how", ["segments", "varlen"])
@pytest.mark.parametrize("layout", ["packed", "prefix_shared"])
def test_gradient_checkpointing_keeps_packed_layouts_exact(reference_kernel, layout, how):
    # the recomputed forward must get the layout's blocks again (they travel as keyword arguments)
    pairs = edge_pairs()
    idx = list(range(len(pairs)))
    model = build(None, "llama")
    ref_r, ref_g = rewards_and_grads(model, layouts.padded(pairs, idx, 0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # transformers' deprecated spelling warns
        enable_activation_checkpointing(model.backbone)
    model.train()
    calls, mlp = [], model.backbone.layers[0].mlp
    forward = mlp.forward
    mlp.forward = lambda *args: calls.append(1) or forward(*args)  # hooks do not see the recomputation
    got_r, got_g = rewards_and_grads(model, layouts.make(layout, pairs, idx, 0, max_tokens=48), how)
    assert len(calls) == 2  # forward, then recomputed in the backward
    assert_equal_to_padded(got_r, got_g, ref_r, ref_g)


def test_activation_checkpointing_uses_the_older_name_where_it_is_the_only_one():
    # transformers 5.17 (the GPU machine's) has gradient_checkpointing_enable alone; later 5.x deprecate it
    calls = []

    class Older:
        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
            calls.append(("gradient", gradient_checkpointing_kwargs))

    class Newer(Older):
        def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None):
            calls.append(("activation", activation_checkpointing_kwargs))

    enable_activation_checkpointing(Older())
    enable_activation_checkpointing(Newer())
    assert calls == [("gradient", {"use_reentrant": False}), ("activation", {"use_reentrant": False})]
