"""The fused pairwise loss, every backend (the torch one too) against the tests' own float64 numpy oracle
(tests/oracle.py), and the cases where backends must agree with each other."""

import pytest
import torch

import oracle
from conftest import backend_device_params
from rmfast import backends, pairwise_reward_loss

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Largest error allowed, relative to the largest magnitude of the float64 reference value.
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}

BACKEND_DEVICE = backend_device_params()


def require(backend, device):
    reason = backends.unavailable_reason(backend, device)
    assert reason is None, f"backend {backend} cannot run on {device} here: {reason}"


def make_case(N, D, P, *, dtype=torch.float32, device="cpu", seed=0, bias=True, margin="tensor", lead=None):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g)
    weight = torch.randn(D, generator=g) / D**0.5
    chosen = torch.randint(0, N, (P,), generator=g)
    rejected = torch.randint(0, N, (P,), generator=g)
    case = {
        "hidden": hidden.reshape(*lead, D) if lead else hidden,
        "weight": weight,
        "chosen_index": chosen,
        "rejected_index": rejected,
        "bias": torch.randn((), generator=g) if bias else None,
        "margin": torch.rand(P, generator=g) if margin == "tensor" else margin,
    }
    for k, v in case.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device)
            case[k] = v.to(dtype) if v.is_floating_point() and k != "margin" else v
    return case


def upstream(P, reduction, seed):
    """Random upstream gradients of the loss, the chosen and the rejected rewards (float64)."""
    g = torch.Generator().manual_seed(seed)
    w_loss = torch.randn((P,) if reduction == "none" else (), generator=g, dtype=torch.float64)
    w_c = 0.1 * torch.randn(P, generator=g, dtype=torch.float64)
    w_r = 0.1 * torch.randn(P, generator=g, dtype=torch.float64)
    return w_loss, w_c, w_r


def run(case, backend, reduction="mean", center_coef=0.0, seed=1, reference=False):
    """Loss, rewards and gradients of hidden / weight / bias under random upstream gradients on all three
    outputs. With reference=True, the same from the float64 numpy oracle (the inputs as given, in float64)."""
    P = case["chosen_index"].shape[0]
    w_loss, w_c, w_r = upstream(P, reduction, seed)
    if reference:
        def np64(v):
            return v.detach().cpu().double().numpy() if isinstance(v, torch.Tensor) else v

        want = oracle.pair_loss(*(np64(case[k]) for k in ("hidden", "weight", "chosen_index", "rejected_index",
                                                           "bias", "margin")),
                                center_coef=center_coef, reduction=reduction, grad_loss=w_loss.numpy(),
                                grad_chosen=w_c.numpy(), grad_rejected=w_r.numpy(),
                                log_nu=np64(case.get("log_nu")), tie=np64(case.get("tie")))
        keep = {"loss", "chosen", "rejected", "d_hidden", "d_weight"} | \
            ({"d_bias"} if isinstance(case["bias"], torch.Tensor) else set()) | \
            ({"d_log_nu"} if isinstance(case.get("log_nu"), torch.Tensor) else set())
        return {k: torch.from_numpy(v) for k, v in want.items() if k in keep}
    leaves = {}
    args = dict(case)
    for k in ("hidden", "weight", "bias", "log_nu"):
        v = args.get(k)
        if isinstance(v, torch.Tensor):
            v = (case["hidden"].detach() if k == "hidden" else v.detach().clone()).requires_grad_(True)
            leaves[k] = v
            args[k] = v
    out = pairwise_reward_loss(**args, reduction=reduction, center_coef=center_coef, backend=backend)
    dev = out.loss.device
    obj = (out.loss.double() * w_loss.to(dev)).sum() + (out.chosen_rewards.double() * w_c.to(dev)).sum() \
        + (out.rejected_rewards.double() * w_r.to(dev)).sum()
    obj.backward()
    result = {"loss": out.loss, "chosen": out.chosen_rewards, "rejected": out.rejected_rewards}
    result.update({f"d_{k}": v.grad for k, v in leaves.items()})
    return result


def assert_matches(actual, expected, dtype):
    tol = TOL[dtype]
    assert actual.keys() == expected.keys()
    for k, ref in expected.items():
        got = actual[k]
        assert got is not None, f"{k} has no gradient"
        assert got.shape == ref.shape, f"{k}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
        got = got.detach().to(torch.float64).cpu()
        ref = ref.detach().cpu()
        scale = max(ref.abs().max().item(), 1e-12) if ref.abs().max().item() else 1.0  # denormal: ~0
        err = (got - ref).abs().max().item()
        assert err <= tol * scale, f"{k}: max error {err:.3g} > {tol:g} × {scale:.3g}"


def check(case, backend, dtype, **kw):
    assert_matches(run(case, backend, **kw), run(case, backend, reference=True, **kw), dtype)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,D,P", [(4, 1, 1), (16, 3, 5), (40, 129, 17), (12, 4097, 6), (5000, 8, 3000)])
def test_matches_float64_reference(backend, device, dtype, N, D, P):
    require(backend, device)
    check(make_case(N, D, P, dtype=dtype, device=device), backend, dtype)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("margin", [None, 0.5, "tensor"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("center_coef", [0.0, 0.01])
@pytest.mark.parametrize("bias", [True, False])
def test_options(backend, device, margin, reduction, center_coef, bias):
    require(backend, device)
    case = make_case(24, 33, 7, device=device, bias=bias, margin=margin)
    check(case, backend, torch.float32, reduction=reduction, center_coef=center_coef)


def davidson_case(N, D, P, *, dtype=torch.float32, device="cpu", log_nu=0.4, ties=True, **kw):
    """make_case with Davidson's log ν (a learnt leaf) and every third comparison a tie (or none)."""
    case = make_case(N, D, P, dtype=dtype, device=device, **kw)
    case["log_nu"] = torch.tensor(log_nu, device=device)
    case["tie"] = (torch.arange(P, device=device) % 3 == 1) if ties else None
    return case


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,D,P", [(4, 1, 1), (40, 129, 17), (12, 4097, 6), (5000, 8, 3000)])
def test_davidson_matches_float64_reference(backend, device, dtype, N, D, P):
    """Davidson's loss inside the op (ties kept, log ν learnt): loss, rewards and the gradients of hidden,
    weight, bias and log ν against the oracle's hand-derived ones."""
    require(backend, device)
    check(davidson_case(N, D, P, dtype=dtype, device=device), backend, dtype)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("margin", [None, "tensor"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ties,log_nu", [(True, 0.4), (False, 0.4), (True, -1.5), (True, 3.0)])
def test_davidson_options(backend, device, margin, reduction, ties, log_nu):
    require(backend, device)
    case = davidson_case(24, 33, 7, device=device, margin=margin, ties=ties, log_nu=log_nu)
    check(case, backend, torch.float32, reduction=reduction, center_coef=0.01)
    # far apart rewards (e^{d/2} would overflow float32) stay finite and exact
    case["hidden"] = case["hidden"] * 1e4
    check(case, backend, torch.float32, reduction=reduction)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
def test_davidson_nan_row_gives_nan_and_float_log_nu_is_fixed(backend, device):
    require(backend, device)
    case = davidson_case(10, 16, 3, device=device)
    case["chosen_index"] = torch.tensor([0, 1, 2], device=device)
    case["rejected_index"] = torch.tensor([3, 4, 5], device=device)
    fixed = dict(case, log_nu=0.4)  # a float: the same loss, no gradient asked for
    torch.testing.assert_close(pairwise_reward_loss(**fixed, backend=backend).loss,
                               pairwise_reward_loss(**case, backend=backend).loss)
    case["hidden"][4, 7] = float("nan")
    out = pairwise_reward_loss(**case, backend=backend, reduction="none")
    assert torch.isnan(out.loss[1]) and torch.isfinite(out.loss[[0, 2]]).all()


def test_davidson_arguments_are_checked():
    case = davidson_case(10, 16, 3)
    with pytest.raises(ValueError, match="`tie` marks tied comparisons.*give log_nu"):
        pairwise_reward_loss(**dict(case, log_nu=None), backend="torch")
    with pytest.raises(ValueError, match=r"`tie` must be \[P=3\]"):
        pairwise_reward_loss(**dict(case, tie=torch.tensor([True, False])), backend="cpu")
    with pytest.raises(ValueError, match="`tie` must be a bool tensor"):
        pairwise_reward_loss(**dict(case, tie=torch.zeros(3)), backend="cpu")
    with pytest.raises(ValueError, match="`log_nu` must be finite"):
        pairwise_reward_loss(**dict(case, log_nu=float("inf")), backend="cpu")
    with pytest.raises(ValueError, match="`log_nu` must be finite"):
        pairwise_reward_loss(**dict(case, log_nu=torch.tensor(float("nan"))), backend="cpu")
    with pytest.raises(ValueError, match="`log_nu` must be None, a float, or a one-element"):
        pairwise_reward_loss(**dict(case, log_nu=torch.zeros(2)), backend="cpu")
    # an integer 0/1 tie column is read as bool
    a = pairwise_reward_loss(**dict(case, tie=case["tie"].long()), backend="cpu").loss
    torch.testing.assert_close(a, pairwise_reward_loss(**case, backend="cpu").loss)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
def test_gathered_rows_over_a_huge_page_give_exact_weight_gradients(backend, device):
    """The rows the forward saves for d_weight, 2P × D over 2 MiB (the CPU kernel's huge-page-backed buffer,
    strided hidden too): d_weight and the attribute head's d_weight still hold the float64 reference."""
    require(backend, device)
    case = make_case(300, 4100, 70, device=device)
    check(case, backend, torch.float32)
    from rmfast import attribute_regression_loss

    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(300, 2 * 4100, generator=g)[:, ::2].to(device)  # strided rows
    weight = (torch.randn(3, 4100, generator=g) / 64).to(device).requires_grad_()
    index = torch.randint(0, 300, (140,), generator=g).to(device)
    target = torch.randn(140, 3, generator=g).to(device)
    out = attribute_regression_loss(hidden, weight, index, target, backend=backend)
    out.loss.backward()
    x = hidden.double().cpu().numpy()[index.cpu().numpy()]
    p = x @ weight.detach().double().cpu().numpy().T
    coef = 2 * (p - target.double().cpu().numpy()) / target.numel()
    torch.testing.assert_close(weight.grad.double().cpu(), torch.from_numpy(coef.T @ x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
def test_3d_hidden_indexes_flattened_rows(backend, device):
    require(backend, device)
    check(make_case(4 * 9, 65, 4, lead=(4, 9), device=device), backend, torch.float32)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
def test_3d_hidden_sliced_along_sequence(backend, device):
    require(backend, device)
    case = make_case(4 * 9, 65, 4, lead=(4, 9), device=device)
    case["hidden"] = case["hidden"][:, :-2]  # [4, 7, 65], not viewable as rows
    case["chosen_index"] = case["chosen_index"] % 28
    case["rejected_index"] = case["rejected_index"] % 28
    check(case, backend, torch.float32)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("layout", ["transposed", "strided_columns", "strided_rows"])
def test_non_contiguous_hidden(backend, device, layout):
    require(backend, device)
    case = make_case(30, 70, 9, device=device)
    h = case["hidden"]
    if layout == "transposed":
        hidden = h.t().contiguous().t()
    elif layout == "strided_columns":
        hidden = torch.stack([h, -h], dim=2).reshape(30, 140)[:, ::2]
    else:
        hidden = torch.cat([h, h], dim=1)[:, :70]
    assert not hidden.is_contiguous() and torch.equal(hidden, h)
    case["hidden"] = hidden
    check(case, backend, torch.float32)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
def test_chosen_and_rejected_at_the_same_row(backend, device):
    require(backend, device)
    case = make_case(20, 17, 6, device=device)
    case["rejected_index"][:3] = case["chosen_index"][:3]
    check(case, backend, torch.float32)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
def test_row_used_by_several_pairs(backend, device):
    require(backend, device)
    case = make_case(10, 40, 50, device=device)  # 100 gathers over 10 rows
    case["chosen_index"][:20] = 3
    check(case, backend, torch.float32)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
def test_hidden_without_grad_gives_weight_grad_only(backend, device):
    require(backend, device)
    case = make_case(12, 20, 4, device=device)
    weight = case["weight"].clone().requires_grad_(True)
    out = pairwise_reward_loss(case["hidden"], weight, case["chosen_index"], case["rejected_index"],
                               backend=backend)
    out.loss.backward()
    ref_w = case["weight"].clone().requires_grad_(True)
    pairwise_reward_loss(case["hidden"], ref_w, case["chosen_index"], case["rejected_index"],
                         backend="torch").loss.backward()
    torch.testing.assert_close(weight.grad, ref_w.grad)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("N,D", [(50, 16), (2048, 160)], ids=["small", "over-1MiB"])
def test_d_hidden_is_zero_outside_gathered_rows(backend, device, N, D):
    require(backend, device)
    case = make_case(N, D, 5, device=device)
    d = run(case, backend)["d_hidden"]
    used = torch.zeros(N, dtype=torch.bool, device=d.device)
    used[case["chosen_index"]] = True
    used[case["rejected_index"]] = True
    assert torch.count_nonzero(d[~used]) == 0
    assert torch.all(d[used].abs().sum(1) > 0)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_in_a_gathered_row_gives_nan_loss(backend, device, dtype):
    require(backend, device)
    case = make_case(10, 32, 3, dtype=dtype, device=device)
    case["chosen_index"] = torch.tensor([0, 1, 2], device=device)
    case["rejected_index"] = torch.tensor([3, 4, 5], device=device)
    case["hidden"][9, 5] = float("nan")  # not gathered: stays invisible
    assert torch.isfinite(pairwise_reward_loss(**case, backend=backend).loss)
    case["hidden"][4, 7] = float("nan")
    out = pairwise_reward_loss(**case, backend=backend)
    assert torch.isnan(out.loss)
    assert torch.isnan(out.rejected_rewards[1]) and torch.isfinite(out.chosen_rewards).all()


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
def test_large_rewards_do_not_overflow(backend, device):
    require(backend, device)
    case = make_case(8, 4, 2, device=device, bias=False, margin=None)
    case["hidden"] = case["hidden"] * 1e4
    check(case, backend, torch.float32)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
def test_float64_inputs_accumulate_in_float64(backend, device):
    require(backend, device)
    case = make_case(30, 50, 8, dtype=torch.float64, device=device)
    out = run(case, backend)
    assert out["chosen"].dtype == torch.float64
    assert_matches(out, run(case, backend, reference=True), torch.float64)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
def test_weight_as_linear_weight(backend, device):
    require(backend, device)
    case = make_case(12, 20, 4, device=device)
    head = torch.nn.Linear(20, 1, bias=False).to(device)
    a = pairwise_reward_loss(case["hidden"], head.weight, case["chosen_index"], case["rejected_index"],
                             backend=backend)
    b = pairwise_reward_loss(case["hidden"], head.weight.reshape(-1), case["chosen_index"],
                             case["rejected_index"], backend="torch")
    torch.testing.assert_close(a.loss, b.loss)
    a.loss.backward()
    assert head.weight.grad.shape == (1, 20)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_gradcheck(backend):
    require(backend, "cpu")
    case = make_case(9, 6, 5, dtype=torch.float64)
    hidden = case["hidden"].clone().requires_grad_(True)
    weight = case["weight"].clone().requires_grad_(True)
    bias = case["bias"].clone().requires_grad_(True)
    chosen = case["chosen_index"]
    chosen[0] = case["rejected_index"][0]

    def f(h, w, b):
        out = pairwise_reward_loss(h, w, chosen, case["rejected_index"], bias=b, margin=case["margin"],
                                   center_coef=0.05, backend=backend)
        return out.loss, out.chosen_rewards, out.rejected_rewards

    assert torch.autograd.gradcheck(f, (hidden, weight, bias))
    tie = torch.tensor([True, False, True, False, False])

    def davidson(h, w, b, log_nu):
        out = pairwise_reward_loss(h, w, chosen, case["rejected_index"], bias=b, margin=case["margin"],
                                   center_coef=0.05, backend=backend, log_nu=log_nu, tie=tie)
        return out.loss, out.chosen_rewards, out.rejected_rewards

    log_nu = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(davidson, (hidden, weight, bias, log_nu))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_saves_gathered_rows_not_hidden(backend, device, dtype):
    """What autograd keeps for the backward is O(P·D) (the gathered rows), not O(N·D) (hidden)."""
    require(backend, device)
    N, D, P = 50_000, 64, 4
    case = make_case(N, D, P, dtype=dtype, device=device)
    hidden = case["hidden"].requires_grad_(True)
    weight = case["weight"].requires_grad_(True)
    bias = case["bias"].requires_grad_(True)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = pairwise_reward_loss(hidden, weight, case["chosen_index"], case["rejected_index"], bias=bias,
                                   margin=case["margin"], center_coef=0.01, backend=backend)
    # Rows in float32 (2P·D·4) plus a few [P], [2P] and [D] vectors; hidden alone is N·D·element_size.
    budget = 2 * P * D * 4 + 8 * D * 8 + 64 * P * 8
    assert 0 < sum(saved) <= budget < N * D * hidden.element_size() // 100, saved
    out.loss.backward()
    assert hidden.grad.shape == (N, D) and weight.grad is not None and bias.grad is not None


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("kind", ["columns_int64", "columns_int32", "offset_stride3_int64", "contiguous_int32"])
def test_index_strides_and_dtypes(backend, device, kind):
    """chosen / rejected as views with a stride (``pairs[:, 0]``, or every third entry of a buffer past an
    offset) or int32: the same loss and gradients as contiguous int64 indices, on every backend (and a
    strided margin with them)."""
    require(backend, device)
    case = make_case(30, 40, 9, device=device)
    P = case["chosen_index"].shape[0]
    pairs = torch.stack([case["chosen_index"], case["rejected_index"]], dim=1)  # [P, 2]
    if kind == "columns_int64":
        chosen, rejected = pairs[:, 0], pairs[:, 1]
    elif kind == "columns_int32":
        pairs = pairs.int()
        chosen, rejected = pairs[:, 0], pairs[:, 1]
    elif kind == "offset_stride3_int64":
        buf = torch.full((3 * P + 1,), -7, dtype=torch.int64, device=device)
        buf[1::3] = case["chosen_index"]
        buf[2::3] = case["rejected_index"]
        chosen, rejected = buf[1::3], buf[2::3]
    else:
        chosen, rejected = case["chosen_index"].int(), case["rejected_index"].int()
    assert torch.equal(chosen.long(), case["chosen_index"]) and torch.equal(rejected.long(), case["rejected_index"])
    assert chosen.is_contiguous() == (kind == "contiguous_int32")
    margin = torch.stack([case["margin"], -case["margin"]], dim=1)[:, 0]  # stride 2
    assert not margin.is_contiguous()
    strided = dict(case, chosen_index=chosen, rejected_index=rejected, margin=margin)
    for reduction in ("mean", "none"):
        assert_matches(run(strided, backend, reduction=reduction, center_coef=0.05),
                       run(case, backend, reduction=reduction, center_coef=0.05, reference=True), torch.float32)
