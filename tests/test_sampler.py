"""PairSampler: seeded, resumable, length-grouped, token-budgeted, sharded with equal steps."""

import numpy as np
import pytest

from rmfast.data.sampler import PairSampler

COSTS = np.random.default_rng(0).integers(20, 400, size=1000)


def epoch(sampler):
    return [list(b) for b in sampler]


def test_same_seed_same_order_and_another_seed_another():
    a = epoch(PairSampler(COSTS, pairs_per_batch=8, seed=1))
    assert a == epoch(PairSampler(COSTS, pairs_per_batch=8, seed=1))
    assert a != epoch(PairSampler(COSTS, pairs_per_batch=8, seed=2))
    assert sorted(i for b in a for i in b) == list(range(len(COSTS)))


def test_epochs_differ_and_each_covers_every_pair():
    s = PairSampler(COSTS, pairs_per_batch=8, seed=1)
    e0, e1 = epoch(s), epoch(s)
    assert e0 != e1 and sorted(i for b in e1 for i in b) == list(range(len(COSTS)))


@pytest.mark.parametrize("stop", [0, 1, 37, 58, 59, 120])
def test_resume_from_any_step_equals_uninterrupted(stop):
    def make():
        return PairSampler(COSTS, token_budget=2000, seed=3, rank=1, world_size=2)

    reference = make()
    full = [b for _ in range(3) for b in reference]
    assert len(full) == 3 * len(make()) > stop
    first = make()
    taken = []
    it = iter(first)
    while len(taken) < stop:
        try:
            taken.append(next(it))
        except StopIteration:
            it = iter(first)
    state = first.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    rest = []
    while len(taken) + len(rest) < len(full):
        rest += list(resumed)
    assert taken + rest[: len(full) - len(taken)] == full


def test_resume_with_other_settings_is_refused():
    s = PairSampler(COSTS, pairs_per_batch=4, seed=1)
    with pytest.raises(ValueError, match="same settings"):
        PairSampler(COSTS, pairs_per_batch=4, seed=2).load_state_dict(s.state_dict())


@pytest.mark.parametrize("world_size", [2, 3, 7])
@pytest.mark.parametrize("budget", [None, 1500])
def test_shards_are_disjoint_and_take_equal_steps(world_size, budget):
    kw = {"token_budget": budget} if budget else {"pairs_per_batch": 6}
    shards = [PairSampler(COSTS, seed=4, rank=r, world_size=world_size, drop_last=True, **kw)
              for r in range(world_size)]
    batches = [epoch(s) for s in shards]
    assert len({len(b) for b in batches}) == 1
    seen = [i for bs in batches for b in bs for i in b]
    assert len(seen) == len(set(seen))
    padded = [epoch(PairSampler(COSTS, seed=4, rank=r, world_size=world_size, **kw)) for r in range(world_size)]
    assert len({len(b) for b in padded}) == 1
    assert set(i for bs in padded for b in bs for i in b) == set(range(len(COSTS)))  # padding loses nothing


@pytest.mark.parametrize("combine", ["sum", "max"])
@pytest.mark.parametrize("budget", [400, 1024, 5000])
def test_token_budget_is_never_exceeded(combine, budget):
    s = PairSampler(COSTS, token_budget=budget, combine=combine, seed=5)
    for b in epoch(s):
        cost = COSTS[b].sum() if combine == "sum" else len(b) * COSTS[b].max()
        assert cost <= budget


def test_a_pair_over_the_budget_is_refused_with_advice():
    with pytest.raises(ValueError, match="over the token budget"):
        PairSampler(COSTS, token_budget=100)


def test_length_grouping_puts_similar_lengths_together():
    grouped = epoch(PairSampler(COSTS, pairs_per_batch=16, seed=6))
    plain = epoch(PairSampler(COSTS, pairs_per_batch=16, seed=6, group_by_length=False))

    def waste(batches):  # padding tokens if each batch were padded to its longest pair
        return sum(len(b) * COSTS[b].max() - COSTS[b].sum() for b in batches)

    assert waste(grouped) < 0.2 * waste(plain)


def test_len_is_steps_per_rank():
    s = PairSampler(COSTS, pairs_per_batch=10, rank=0, world_size=3)
    assert len(s) == 34 and len(epoch(s)) == 34
