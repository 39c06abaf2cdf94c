"""Groups (a prompt with K ranked or scored responses) in one forward: the prefix-shared group layout's
structure, its exactness against every response padded alone (rewards and every parameter gradient, on
every supported architecture, with dense, segment and varlen attention), the group loss's weightings and
margin, and K = 2 being today's pair path."""

import numpy as np
import pytest
import torch

from conftest import backend_device_params
from helpers import ARCHS, assert_equal_to_padded, build, edge_pairs, rewards_and_grads
from rmfast import attention, layouts
from rmfast.data.group_tokens import TokenizedGroups, common_prefix_all
from rmfast.group_metrics import group_metrics
from rmfast.objective import reward_loss
from rmfast.loss import pairwise_reward_loss


def groups_of(seqsets, scores, weights=None):
    """TokenizedGroups from whole sequences (lists of id lists), the prompt being their longest common
    prefix capped so that each response keeps a token, as tokenization makes it."""
    prompts, responses = [], []
    for seqs in seqsets:
        s = min(common_prefix_all(seqs), min(len(x) for x in seqs) - 1)
        prompts.append(np.array(seqs[0][:s], np.int32))
        responses.append([np.array(x[s:], np.int32) for x in seqs])
    return TokenizedGroups(prompts, responses, [np.array(x, np.float32) for x in scores], weights)


def edge_groups(seed=0):
    rng = np.random.default_rng(seed)
    seqsets, scores = [], []
    for K in (3, 4, 2, 5):  # a shared prompt, then K different responses, distinct scores
        p = list(rng.integers(3, 96, rng.integers(2, 9)))
        seqsets.append([p + list(rng.integers(3, 96, rng.integers(1, 6))) + [2] for _ in range(K)])
        scores.append(list(rng.permutation(K)))
    seqsets.append([[5, 6, 7, 2], [5, 6, 7, 8, 2], [5, 6, 7, 8, 9, 2]])  # responses prefixes of one another
    scores.append([0, 2, 1])
    seqsets.append([[5, 6, 2], [5, 6, 7, 2], [5, 6, 8, 2]])  # one-token responses ([2] alone)
    scores.append([1, 0, 2])
    seqsets.append([[5, 6], [5, 6, 7]])  # the prompt capped so that each response keeps a token
    scores.append([1, 0])
    seqsets.append([[4, 3, 9, 2], [4, 3, 8, 2], [4, 3, 7, 7, 2], [4, 3, 6, 2]])  # ties: 4 comparisons of 6
    scores.append([1, 1, 0, 0])
    seqsets.append([[9, 2], [10, 2], [11, 12, 2]])  # nothing in common
    scores.append([0.5, 3.0, -1.0])
    weights = np.linspace(0.5, 2.0, len(seqsets))
    return groups_of(seqsets, scores, weights)


def group_rewards_and_grads(model, batch, how="dense", center_coef=0.0):
    """Rewards of every comparison's better then worse response ([2C]) and every parameter's gradient (the
    batch carries the objective's margins and weights: rmfast.layouts)."""
    model.zero_grad()
    model.set_attention(how)
    out = model(batch, center_coef=center_coef)
    (out.loss + 0.1 * out.chosen_rewards.sum()).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return torch.cat([out.chosen_rewards, out.rejected_rewards]).detach(), grads


def configs():
    for arch in ARCHS:
        for how, rows in (("dense", 40), ("segments", 40), ("segments", layouts.ONE_ROW), ("varlen", 40),
                          ("varlen", layouts.ONE_ROW)):
            if how != "dense" and arch in attention.DENSE_ONLY:
                continue
            yield pytest.param(arch, how, rows, id=f"{arch}-{how}-{'one-row' if rows == layouts.ONE_ROW else 'rows'}")


# ---------------------------------------------------------------- exactness against every response padded alone


@pytest.mark.parametrize("arch,how,rows", list(configs()))
def test_group_rewards_and_gradients_equal_padded(reference_kernel, arch, how, rows):
    groups = edge_groups()
    idx = list(range(len(groups)))
    model = build(None, arch)
    ref_r, ref_g = group_rewards_and_grads(model, layouts.padded(groups, idx, 0))
    batch = layouts.prefix_shared(groups, idx, 0, max_tokens=rows)
    if rows == layouts.ONE_ROW:
        assert batch.input_ids.shape[0] == 1
    got_r, got_g = group_rewards_and_grads(model, batch, how)
    assert_equal_to_padded(got_r, got_g, ref_r, ref_g)


@pytest.mark.parametrize("weighting", ["comparison", "group"])
@pytest.mark.parametrize("margin_scale", [0.0, 0.5])
def test_every_loss_option_is_exact_too(weighting, margin_scale):
    groups = edge_groups(1)
    idx = list(range(len(groups)))
    model = build(None, "qwen3", bias=True)
    objective = dict(weighting=weighting, margin_scale=margin_scale)
    ref_r, ref_g = group_rewards_and_grads(model, layouts.padded(groups, idx, 0, **objective), center_coef=0.01)
    got_r, got_g = group_rewards_and_grads(model, layouts.prefix_shared(groups, idx, 0, max_tokens=40, **objective),
                                           "segments", center_coef=0.01)
    assert_equal_to_padded(got_r, got_g, ref_r, ref_g)


def test_every_response_reward_equals_padded():
    groups = edge_groups(2)
    idx = list(range(len(groups)))
    model = build(None, "llama")
    ref = model.rewards(padded := layouts.padded(groups, idx, 0), padded.response_index)
    model.set_attention("segments")
    got = model.rewards(batch := layouts.prefix_shared(groups, idx, 0), batch.response_index)
    assert (got - ref).abs().max() <= 1e-5
    assert torch.equal(batch.response_group, padded.response_group)


@pytest.mark.parametrize("how", ["dense", "segments"])
def test_packed_groups_rewards_and_gradients_equal_padded(how):
    # one layout family for every K: packed lays every response out as its own whole sequence
    groups = edge_groups(4)
    idx = list(range(len(groups)))
    model = build(None, "qwen2", bias=True)
    objective = dict(weighting="group", margin_scale=0.25)
    ref_r, ref_g = group_rewards_and_grads(model, layouts.padded(groups, idx, 0, **objective))
    batch = layouts.packed(groups, idx, 0, max_tokens=24, **objective)
    assert batch.input_ids.shape[0] > 1 and batch.tokens == int(groups.lengths("packed").sum())
    got_r, got_g = group_rewards_and_grads(model, batch, how)
    assert_equal_to_padded(got_r, got_g, ref_r, ref_g)


# ---------------------------------------------------------------- structure


def test_group_layout_positions_blocks_and_indices():
    # prompt [1 5] once, then r1 [6 7 2], r2 [8 2], r3 [2]; scores rank r2 > r1 > r3
    groups = groups_of([[[1, 5, 6, 7, 2], [1, 5, 8, 2], [1, 5, 2]]], [[1.0, 2.0, 0.0]])
    b = layouts.prefix_shared(groups, [0], pad_id=0)
    assert b.input_ids.tolist() == [[1, 5, 6, 7, 2, 8, 2, 2]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 4, 2, 3, 2]]  # each response restarts at the prompt length
    assert b.blocks == [layouts.Block(0, 0, 5), layouts.Block(0, 5, 7, (0, 2)), layouts.Block(0, 7, 8, (0, 2))]
    assert b.response_index.tolist() == [4, 6, 7]
    # comparisons (better, worse) in row-major order of the response pairs: (r2, r1), (r1, r3), (r2, r3)
    assert b.chosen_index.tolist() == [6, 4, 6] and b.rejected_index.tolist() == [4, 7, 7]
    assert b.score_diff.tolist() == [1.0, 1.0, 2.0] and b.comparison_group.tolist() == [0, 0, 0]
    mask = layouts.dense_mask(b)[0, 0]
    assert mask[6].tolist() == [True, True, False, False, False, True, True, False]  # r2: prompt and itself
    assert mask[7].tolist() == [True, True, False, False, False, False, False, True]  # r3: never r1 or r2
    assert b.tokens == b.positions == 8 and b.pairs == 3 and b.groups == 1


def test_ties_give_no_comparison():
    groups = groups_of([[[4, 3, 9, 2], [4, 3, 8, 2], [4, 3, 7, 2], [4, 3, 6, 2]]], [[1, 1, 0, 0]])
    b = layouts.prefix_shared(groups, [0], 0)
    better, worse = b.chosen_index.tolist(), b.rejected_index.tolist()
    assert len(better) == 4 and set(better) == set(b.response_index[:2].tolist())
    assert set(worse) == set(b.response_index[2:].tolist())


def test_groups_pack_first_fit_and_a_group_too_long_is_refused_not_split():
    groups = edge_groups()
    b = layouts.prefix_shared(groups, range(len(groups)), 0, max_tokens=40)
    assert b.input_ids.shape[1] <= 40 and b.input_ids.shape[0] > 1
    longest = int(layouts.costs(groups, "prefix_shared")[0].max())
    with pytest.raises(ValueError, match=f"takes {longest} tokens.*raise max_tokens.*to at least {longest}"):
        layouts.prefix_shared(groups, range(len(groups)), 0, max_tokens=longest - 1)


def test_prefix_sharing_computes_each_prompt_once():
    groups = edge_groups()
    idx = list(range(len(groups)))
    shared, padded = layouts.prefix_shared(groups, idx, 0), layouts.padded(groups, idx, 0)
    prompts = sum(len(p) * (len(r) - 1) for p, r in zip(groups.prompt, groups.responses))
    assert shared.tokens == padded.tokens - prompts
    costs, combine = layouts.costs(groups, "prefix_shared")
    assert combine == "sum" and int(costs.sum()) == shared.tokens
    assert layouts.costs(groups, "padded")[1] == "max"


def test_group_batch_keeps_its_fields_on_the_way_to_a_device():
    b = layouts.prefix_shared(edge_groups(), [0, 1], 0)
    moved = b.to("cpu")
    assert isinstance(moved, layouts.Batch) and torch.equal(moved.comparison_group, b.comparison_group)
    assert torch.equal(moved.group_weight, b.group_weight)


# ---------------------------------------------------------------- K = 2 is the pair path


@pytest.mark.parametrize("weighting", ["comparison", "group"])
def test_groups_of_two_give_the_plain_pair_loss_and_gradients(weighting):
    # a pair has one comparison: either weighting is the mean over pairs of softplus(-(r_c - r_r)), as every
    # pair trainer computes it on right-padded rows
    pairs = edge_pairs(3)
    idx = list(range(len(pairs)))
    model = build(None, "mistral")
    padded = layouts.padded(pairs, idx, 0)
    assert padded.comparison_weight is None and padded.margin is None
    ref_r, ref_g = rewards_and_grads(model, padded)
    with torch.no_grad():
        r = model.head.rewards(model.hidden_states(padded).reshape(-1, model.head.weight.shape[0]))
        plain = torch.nn.functional.softplus(-(r[padded.chosen_index] - r[padded.rejected_index])).mean()
        assert float(model(padded).loss) == pytest.approx(float(plain), rel=1e-5)
    batch = layouts.prefix_shared(pairs, idx, 0, weighting=weighting)
    got_r, got_g = group_rewards_and_grads(model, batch, "segments")
    assert_equal_to_padded(got_r, got_g, ref_r, ref_g)


def test_a_pair_s_margin_column_reaches_its_comparison_and_zero_is_not_a_tie():
    pairs = edge_pairs()
    pairs.margin[:] = np.nan
    pairs.margin[1], pairs.margin[2] = 1.5, 0.0
    batch = layouts.prefix_shared(pairs, range(len(pairs)), 0)
    assert batch.pairs == len(pairs)  # the zero margin keeps its comparison
    expected = np.zeros(len(pairs), np.float32)
    expected[1] = 1.5
    assert batch.margin.tolist() == expected.tolist()
    assert layouts.prefix_shared(pairs, range(len(pairs)), 0, use_margin=False).margin is None
    scaled = layouts.prefix_shared(pairs, range(len(pairs)), 0, margin_scale=0.5)
    assert scaled.margin.tolist() == (expected + 0.5).tolist()  # a pair's scores differ by 1


# ---------------------------------------------------------------- the loss's options


def per_comparison(batch, margin=None):
    hidden = torch.randn(batch.input_ids.numel(), 8, generator=torch.Generator().manual_seed(0))
    weight = torch.randn(8, generator=torch.Generator().manual_seed(1))
    terms = pairwise_reward_loss(hidden, weight, batch.chosen_index, batch.rejected_index, margin=margin,
                                 reduction="none").loss
    return hidden, weight, terms


def test_each_comparison_counts_the_same_by_default():
    groups = edge_groups()
    groups.weight[:] = 1.0
    batch = layouts.prefix_shared(groups, range(len(groups)), 0)
    assert batch.comparison_weight is None
    hidden, weight, terms = per_comparison(batch)
    assert torch.allclose(reward_loss(hidden, weight, batch).loss, terms.mean())


def test_each_group_counts_the_same_with_group_weighting():
    groups = edge_groups()
    batch = layouts.prefix_shared(groups, range(len(groups)), 0, weighting="group")
    hidden, weight, terms = per_comparison(batch)
    g = batch.comparison_group
    means = torch.stack([terms[g == k].mean() for k in range(batch.groups)])  # InstructGPT: per-group mean
    expected = (means * batch.group_weight).sum() / batch.groups  # a group of weight w counts w times
    assert torch.allclose(reward_loss(hidden, weight, batch).loss, expected)
    counts = torch.bincount(g).float()
    assert torch.allclose(batch.comparison_weight, batch.group_weight[g] / counts[g])
    with pytest.raises(ValueError, match="weighting"):
        layouts.prefix_shared(groups, range(len(groups)), 0, weighting="pair")


def test_margin_is_the_scaled_score_difference_and_off_by_default():
    groups = edge_groups()
    groups.weight[:] = 1.0
    batch = layouts.prefix_shared(groups, range(len(groups)), 0, margin_scale=0.5)
    hidden, weight, terms = per_comparison(batch, margin=0.5 * batch.score_diff)
    assert torch.allclose(reward_loss(hidden, weight, batch).loss, terms.mean())
    assert layouts.prefix_shared(groups, range(len(groups)), 0).margin is None


# ---------------------------------------------------------------- FlexAttention (forward on CPU)


@pytest.mark.parametrize("K", [2, 5])
@pytest.mark.parametrize("arch", [a for a in ARCHS if a not in attention.DENSE_ONLY])
def test_flex_attention_rewards_equal_padded(arch, K):
    # FlexAttention has no CPU backward: on CPU the forward is checked; gradients on CUDA below
    groups = edge_groups() if K > 2 else edge_pairs()
    idx = [i for i in range(len(groups)) if len(groups.responses[i]) <= K]
    model = build(None, arch)
    with torch.no_grad():
        ref = model.rewards(p := layouts.padded(groups, idx, 0), p.response_index)
        model.set_attention("flex")
        got = model.rewards(b := layouts.prefix_shared(groups, idx, 0, layouts.ONE_ROW), b.response_index)
    assert (got - ref).abs().max() <= 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_flex_attention_group_gradients_equal_padded_on_cuda():
    groups = edge_groups()
    idx = list(range(len(groups)))
    model = build(None, "llama").cuda()
    ref_r, ref_g = group_rewards_and_grads(model, layouts.padded(groups, idx, 0).to("cuda"))
    got_r, got_g = group_rewards_and_grads(model, layouts.prefix_shared(groups, idx, 0, layouts.ONE_ROW).to("cuda"),
                                           "flex")
    assert (got_r - ref_r).abs().max() <= 1e-4
    for name, g in ref_g.items():
        assert (got_g[name] - g).abs().max().item() <= 1e-3 * (g.abs().max().item() or 1.0) + 1e-6, name


# ---------------------------------------------------------------- evaluation metrics


@pytest.mark.parametrize("order,expected", [
    ("scores", (1.0, 1.0, 1.0)),       # rewards in the scores' order: everything right
    ("reversed", (0.0, 0.0, -1.0)),    # every comparison reversed
])
def test_group_metrics_of_perfect_and_reversed_rewards(order, expected):
    groups = edge_groups()
    batch = layouts.prefix_shared(groups, range(len(groups)), 0)
    rewards = batch.response_scores * (1 if order == "scores" else -1)
    m = group_metrics(rewards, batch)
    assert (m["comparison_accuracy"], m["top1_accuracy"], m["kendall_tau"]) == expected
    assert m["comparisons"] == batch.pairs and m["groups"] == len(groups)


def test_kendall_tau_is_per_group_then_averaged():
    # group 0: 3 comparisons, one reversed (τ = 1/3); group 1: one comparison, right (τ = 1)
    groups = groups_of([[[5, 2], [6, 2], [7, 2]], [[8, 2], [9, 2]]], [[2, 1, 0], [1, 0]])
    batch = layouts.padded(groups, [0, 1], 0)
    m = group_metrics(torch.tensor([2.0, 0.0, 1.0, 1.0, 0.0]), batch)
    assert m["kendall_tau"] == pytest.approx((1 / 3 + 1) / 2) and m["comparison_accuracy"] == 0.75
    assert m["top1_accuracy"] == 1.0


@pytest.mark.parametrize("rows", [48, layouts.ONE_ROW], ids=["rows", "one-row"])
def test_flex_block_mask_of_groups_equals_evaluating_the_mask(rows):
    # as for pairs (tests/test_layouts.py): the tiles built from the blocks are those create_block_mask finds
    from torch.nn.attention.flex_attention import create_block_mask

    groups = edge_groups(1)
    batch = layouts.prefix_shared(groups, list(range(len(groups))), 0, rows)
    R, L = batch.input_ids.shape
    ours = attention.block_mask(batch, size=4)
    ref = create_block_mask(ours.mask_mod, R, None, L, L, device="cpu", BLOCK_SIZE=4)

    def tiles(counts, indices):
        return [[sorted(indices[r, 0, t, :counts[r, 0, t]].tolist()) for t in range(counts.shape[-1])]
                for r in range(R)]

    assert tiles(ours.kv_num_blocks, ours.kv_indices) == tiles(ref.kv_num_blocks, ref.kv_indices)
    assert tiles(ours.full_kv_num_blocks, ours.full_kv_indices) == tiles(ref.full_kv_num_blocks, ref.full_kv_indices)


# ---------------------------------------------------------------- the group loss against the numpy oracle


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("weighting,margin_scale,center_coef", [("comparison", 0.0, 0.0), ("group", 0.5, 0.01),
                                                                 ("comparison", 0.5, 0.01)])
def test_group_loss_of_k_responses_matches_the_oracle(backend, device, weighting, margin_scale, center_coef):
    """K = 2…5 with ties, weighted groups: the comparisons are every strictly ordered pair of a group's scores,
    and the loss every backend gives is the float64 numpy oracle's from the rows' rewards."""
    import oracle

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    groups = edge_groups(3)
    batch = layouts.prefix_shared(groups, list(range(len(groups))), 0, max_tokens=40, weighting=weighting,
                                  margin_scale=margin_scale)
    # the comparisons, derived here from the scores: every (i, j) of a group with score_i > score_j
    better, worse, cgroup, diff = [], [], [], []
    offset = 0
    for g, s in enumerate(groups.scores):
        for i in range(len(s)):
            for j in range(len(s)):
                if s[i] > s[j]:
                    better.append(offset + i), worse.append(offset + j), cgroup.append(g), diff.append(s[i] - s[j])
        offset += len(s)
    last = batch.response_index.numpy()
    got = sorted(zip(batch.chosen_index.tolist(), batch.rejected_index.tolist(), batch.comparison_group.tolist()))
    assert got == sorted(zip(last[better].tolist(), last[worse].tolist(), cgroup))
    g = torch.Generator().manual_seed(4)
    rows = int(batch.response_index.max()) + 3
    hidden, weight, bias = torch.randn(rows, 24, generator=g), torch.randn(24, generator=g) / 5, torch.tensor(0.3)
    out = reward_loss(hidden.to(device), weight.to(device), batch.to(device), bias=bias.to(device),
                      center_coef=center_coef, backend=backend)
    rewards = hidden.double().numpy() @ weight.double().numpy() + 0.3
    want = oracle.group_loss(rewards, last[better], last[worse], cgroup, groups.weight, weighting, diff,
                             margin_scale, center_coef)
    assert float(out.loss) == pytest.approx(want, rel=2e-5, abs=1e-6)
