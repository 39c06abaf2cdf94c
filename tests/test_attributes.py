"""Attribute regression (the regression and regression+bradley_terry objectives): attribute columns read with
file:line validation and missing values masked, the masked mean squared error held to a float64 reference,
prefix_shared equal to padded at K = 1, 2 and more, and through rmfast-train as users run it: HelpSteer2-shaped
rows learnt (Pearson r ≥ 0.9 per attribute), the export an A-label AutoModelForSequenceClassification that
plain transformers and rmfast-score read the same."""

import json

import numpy as np
import pytest
import torch

from conftest import backend_device_params
from helpers import assert_equal_to_padded, build
from rmfast import layouts
from rmfast.data import DataConfig, generate_attribute_rows, load_data
from rmfast.data.formats import BadRow
from rmfast.data.groups import parse_group_row, row_kind
from rmfast.data.synthetic import write_jsonl
from rmfast.data.tokenizers import train_bpe_tokenizer
from rmfast.data.tokens import TokenizedGroups
from rmfast.errors import UserError
from rmfast.objective import reward_loss

NAMES = ["helpfulness", "correctness"]


# ---------------------------------------------------------------- data


def test_attribute_columns_are_read_per_response_and_missing_values_masked():
    one = parse_group_row("f:1", {"prompt": "Q", "response": " A", "helpfulness": 3, "correctness": None},
                          preference=False, attributes=NAMES)
    assert one.responses == [" A"] and one.scores is None
    assert one.attributes[0][0] == 3.0 and np.isnan(one.attributes[0][1])
    group = parse_group_row("f:2", {"prompt": "Q", "responses": [" a", " b"], "scores": [1, 1],
                                    "helpfulness": [4, "2.5"], "correctness": [None, 0]},
                            preference=False, attributes=NAMES)  # tied scores: data all the same
    assert group.attributes[0][0] == 4.0 and group.attributes[1] == [2.5, 0.0] and np.isnan(group.attributes[0][1])
    mapped = parse_group_row("f:3", {"instruction": "Q", "completions": [{"r": " a", "h": 1}, {"r": " b", "h": 3}]},
                             columns={"prompt": "instruction", "responses": "completions[].r",
                                      "helpfulness": "completions[].h"}, preference=False, attributes=["helpfulness"])
    assert mapped.attributes == [[1.0], [3.0]]
    assert row_kind({"prompt": "Q", "response": " A"}) == "groups"
    for bad, why in (({"helpfulness": [1, 2, 3]}, "must give 2 numbers"), ({"helpfulness": "high"}, "must give 2"),
                     ({"helpfulness": [1, "x"]}, "is 'x', not a number"), ({"correctness": [1, float("inf")]}, "inf")):
        with pytest.raises(BadRow) as err:
            parse_group_row("f:4", {"prompt": "Q", "responses": [" a", " b"], **bad}, preference=False,
                            attributes=NAMES)
        assert err.value.reason == "bad_attribute" and why in str(err.value)


def test_attribute_data_loads_cached_counted_and_with_file_line_errors(tmp_path):
    rows = generate_attribute_rows(30, seed=0, missing=0.2) + generate_attribute_rows(10, seed=1, responses=2)
    rows.append({"prompt": "Q", "response": " same", "helpfulness": 1})
    rows.append({"prompt": "Q", "responses": [" same", " same", " other"], "helpfulness": [1, 3, None],
                 "scores": [0, 0, 1]})
    path = write_jsonl(rows, tmp_path / "a.jsonl")
    tok = train_bpe_tokenizer([r["prompt"] + (r.get("response") or r["responses"][0]) for r in rows], vocab_size=300)
    config = DataConfig(train=[str(path)], attributes=["helpfulness", "correctness", "verbosity"],
                        cache_dir=str(tmp_path / "cache"))
    first, _, report = load_data(config, tok)
    again, _, cached = load_data(config, tok)
    assert cached.cached and not report.cached and len(first) == len(again) == 42
    assert first.num_attributes == again.num_attributes == 3
    for a, b in zip(first.attributes, again.attributes):
        np.testing.assert_array_equal(a, b)  # NaN where the row had none, in the cache too
    missing = sum(int(np.isnan(a).sum()) for a in first.attributes)
    assert 0 < missing and f"{missing} missing (masked in the loss)" in "\n".join(report.lines())
    # identical responses merged: the mean of the values they have (helpfulness 1 and 3 → 2)
    merged = first.attributes[41]
    assert first.sizes[41] == 2 and merged[0, 0] == 2.0 and np.isnan(merged[1, 0])
    write_jsonl(rows + [{"prompt": "Q", "response": " x", "helpfulness": "lots"}], path)
    with pytest.raises(UserError) as err:
        load_data(config, tok)
    assert f"{path}:43" in str(err.value) and "not a number" in str(err.value)


def test_objectives_and_attributes_are_checked_together():
    from rmfast.config import Config, DataSection, TrainConfig

    with pytest.raises(UserError, match="--data.attributes"):
        Config(train=TrainConfig(objective="regression"))
    with pytest.raises(UserError, match="regression or regression"):
        Config(data=DataSection(attributes=["helpfulness"]))
    with pytest.raises(UserError, match="2 weights for 1"):
        Config(data=DataSection(attributes=["helpfulness"]),
               train=TrainConfig(objective="regression", attribute_weights=[1.0, 2.0]))
    ok = Config(data=DataSection(attributes=NAMES), train=TrainConfig(objective="regression+bradley_terry"))
    from rmfast.config import attribute_combination, data_kind

    assert attribute_combination(ok) == [0.5, 0.5] and data_kind(ok) == "groups"


# ---------------------------------------------------------------- the loss


def attribute_groups(seed=0):
    """Groups of 1, 2, 3 and 4 responses with attributes, some missing, some scores tied."""
    rng = np.random.default_rng(seed)
    prompts, responses, scores, attrs = [], [], [], []
    for K in (1, 3, 2, 4, 1, 2):
        prompts.append(rng.integers(3, 96, rng.integers(2, 7)).astype(np.int32))
        responses.append([np.append(rng.integers(3, 96, rng.integers(1, 5)), 2).astype(np.int32) for _ in range(K)])
        scores.append(rng.permutation(K).astype(np.float32) if K > 1 else np.zeros(1, np.float32))
        a = rng.normal(size=(K, 3)).astype(np.float32)
        a[rng.random((K, 3)) < 0.25] = np.nan
        attrs.append(a)
    scores[2] = np.array([1.0, 1.0], np.float32)  # a tie: no comparison, attributes still trained
    return TokenizedGroups(prompts, responses, scores, np.linspace(0.5, 2.0, len(prompts)), attributes=attrs)


def masked_weighted_mse(predicted, batch):
    """The regression objective's loss worked out in numpy: Σ w · Σ_a (p − y)² / Σ w · (observed values), each
    response weighted by its group's weight. Returns (the loss, w [S, A] masked, p, y)."""
    y = batch.response_attributes.double().numpy()
    w = batch.group_weight.double().numpy()[batch.response_group.numpy()][:, None] * np.isfinite(y)
    p = predicted.detach().double().numpy()
    return (w * np.where(np.isfinite(y), (p - np.nan_to_num(y)) ** 2, 0)).sum() / w.sum(), w, p, y


def test_regression_objective_is_the_masked_weighted_mean_squared_error():
    groups = attribute_groups()
    batch = layouts.padded(groups, range(len(groups)), 0)
    S = int(groups.sizes.sum())
    assert batch.response_attributes.shape == (S, 3)
    g = torch.Generator().manual_seed(0)
    predicted = torch.randn((S, 3), generator=g, dtype=torch.float64)
    # an identity head over rows that hold the predictions: the objective's attributes are `predicted`
    index = batch.response_index
    hidden = torch.zeros(int(index.max()) + 1, 3, dtype=torch.float64)
    hidden[index] = predicted
    hidden.requires_grad_()
    eye, mean = torch.eye(3, dtype=torch.float64), torch.full((3,), 1 / 3, dtype=torch.float64)
    out = reward_loss(hidden, mean, batch, objective="regression", attribute_head=(eye, None, mean))
    want, w, p, y = masked_weighted_mse(predicted, batch)
    assert float(out.loss.detach()) == pytest.approx(want, rel=1e-12)
    out.loss.backward()  # the gradient reaches only observed values: 2 w (p − y) / Σ w
    grad = np.where(np.isfinite(y), 2 * w * (p - np.nan_to_num(y)) / w.sum(), 0)
    np.testing.assert_allclose(hidden.grad[index].numpy(), grad, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("objective", ["regression", "regression+bradley_terry"])
def test_prefix_shared_equals_padded_for_the_regression_objectives(objective):
    groups = attribute_groups(1)
    idx = list(range(len(groups)))
    model = build(None, "llama", bias=True)
    model.use_attribute_head(3, [0.5, 0.3, 0.2])
    torch.nn.init.normal_(model.head.weight, std=0.3)

    def run(batch, how):
        model.zero_grad()
        model.set_attention(how)
        out = model(batch, objective=objective)
        (out.loss + 0.1 * out.chosen_rewards.sum()).backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        return torch.cat([out.chosen_rewards, out.rejected_rewards]).detach(), grads, float(out.loss.detach())

    ref_r, ref_g, ref_loss = run(layouts.padded(groups, idx, 0), "dense")
    got_r, got_g, got_loss = run(layouts.prefix_shared(groups, idx, 0, max_tokens=40), "segments")
    assert "head.weight" in ref_g and ref_g["head.weight"].shape == (3, 32)
    assert_equal_to_padded(got_r, got_g, ref_r, ref_g)
    assert got_loss == pytest.approx(ref_loss, rel=1e-5)
    # the loss is the regression loss (+ Bradley–Terry on the combined head for the mixed objective)
    batch = layouts.padded(groups, idx, 0)
    with torch.no_grad():
        model.set_attention("dense")
        hidden = model.hidden_states(batch)
        attrs = model.head.attributes(hidden.reshape(-1, 32)[batch.response_index])
        want = masked_weighted_mse(attrs, batch)[0]
        if objective != "regression":
            w, b = model.head.scalar()
            want = want + reward_loss(hidden, w, batch, bias=b).loss
    assert ref_loss == pytest.approx(float(want), rel=1e-5)


# ---------------------------------------------------------------- through rmfast-train, exported, scored


@pytest.mark.slow
def test_attributes_learn_through_rmfast_train_and_score_the_same_outside_rmfast(tmp_path):
    # HelpSteer2-shaped rows (one response, three 0–4 attributes, a tenth of the values missing) and groups of
    # two scored by their helpfulness, in one file: regression + Bradley–Terry on the combined score
    from test_objectives import learn_on_the_demo_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    names = ["helpfulness", "correctness", "verbosity"]
    kw = dict(missing=0.1, max_operand=3)
    train = generate_attribute_rows(300, 0, **kw) + generate_attribute_rows(100, 2, responses=2, **kw)
    evals = generate_attribute_rows(60, 1, max_operand=3) + generate_attribute_rows(40, 3, responses=2, max_operand=3)
    res, records, out = learn_on_the_demo_model(tmp_path, train, evals, **{
        "data.attributes": names, "train.attribute_weights": [0.6, 0.3, 0.1],
        "train.objective": "regression+bradley_terry", "train.lr": 3e-3, "train.epochs": 5, "train.log_every": 20})
    assert "missing (masked in the loss)" in res.stdout
    first, last = records[0], records[-1]
    for name in names:
        assert first[f"eval_{name}_pearson"] < 0.5 and last[f"eval_{name}_pearson"] >= 0.9, (name, first, last)
    assert last["eval_pairs"] > 20 and last["eval_accuracy"] >= 0.9
    export = out / "export"
    config = json.loads((export / "config.json").read_text())
    assert config["id2label"] == {str(i): n for i, n in enumerate(names)}
    assert config["rmfast_attribute_weights"] == [0.6, 0.3, 0.1]
    # rmfast-export of the run's last checkpoint writes the same model
    from safetensors.torch import load_file

    from rmfast.export import main as export_main

    assert export_main([str(out), "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    assert {k: again[k] for k in ("id2label", "rmfast_attribute_weights", "num_labels") if k in again} == \
        {k: config[k] for k in ("id2label", "rmfast_attribute_weights", "num_labels") if k in config}
    a, b = load_file(export / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) and a["score.weight"].shape == (3, 128)
    # plain transformers on the text rmfast reads (prompt + response + EOS) gives rmfast-score's attributes
    from rmfast.score import main as score_main

    path = write_jsonl(evals[:6], tmp_path / "some.jsonl")
    assert score_main([str(export), str(path), "--out", str(tmp_path / "s.jsonl")]) == 0
    scored = [json.loads(x) for x in (tmp_path / "s.jsonl").read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(export)
    model = AutoModelForSequenceClassification.from_pretrained(export).eval()
    bias = np.asarray(config.get("rmfast_score_bias") or [0.0] * 3)
    for row, record in zip(evals[:6], scored):
        texts = [row["response"]] if "response" in row else row["responses"]
        for k, text in enumerate(texts):
            ids = tok(row["prompt"] + text)["input_ids"] + [tok.eos_token_id]
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0].numpy() + bias
            got = [record["attributes"][n][k] for n in names]
            np.testing.assert_allclose(got, logits, atol=1e-4)
            assert record["rewards"][k] == pytest.approx(float(logits @ [0.6, 0.3, 0.1]), abs=1e-4)


# ---------------------------------------------------------------- the fused [A, D] op on every backend


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("A", [1, 3, 5])
def test_attribute_head_on_every_backend_holds_the_float64_reference(backend, device, dtype, A):
    from rmfast import attribute_head

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    g = torch.Generator().manual_seed(A)
    D = 40
    base = torch.randn(7, 3, 2 * D, generator=g)
    hidden = base[..., ::2].to(dtype)  # strided rows: viewed as [N, D] with a copy, once
    weight = (torch.randn(A, D, generator=g) / 4).requires_grad_()
    bias = torch.randn(A, generator=g).requires_grad_()
    index = torch.tensor([3, 0, 20, 3, 7, 11, 20, 5], dtype=torch.int32)  # int32, repeated rows
    upstream = torch.randn(len(index), A, generator=g, dtype=torch.float64)
    h = hidden.to(device).requires_grad_()
    out = attribute_head(h, weight.to(device), index.to(device), bias.to(device), backend=backend)
    assert out.shape == (len(index), A) and out.dtype == torch.float32
    (out.double().cpu() * upstream).sum().backward()
    # float64 reference from the same (rounded) inputs, gradients by hand
    x = hidden.detach().double().reshape(-1, D).numpy()
    w, b, idx, u = weight.detach().double().numpy(), bias.detach().double().numpy(), index.numpy(), upstream.numpy()
    want = x[idx] @ w.T + b
    tol = dict(rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.detach().double().cpu().numpy(), want, **tol)
    d_hidden = np.zeros_like(x)
    np.add.at(d_hidden, idx, u @ w)
    got_dh = h.grad.double().cpu().reshape(-1, D).numpy()
    scale = np.abs(d_hidden).max()
    np.testing.assert_allclose(got_dh, d_hidden, rtol=0, atol=(1e-5 if dtype == torch.float32 else 1e-2) * scale)
    np.testing.assert_allclose(weight.grad.double().numpy(), u.T @ x[idx], **tol)
    np.testing.assert_allclose(bias.grad.double().numpy(), u.sum(0), **tol)


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("A", [1, 3, 5])
def test_regression_loss_inside_the_op_holds_the_float64_reference(backend, device, dtype, A):
    """rmfast.attribute_regression_loss: the masked, weighted mean squared error computed in the kernel, and
    its gradients (with an upstream gradient on the attributes too), against numpy in float64."""
    from rmfast import attribute_regression_loss

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    g = torch.Generator().manual_seed(10 + A)
    D, S = 40, 8
    hidden = torch.randn(30, D, generator=g).to(dtype)
    weight = (torch.randn(A, D, generator=g) / 4).requires_grad_()
    bias = torch.randn(A, generator=g).requires_grad_()
    index = torch.tensor([3, 0, 20, 3, 7, 11, 29, 5])  # a repeated row
    target = torch.randn(S, A, generator=g)
    target[torch.rand(S, A, generator=g) < 0.3] = float("nan")
    target[1] = float("nan")  # a response with nothing observed
    rw = torch.rand(S, generator=g) + 0.5
    upstream = torch.randn(S, A, generator=g, dtype=torch.float64) / 10
    h = hidden.to(device).requires_grad_()
    out = attribute_regression_loss(h, weight.to(device), index.to(device), target.to(device), bias.to(device),
                                    rw.to(device), backend=backend)
    assert out.loss.shape == () and out.attributes.shape == (S, A)
    (out.loss.double().cpu() * 1.5 + (out.attributes.double().cpu() * upstream).sum()).backward()
    x = hidden.detach().double().numpy()
    w, b, y = weight.detach().double().numpy(), bias.detach().double().numpy(), target.double().numpy()
    ws, u = rw.double().numpy()[:, None], upstream.numpy()
    p = x[index.numpy()] @ w.T + b
    have = np.isfinite(y)
    err = np.where(have, p - np.nan_to_num(y), 0.0)
    count = (ws * have).sum()
    want = (ws * err**2).sum() / count
    tol = 1e-5 if dtype == torch.float32 else 1e-3
    assert float(out.loss.detach()) == pytest.approx(want, rel=tol)
    np.testing.assert_allclose(out.attributes.detach().double().cpu().numpy(), p, rtol=tol, atol=tol)
    coef = 1.5 * 2 * ws * err / count + u  # dL/d attributes
    d_hidden = np.zeros_like(x)
    np.add.at(d_hidden, index.numpy(), coef @ w)
    scale = np.abs(d_hidden).max()
    np.testing.assert_allclose(h.grad.double().cpu().numpy(), d_hidden, rtol=0,
                               atol=(1e-5 if dtype == torch.float32 else 1e-2) * scale)
    np.testing.assert_allclose(weight.grad.double().numpy(), coef.T @ x[index.numpy()], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(bias.grad.double().numpy(), coef.sum(0), rtol=1e-4, atol=1e-5)


def test_regression_loss_with_nothing_observed_is_zero_and_arguments_are_checked():
    from rmfast import attribute_regression_loss

    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(12, 16, generator=g).requires_grad_(), torch.randn(2, 16, generator=g)
    index = torch.tensor([1, 4, 9])
    for backend in ("cpu", "triton", "torch"):
        out = attribute_regression_loss(hidden, weight, index, torch.full((3, 2), float("nan")), backend=backend)
        out.loss.backward()
        assert float(out.loss.detach()) == 0.0 and not hidden.grad.any()
        hidden.grad = None
        # no response at all (an empty index, its target [0, A]): 0 too, never whatever memory held
        for _ in range(3):
            torch.full((2,), float("nan")).sum()  # small blocks the op's outputs may be allocated from
            empty = attribute_regression_loss(hidden, weight, index[:0], torch.zeros(0, 2), backend=backend)
            empty.loss.backward()
            assert float(empty.loss.detach()) == 0.0 and empty.attributes.shape == (0, 2), backend
            assert not hidden.grad.any()
            hidden.grad = None
    # the compiled op itself (loaded by the cpu backend above): its [2] sums are written, not left as allocated
    for _ in range(5):
        (torch.randn(64) * 1e30).sum()
        _, sums, _ = torch.ops.rmfast.attribute_head_fwd(hidden.detach(), weight, None, index[:0], torch.zeros(0, 2),
                                                         None, False)
        assert sums.tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match=r"`target` must be \[S=3, A=2\]"):
        attribute_regression_loss(hidden, weight, index, torch.zeros(3, 3))
    with pytest.raises(ValueError, match="`target` must be a floating tensor"):
        attribute_regression_loss(hidden, weight, index, torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="`response_weight` must be None or a tensor"):
        attribute_regression_loss(hidden, weight, index, torch.zeros(3, 2), response_weight=torch.ones(2))


def test_attribute_head_is_the_pairwise_ops_head_at_a_1_and_compiles_whole():
    from rmfast import attribute_head, pairwise_reward_loss

    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(12, 16, generator=g), torch.randn(16, generator=g)
    index = torch.tensor([1, 4, 9, 4])
    out = pairwise_reward_loss(hidden, weight, index[:2], index[2:], backend="cpu")
    got = attribute_head(hidden, weight, index, backend="cpu")[:, 0]
    torch.testing.assert_close(got, torch.cat([out.chosen_rewards, out.rejected_rewards]))
    for backend in ("cpu", "triton", "torch"):
        torch._dynamo.reset()
        compiled = torch.compile(lambda h, w, i, b=backend: attribute_head(h, w, i, backend=b).square().sum(),
                                 fullgraph=True)
        w2 = torch.randn(3, 16, generator=g)
        grads = []
        for fn in (compiled, lambda h, w, i, b=backend: attribute_head(h, w, i, backend=b).square().sum()):
            h, w = hidden.clone().requires_grad_(), w2.clone().requires_grad_()
            loss = fn(h, w, index)
            loss.backward()
            grads.append((loss.detach(), h.grad, w.grad))
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="has 8 features but hidden has D=16"):
        attribute_head(hidden, torch.randn(2, 8), index)
    with pytest.raises(ValueError, match="index"):
        attribute_head(hidden, w2, torch.tensor([0, 12]))


@pytest.mark.parametrize("objective", ["davidson", "plackett_luce", "regression", "regression+bradley_terry"])
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_every_objective_compiles_whole_and_equals_eager(objective, backend):
    # torch.compile(fullgraph=True) of the loss of a batch, through the fused ops (each objective's loss inside
    # them), gives eager's loss and grads: inductor around the C++ ops, aot_eager around the interpreted Triton
    groups = attribute_groups(2)
    batch = layouts.padded(groups, range(len(groups)), 0, ties=objective == "davidson")
    g = torch.Generator().manual_seed(3)
    rows = int(batch.response_index.max()) + 2
    hidden, w, attrs = torch.randn(rows, 16, generator=g), torch.randn(16, generator=g) / 4, torch.randn(3, 16) / 4
    combination = torch.tensor([0.5, 0.3, 0.2])

    def loss(h, w, a):
        head = (a, None, combination) if objective.startswith("regression") else None
        scalar = combination @ a if head is not None else w
        return reward_loss(h, scalar, batch, backend=backend, objective=objective, log_nu=0.4,
                           attribute_head=head, check_indices=False).loss

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend="inductor" if backend == "cpu" else "aot_eager")
    got = []
    for fn in (compiled, loss):
        inputs = [t.clone().requires_grad_() for t in (hidden, w, attrs)]
        value = fn(*inputs)
        value.backward()
        got.append([value.detach()] + [t.grad if t.grad is not None else torch.zeros_like(t) for t in inputs])
    for a, b in zip(*got):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_log_lines_of_a_run_without_comparisons_show_attributes_not_accuracy(tmp_path):
    from rmfast.metrics import MetricsLog, train_line

    record = {"step": 3, "loss": 0.5, "accuracy": float("nan"), "pairs": 0, "responses": 40, "tokens": 900,
              "pairs_per_s": 0.0, "responses_per_s": 80.0, "tokens_per_s": 1800.0, "lr": 1e-4}
    line = train_line(record, 10)
    assert "responses/s 80.0" in line and "accuracy" not in line and "pairs/s" not in line
    assert "accuracy 0.750  pairs/s 4.0" in train_line({**record, "pairs": 8, "accuracy": 0.75, "pairs_per_s": 4.0}, 10)
    said = []
    log = MetricsLog(tmp_path / "m.jsonl", 0, said.append)
    log.write({"step": 3, "eval_pairs": 0, "eval_loss": 0.2, "eval_accuracy": float("nan"), "eval_margin": float("nan"),
               "eval_helpfulness_pearson": 0.91, "eval_verbosity_pearson": 0.5})
    assert said == ["eval at step 3: loss 0.2000  Pearson r helpfulness 0.910, verbosity 0.500"]
    # metrics.jsonl is JSON any reader parses: an accuracy without comparisons is null, not NaN
    record = json.loads((tmp_path / "m.jsonl").read_text(), parse_constant=lambda c: pytest.fail(f"{c} written"))
    assert record["eval_accuracy"] is None and record["eval_margin"] is None and record["eval_loss"] == 0.2


def test_rmfast_data_writes_and_inspects_rated_rows(tmp_path, capsys):
    from rmfast.data.cli import main

    path = tmp_path / "rated.jsonl"
    assert main(["synth", "--attributes", "--pairs", "200", "--missing", "0.25", "--out", str(path)]) == 0
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(rows) == 200 and set(rows[0]) == {"prompt", "response", "helpfulness", "correctness", "verbosity"}
    missing = sum(r[a] is None for r in rows for a in ("helpfulness", "correctness", "verbosity"))
    capsys.readouterr()
    assert main(["inspect", str(path), "--attributes", "helpfulness", "correctness", "verbosity", "--vocab-size",
                 "300", "--cache-dir", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out
    assert f"attributes: {600 - missing} values read, {missing} missing" in out
    have = sum(r["verbosity"] is not None for r in rows)
    assert f"attribute verbosity: {have} of 200 responses ({200 - have} missing)" in out
    assert "shared prefix" not in out  # one response per row: nothing shared, nothing compared


def test_review_edge_cases_of_attribute_data_and_runs(tmp_path):
    # a source whose rows are all dropped beside one with attributes; per-element columns with a field missing;
    # a resume that changes the attributes; an attribute export trained without (or with other) attributes
    from rmfast.config import Config, DataSection, ModelConfig, TrainConfig
    from rmfast.engine import build_model
    from rmfast.export import write_export
    from rmfast.rundir import RunDirError, check_resume, identity

    good = write_jsonl(generate_attribute_rows(6, 0), tmp_path / "good.jsonl")
    bad = write_jsonl([{"prompt": "Q", "response": " x", "helpfulness": "lots"}], tmp_path / "bad.jsonl")
    tok = train_bpe_tokenizer(["Q: what is 1 plus 2? 3 = x"] * 5, vocab_size=300)
    config = DataConfig(train=[str(bad), str(good)], attributes=["helpfulness"], on_bad_row="skip",
                        cache_dir=str(tmp_path / "cache"))
    for _ in range(2):  # tokenized, then from the cache
        train, _, report = load_data(config, tok)
        assert len(train) == 6 and train.num_attributes == 1 and report.bad == {"bad_attribute": 1}
    row = {"prompt": "Q", "completions": [{"r": " a", "h": 2}, {"r": " b"}]}
    group = parse_group_row("f:1", row, columns={"responses": "completions[].r", "helpfulness": "completions[].h"},
                            preference=False, attributes=["helpfulness"])
    assert group.attributes[0] == [2.0] and np.isnan(group.attributes[1][0])

    def run(attributes, weights=(), objective="regression"):
        return Config(model=ModelConfig(name_or_path=str(tmp_path / "export"), dtype="fp32"),
                      data=DataSection(attributes=list(attributes)),
                      train=TrainConfig(objective=objective, attribute_weights=list(weights)))

    ident = lambda c: identity(c, tok_config, "tok", [], 1)  # noqa: E731
    tok_config = build(None, "llama").backbone.config
    check_resume(ident(run(["a", "b"])), ident(run(["a", "b"])), "here", False)
    with pytest.raises(RunDirError, match="data.attributes"):
        check_resume(ident(run(["a", "b"])), ident(run(["b", "a"])), "here", True)
    with pytest.raises(RunDirError, match="train.attribute_weights"):
        check_resume(ident(run(["a", "b"])), ident(run(["a", "b"], [1.0, 0.0])), "here", False)
    model = build(None, "llama", vocab=len(tok))
    model.use_attribute_head(2, [0.5, 0.5])
    write_export(model.backbone.config, model.state_dict(), tok, tmp_path / "export",
                 attributes=(["helpfulness", "correctness"], [0.5, 0.5]))
    ds = {"zero_optimization": {"stage": 0}}
    with pytest.raises(UserError, match="--data.attributes helpfulness correctness"):
        build_model(run([], objective="bradley_terry"), ds, torch.float32, 0, print)
    with pytest.raises(UserError, match="same order"):
        build_model(run(["correctness", "helpfulness"]), ds, torch.float32, 0, print)
    again = build_model(run(["helpfulness", "correctness"]), ds, torch.float32, 0, print)
    torch.testing.assert_close(again.head.weight.detach(), model.head.weight.detach())


def test_attribute_columns_that_are_nowhere_in_the_data_stop_loading_naming_the_columns(tmp_path):
    path = write_jsonl(generate_attribute_rows(5, 0), tmp_path / "a.jsonl")
    tok = train_bpe_tokenizer(["Q: what is 1 plus 2? 3"] * 5, vocab_size=300)
    with pytest.raises(UserError) as err:
        load_data(DataConfig(train=[str(path)], attributes=["helpful"], cache_dir=str(tmp_path / "c")), tok)
    assert "helpful" in str(err.value) and "helpfulness, correctness, verbosity" in str(err.value)
