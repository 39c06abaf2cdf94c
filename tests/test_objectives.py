"""Objectives beyond Bradley–Terry (rmfast/objective.py): Davidson's ties and Plackett–Luce rankings held to
float64 numpy references written from the formulas, on every backend; prefix_shared equal to padded for every
objective at K = 2 and K > 2; the data's tie and weight columns."""

import json

import numpy as np
import pytest
import torch

from conftest import backend_device_params
from helpers import assert_equal_to_padded, build, edge_pairs
from rmfast import layouts
from rmfast.data.formats import BadRow, parse_row
from rmfast.objective import davidson_terms, plackett_luce_terms, reward_loss
from test_groups import edge_groups, group_rewards_and_grads


def np_davidson(rb, rw, nu, margin, tie):
    """−log P(outcome) under Davidson (1970): P(i beats j) = π_i / (π_i + π_j + ν √(π_i π_j)), π = e^r."""
    pi, pj = np.exp(rb - margin), np.exp(rw)
    denominator = pi + pj + nu * np.sqrt(pi * pj)
    return np.where(tie, -np.log(nu * np.sqrt(pi * pj) / denominator), -np.log(pi / denominator))


def np_plackett_luce(rewards, scores):
    """−log of a group's ranking under Plackett–Luce: responses taken best first, each against those not yet
    taken; tied scores share one set (Breslow)."""
    r, s = np.asarray(rewards, np.float64), np.asarray(scores, np.float64)
    return sum(np.log(np.exp(r[s <= s[k]]).sum()) - r[k] for k in range(len(r)))


def test_davidson_terms_match_the_formula_and_learn_nu():
    rng = np.random.default_rng(0)
    rb, rw, margin = rng.normal(size=12), rng.normal(size=12), rng.uniform(0, 1, size=12)
    tie = np.arange(12) % 3 == 0
    for nu in (0.3, 1.0, 2.5):
        log_nu = torch.tensor(np.log(nu), dtype=torch.float64, requires_grad=True)
        got = davidson_terms(torch.tensor(rb), torch.tensor(rw), log_nu, torch.tensor(margin), torch.tensor(tie))
        np.testing.assert_allclose(got.detach().numpy(), np_davidson(rb, rw, nu, margin, tie), rtol=1e-12)
        got.sum().backward()  # d/d log ν against a central difference of the formula
        eps = 1e-6
        numeric = (np_davidson(rb, rw, nu * np.exp(eps), margin, tie).sum()
                   - np_davidson(rb, rw, nu * np.exp(-eps), margin, tie).sum()) / (2 * eps)
        assert float(log_nu.grad) == pytest.approx(numeric, rel=1e-6)
    # far apart rewards: stable in float32 (no overflow of e^{d/2})
    far = davidson_terms(torch.tensor([200.0]), torch.tensor([-200.0]), 0.0)
    assert torch.isfinite(far).all() and float(far) < 1e-30 + 1e-6


def test_plackett_luce_terms_match_the_formula_and_k2_is_bradley_terry():
    rng = np.random.default_rng(1)
    groups = [rng.permutation(4).astype(float), np.array([2.0, 2.0, 0.0, 1.0, 2.0]), np.array([1.0, 0.0])]
    rewards = rng.normal(size=sum(len(s) for s in groups))
    group = np.concatenate([np.full(len(s), g) for g, s in enumerate(groups)])
    got = plackett_luce_terms(torch.tensor(rewards), torch.tensor(group), torch.tensor(np.concatenate(groups)), 3)
    at = np.cumsum([0] + [len(s) for s in groups])
    want = [np_plackett_luce(rewards[at[g]:at[g + 1]], s) for g, s in enumerate(groups)]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)
    rc, rr = rewards[-2], rewards[-1]
    assert float(got[2]) == pytest.approx(np.log1p(np.exp(-(rc - rr))), rel=1e-12)  # softplus(-(r_c - r_r))


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("objective", ["davidson", "plackett_luce"])
def test_every_backend_gives_the_reference_loss(backend, device, objective):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    groups = edge_groups(3)
    batch = layouts.prefix_shared(groups, range(len(groups)), 0, max_tokens=40, ties=objective == "davidson")
    g = torch.Generator().manual_seed(4)
    rows = int(batch.response_index.max()) + 3
    hidden, weight = torch.randn(rows, 24, generator=g), torch.randn(24, generator=g) / 5
    log_nu = np.log(1.7)
    out = reward_loss(hidden.to(device), weight.to(device), batch.to(device), bias=torch.tensor(0.3, device=device),
                      backend=backend, objective=objective, log_nu=log_nu)
    r = hidden.double().numpy() @ weight.double().numpy() + 0.3
    w = groups.weight.astype(np.float64)
    if objective == "davidson":
        assert batch.tie is not None and batch.ties == int(batch.tie.sum()) > 0
        per = np_davidson(r[batch.chosen_index.numpy()], r[batch.rejected_index.numpy()], np.exp(log_nu), 0.0,
                          batch.tie.numpy())
        cw = w[batch.comparison_group.numpy()]
        want = (per * cw).sum() / len(per)
    else:
        last = batch.response_index.numpy()
        at = np.cumsum([0] + list(groups.sizes))
        per = [np_plackett_luce(r[last[at[k]:at[k + 1]]], groups.scores[k]) for k in range(len(groups))]
        want = (np.array(per) * w).sum() / len(groups)
    assert float(out.loss) == pytest.approx(want, rel=2e-5, abs=1e-6)


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_plackett_luce_inside_the_op_holds_the_float64_reference(backend, device, dtype):
    """rmfast.plackett_luce_loss: rewards from the fused head, the groups' terms and every reward's gradient from
    the op's second kernel; against numpy in float64 with the gradient derived by hand (ties, group weights,
    groups interleaved, a group of one, an upstream gradient on the rewards too)."""
    from rmfast import plackett_luce_loss

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    g = torch.Generator().manual_seed(7)
    D = 24
    hidden = (torch.randn(40, D, generator=g) * 2).to(dtype)
    weight = (torch.randn(D, generator=g) / 3).requires_grad_()
    bias = torch.randn(1, generator=g).requires_grad_()
    group = torch.tensor([0, 1, 0, 2, 1, 0, 2, 1, 2, 0, 3, 4, 4])
    scores = torch.tensor([1.0, 2, 0, 1, 0, 1, 3, 2, 0, 2, 5, 1, 1])  # ties in groups 0, 1 and 4
    index = torch.tensor([0, 3, 5, 7, 9, 11, 13, 2, 4, 6, 39, 20, 3])  # row 3 twice
    gw = torch.tensor([1.0, 0.5, 2.0, 1.0, 0.25])
    upstream = torch.randn(len(index), generator=g, dtype=torch.float64) / 10
    h = hidden.to(device).requires_grad_()
    out = plackett_luce_loss(h, weight.to(device), index.to(device), group.to(device), scores.to(device),
                             bias.to(device), gw.to(device), backend=backend)
    (out.loss.double().cpu() * 1.5 + (out.rewards.double().cpu() * upstream).sum()).backward()
    x, w = hidden.detach().double().numpy(), weight.detach().double().numpy()
    r = x[index.numpy()] @ w + float(bias.detach())
    G, s, gr = 5, scores.numpy(), group.numpy()
    per = gw.double().numpy()[gr] / G
    want = sum(per[k] * (np.log(np.exp(r[(gr == gr[k]) & (s <= s[k])]).sum()) - r[k]) for k in range(len(r)))
    lse = np.array([np.log(np.exp(r[(gr == gr[k]) & (s <= s[k])]).sum()) for k in range(len(r))])
    dr = np.array([sum(per[k] * np.exp(r[j] - lse[k]) for k in range(len(r)) if gr[k] == gr[j] and s[j] <= s[k])
                   - per[j] for j in range(len(r))])
    coef = 1.5 * dr + upstream.numpy()
    tol = 1e-5 if dtype == torch.float32 else 1e-3
    assert float(out.loss.detach()) == pytest.approx(want, rel=tol)
    np.testing.assert_allclose(out.rewards.detach().double().cpu().numpy(), r, rtol=tol, atol=tol)
    d_hidden = np.zeros_like(x)
    np.add.at(d_hidden, index.numpy(), coef[:, None] * w)
    np.testing.assert_allclose(h.grad.double().cpu().numpy(), d_hidden, rtol=0,
                               atol=(1e-5 if dtype == torch.float32 else 1e-2) * np.abs(d_hidden).max())
    np.testing.assert_allclose(weight.grad.double().numpy(), coef @ x[index.numpy()], rtol=1e-4, atol=1e-4)
    assert float(bias.grad) == pytest.approx(coef.sum(), rel=1e-4, abs=1e-5)


def test_plackett_luce_op_nan_compile_and_arguments():
    from rmfast import plackett_luce_loss

    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(12, 8, generator=g), torch.randn(8, generator=g)
    index, group, scores = torch.tensor([1, 4, 9, 2]), torch.tensor([0, 0, 1, 1]), torch.tensor([1.0, 0, 2, 0])
    for backend in ("cpu", "triton", "torch"):
        # groups of two: Bradley–Terry of (better, worse), averaged over the groups
        out = plackett_luce_loss(hidden, weight, index, group, scores, backend=backend)
        r = hidden[index] @ weight
        bt = (torch.nn.functional.softplus(-(r[0] - r[1])) + torch.nn.functional.softplus(-(r[2] - r[3]))) / 2
        torch.testing.assert_close(out.loss, bt)
        bad = hidden.clone()
        bad[9, 3] = float("nan")  # one response of group 1: the loss is NaN
        assert torch.isnan(plackett_luce_loss(bad, weight, index, group, scores, backend=backend).loss)
        torch._dynamo.reset()
        compiled = torch.compile(lambda h, w, b=backend: plackett_luce_loss(h, w, index, group, scores, backend=b,
                                                                            num_groups=2).loss, fullgraph=True)
        grads = []
        for fn in (compiled, lambda h, w, b=backend: plackett_luce_loss(h, w, index, group, scores, backend=b,
                                                                         num_groups=2).loss):
            h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
            loss = fn(h, w)
            loss.backward()
            grads.append((loss.detach(), h.grad, w.grad))
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="`group` must give one group per response"):
        plackett_luce_loss(hidden, weight, index, group[:3], scores)
    with pytest.raises(ValueError, match="`scores` must be a tensor"):
        plackett_luce_loss(hidden, weight, index, group, scores[:2])
    with pytest.raises(ValueError, match="`weight` must be a value head"):
        plackett_luce_loss(hidden, torch.randn(2, 8), index, group, scores)
    with pytest.raises(ValueError, match="`scores` holds NaN"):
        plackett_luce_loss(hidden, weight, index, group, torch.tensor([1.0, float("nan"), 0, 1]))
    with pytest.raises(ValueError, match="`group_weight` must be None or a tensor"):
        plackett_luce_loss(hidden, weight, index, group, scores, group_weight=torch.ones(3))


@pytest.mark.parametrize("objective", ["davidson", "plackett_luce"])
@pytest.mark.parametrize("K", [2, 5])
def test_prefix_shared_equals_padded_for_every_objective(objective, K):
    groups = edge_groups() if K > 2 else edge_pairs()
    if K == 2:  # some pairs tied
        groups.scores[1] = groups.scores[4] = np.array([1.0, 1.0], np.float32)
    idx = list(range(len(groups)))
    model = build(None, "llama", bias=True)
    if objective == "davidson":
        model.add_tie_parameter(1.5)
    options = dict(ties=objective == "davidson", weighting="group")

    def run(batch, how):
        model.zero_grad()
        model.set_attention(how)
        out = model(batch, objective=objective, center_coef=0.01)
        (out.loss + 0.1 * out.chosen_rewards.sum()).backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        return torch.cat([out.chosen_rewards, out.rejected_rewards]).detach(), grads

    ref_r, ref_g = run(layouts.padded(groups, idx, 0, **options), "dense")
    got_r, got_g = run(layouts.prefix_shared(groups, idx, 0, max_tokens=40, **options), "segments")
    assert ("tie_log_nu" in ref_g) == (objective == "davidson")
    assert_equal_to_padded(got_r, got_g, ref_r, ref_g)


def test_bradley_terry_of_groups_is_unchanged_by_the_objective_argument():
    groups = edge_groups(1)
    model = build(None, "qwen2")
    batch = layouts.prefix_shared(groups, range(len(groups)), 0)
    ref_r, ref_g = group_rewards_and_grads(model, batch, "segments")
    model.zero_grad()
    out = model(batch, objective="bradley_terry")
    assert torch.allclose(torch.cat([out.chosen_rewards, out.rejected_rewards]).detach(), ref_r)
    with pytest.raises(ValueError, match="objective must be one of"):
        model(batch, objective="ranknet")


def test_tie_and_weight_columns():
    row = {"prompt": "q", "chosen": " a", "rejected": " b"}
    assert parse_row("f:1", row).tie is False and parse_row("f:1", row).weight is None
    assert parse_row("f:1", {**row, "tie": True}).tie and parse_row("f:1", {**row, "tie": "1"}).tie
    assert parse_row("f:1", {**row, "winner_tie": 1}, columns={"tie": "winner_tie"}).tie
    assert parse_row("f:1", {**row, "weight": "2.5"}).weight == 2.5
    assert parse_row("f:1", {**row, "strength": 0}, columns={"weight": "strength"}).weight == 0.0
    for bad, reason in (({"tie": "maybe"}, "bad_tie"), ({"weight": -1}, "bad_weight"),
                        ({"weight": "heavy"}, "bad_weight"), ({"weight": float("nan")}, "bad_weight")):
        with pytest.raises(BadRow) as err:
            parse_row("f:1", {**row, **bad})
        assert err.value.reason == reason


def test_tie_pairs_are_counted_weighted_and_set_aside_unless_davidson(tmp_path):
    from rmfast.data import DataConfig, generate_pairs, load_data
    from rmfast.data.tokenizers import train_bpe_tokenizer
    from rmfast.engine import with_comparisons

    rows = generate_pairs(40, seed=2, style="explicit", max_history=0, ties=0.25)
    for i, r in enumerate(rows):
        r["weight"] = 1 + i % 3
    ties = sum(bool(r.get("tie")) for r in rows)
    assert 0 < ties < 40 and all("margin" not in r for r in rows if r.get("tie"))
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = train_bpe_tokenizer([r["prompt"] + r["chosen"] for r in rows], vocab_size=300)
    train, _, report = load_data(DataConfig(train=[str(path)], cache_dir=str(tmp_path / "cache")), tok)
    assert report.ties == ties and any("of the pairs are ties" in line for line in report.lines())
    np.testing.assert_array_equal(train.weight, [1 + i % 3 for i in range(40)])
    tied = [i for i in range(40) if rows[i].get("tie")]
    assert all(list(train.scores[i]) == [1.0, 1.0] for i in tied)
    kept, aside = with_comparisons(train)
    assert aside == ties and len(kept) == 40 - ties
    assert with_comparisons(train, ties=True) == (train, 0)
    batch = layouts.prefix_shared(train, range(8), tok.pad_token_id, ties=True)
    assert batch.ties == sum(1 for i in range(8) if rows[i].get("tie"))
    assert batch.comparison_weight.tolist() == [1 + i % 3 for i in range(8)]


def learn_on_the_demo_model(tmp_path, train_rows, eval_rows, **flags):
    """rmfast-train as users run it: the demo's model (a 2-layer Llama, hidden 128) on these rows, with these
    flags besides the common ones. Returns (the finished process, every eval record, the run folder)."""
    from helpers import train_cli
    from rmfast.cli import demo_setup
    from rmfast.data.synthetic import write_jsonl

    demo = demo_setup(tmp_path / "demo", pairs=10)
    out = tmp_path / "run"
    res = train_cli({"model.name_or_path": demo["model.name_or_path"], "model.dtype": "fp32",
                     "data.train": write_jsonl(train_rows, tmp_path / "train.jsonl"),
                     "data.eval": write_jsonl(eval_rows, tmp_path / "eval.jsonl"), "data.max_length": 256,
                     "train.output_dir": out, "train.pairs_per_batch": 16, "train.warmup_ratio": 0.05,
                     "train.tensorboard": False, **flags})
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"eval_accuracy"' in x]
    return res, evals, out


@pytest.mark.slow
def test_davidson_learns_to_call_ties_through_rmfast_train(tmp_path):
    # the demo's model on synthetic pairs of which a third are ties (two right answers in different words):
    # strict pairs ordered, ties called ties (ν learnt above 1)
    from rmfast.data import generate_pairs

    kw = dict(style="explicit", max_history=0, max_operand=3, difficulty="easy", ties=0.3)
    res, evals, out = learn_on_the_demo_model(tmp_path, generate_pairs(300, seed=0, **kw),
                                              generate_pairs(100, seed=1, **kw), **{
                                                  "train.objective": "davidson", "train.lr": 3e-3,
                                                  "train.epochs": 4, "train.log_every": 20})
    assert "of the pairs are ties (the davidson objective trains on them" in res.stdout
    first, last = evals[0], evals[-1]
    assert 20 <= last["eval_ties"] <= 40 and last["eval_pairs"] == 100
    assert first["eval_tie_accuracy"] < 0.7 and last["eval_tie_accuracy"] >= 0.9, (first, last)
    assert last["eval_accuracy"] >= 0.95 and last["eval_tie_nu"] > 1.0
    assert "tie accuracy" in res.stdout
    exported = json.loads((out / "export" / "config.json").read_text())
    assert exported["rmfast_tie_nu"] == pytest.approx(last["eval_tie_nu"], rel=1e-5)


def test_an_eval_batch_of_only_ties_and_weights_that_multiply():
    from rmfast.evaluation import eval_metrics, eval_part

    pairs = edge_pairs()
    pairs.scores[0] = np.array([1.0, 1.0], np.float32)  # batch [0] alone: nothing but a tie
    parts = []
    for idx in ([0], [1, 2, 3]):
        b = layouts.padded(pairs, idx, 0, ties=True)
        parts.append(eval_part(torch.linspace(-1, 1, b.response_index.shape[0]), b))
    record = eval_metrics(parts, "davidson", 0.5)
    assert record["eval_ties"] == 1 and record["eval_pairs"] == 4 and record["eval_groups"] == 3
    assert np.isfinite(record["eval_top1_accuracy"]) and np.isfinite(record["eval_loss"])
    # a row's weight multiplies its share of the loss, whatever else its micro-batch holds
    hidden, weight = torch.randn(200, 24, generator=torch.Generator().manual_seed(0)), torch.randn(24) / 5
    ones = layouts.padded(pairs, [1, 2, 3], 0)
    pairs.weight[[1, 2, 3]] = 0.5
    halves = layouts.padded(pairs, [1, 2, 3], 0)
    a, b = reward_loss(hidden, weight, ones).loss, reward_loss(hidden, weight, halves).loss
    assert float(b) == pytest.approx(0.5 * float(a), rel=1e-6)


def test_weight_0_rows_are_set_aside_and_a_change_of_objective_is_not_resumed():
    from rmfast.engine import with_comparisons
    from rmfast.rundir import SAVED_DEFAULTS, RunDirError, check_resume

    pairs = edge_pairs()
    pairs.weight[2] = 0.0
    pairs.scores[3] = np.array([1.0, 1.0], np.float32)
    kept, aside = with_comparisons(pairs)
    assert aside == 2 and len(kept) == len(pairs) - 2
    kept, aside = with_comparisons(pairs, ties=True)
    assert aside == 1 and kept.locations == [x for i, x in enumerate(pairs.locations) if i != 2]
    layouts.prefix_shared(pairs, [2], 0)  # a batch of weight 0 is still laid out (scoring reads it)
    before = {k: v for k, v in SAVED_DEFAULTS.items() if k != "train.objective"}  # saved before objectives
    check_resume(before, dict(SAVED_DEFAULTS), "ckpt", False)  # … were recorded: Bradley–Terry
    with pytest.raises(RunDirError, match="train.objective"):
        check_resume(before, {**SAVED_DEFAULTS, "train.objective": "davidson"}, "ckpt", True)


@pytest.mark.slow
def test_plackett_luce_learns_to_order_groups_through_rmfast_train(tmp_path):
    # the demo's model on scored groups of 4 answers (the right one, three wrong ones further and further off):
    # the whole ranking learnt from each group's likelihood
    from rmfast.data import generate_groups

    kw = {"k": 4, "max_operand": 3, "max_history": 0, "shape": "scores"}
    _, evals, _ = learn_on_the_demo_model(tmp_path, generate_groups(300, seed=0, **kw),
                                          generate_groups(60, seed=1, **kw), **{
                                              "data.kind": "groups", "train.objective": "plackett_luce",
                                              "train.lr": 4e-3, "train.epochs": 12, "train.log_every": 50,
                                              "train.export": False})
    first, last = evals[0], evals[-1]
    assert last["eval_groups"] == 60 and last["eval_pairs"] == 360
    assert first["eval_kendall_tau"] < 0.5 and first["eval_accuracy"] < 0.8, first
    assert last["eval_kendall_tau"] >= 0.8 and last["eval_accuracy"] >= 0.9 and last["eval_top1_accuracy"] >= 0.7, last
    assert last["eval_loss"] < first["eval_loss"] / 2  # the Plackett–Luce loss itself
