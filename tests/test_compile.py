"""torch.compile(fullgraph=True) traces the fused loss on every backend with kernels and gives eager's loss,
rewards and gradients; the kernels run on fake tensors."""

import os
import subprocess
import sys

import pytest
import torch

from rmfast import backends, pairwise_reward_loss

COMPILED = ["cpu", "torch", "triton"]


def require(backend):
    reason = backends.unavailable_reason(backend, "cpu")
    assert reason is None, f"backend {backend} cannot run on cpu here: {reason}"


def make_case(N=40, D=24, P=6, seed=0, lead=None):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g)
    case = {
        "hidden": hidden.reshape(*lead, D) if lead else hidden,
        "weight": torch.randn(D, generator=g) / D**0.5,
        "bias": torch.randn(1, generator=g),
        "chosen": torch.randint(0, N, (P,), generator=g),
        "rejected": torch.randint(0, N, (P,), generator=g),
        "margin": torch.rand(P, generator=g),
    }
    case["chosen"][0] = case["rejected"][0]  # a row on both sides of a pair
    case["chosen"][1] = case["chosen"][2]  # a row in two pairs
    return case


def loss_fn(backend, reduction="mean"):
    def fn(hidden, weight, bias, chosen, rejected, margin):
        out = pairwise_reward_loss(hidden, weight, chosen, rejected, bias=bias, margin=margin, center_coef=0.05,
                                   reduction=reduction, backend=backend)
        return out.loss, out.chosen_rewards, out.rejected_rewards

    return fn


def run(fn, case):
    """Outputs and the gradients of hidden, weight and bias under random upstream gradients."""
    leaves = {k: case[k].clone().requires_grad_(True) for k in ("hidden", "weight", "bias")}
    loss, rc, rr = fn(leaves["hidden"], leaves["weight"], leaves["bias"], case["chosen"], case["rejected"],
                      case["margin"])
    g = torch.Generator().manual_seed(1)
    upstream = [torch.randn(t.shape, generator=g) for t in (loss, rc, rr)]
    torch.autograd.backward([loss, rc, rr], upstream)
    return [loss, rc, rr] + [leaves[k].grad for k in ("hidden", "weight", "bias")]


def assert_same(got, want):
    names = ["loss", "chosen_rewards", "rejected_rewards", "d_hidden", "d_weight", "d_bias"]
    for name, a, b in zip(names, got, want):
        assert a is not None, f"{name} is missing"
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fullgraph_aot_eager_equals_eager(backend, reduction):
    require(backend)
    torch._dynamo.reset()
    case = make_case()
    compiled = torch.compile(loss_fn(backend, reduction), fullgraph=True, backend="aot_eager")
    assert_same(run(compiled, case), run(loss_fn(backend, reduction), case))


@pytest.mark.parametrize("backend", COMPILED)
def test_fullgraph_3d_hidden_and_linear_weight(backend):
    require(backend)
    torch._dynamo.reset()
    case = make_case(lead=(4, 10))
    case["weight"] = case["weight"].reshape(1, -1)  # nn.Linear(D, 1).weight

    def fn(hidden, weight, bias, chosen, rejected, margin):
        return pairwise_reward_loss(hidden, weight, chosen, rejected, bias=bias, margin=0.25, backend=backend)

    def both(f):
        def g(*args):
            out = f(*args)
            return out.loss, out.chosen_rewards, out.rejected_rewards
        return g

    compiled = torch.compile(both(fn), fullgraph=True, backend="aot_eager")
    assert_same(run(compiled, case), run(both(fn), case))


@pytest.mark.parametrize("backend", COMPILED)
def test_fullgraph_davidson_equals_eager(backend):
    """Davidson's loss inside the op, its tie parameter learnt: the compiled graph gives eager's loss and
    gradients, log ν's among them."""
    require(backend)
    torch._dynamo.reset()
    case = make_case()
    tie = torch.arange(6) % 2 == 0

    def fn(hidden, weight, bias, chosen, rejected, margin, log_nu):
        out = pairwise_reward_loss(hidden, weight, chosen, rejected, bias=bias, margin=margin, backend=backend,
                                   log_nu=log_nu, tie=tie)
        return out.loss, out.chosen_rewards, out.rejected_rewards

    def grads(f):
        leaves = [case[k].clone().requires_grad_(True) for k in ("hidden", "weight", "bias")]
        log_nu = torch.tensor(0.7, requires_grad=True)
        outs = f(*leaves, case["chosen"], case["rejected"], case["margin"], log_nu)
        (outs[0] + 0.1 * outs[1].sum()).backward()
        return list(outs) + [t.grad for t in leaves] + [log_nu.grad]

    got, want = grads(torch.compile(fn, fullgraph=True, backend="aot_eager")), grads(fn)
    assert got[-1] is not None and float(got[-1]) != 0.0
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_fullgraph_inductor_equals_eager(backend):
    require(backend)
    torch._dynamo.reset()
    case = make_case(N=64, D=40, P=8)
    compiled = torch.compile(loss_fn(backend), fullgraph=True, backend="inductor")
    assert_same(run(compiled, case), run(loss_fn(backend), case))


def test_extension_ops_run_on_fake_tensors():
    require("cpu")
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        hidden = torch.empty(10, 3)
        weight = torch.empty(3)
        index = torch.zeros(4, dtype=torch.long)
        rc, rr, loss = torch.ops.rmfast.pairwise_loss_fwd(hidden, weight, None, index[:2], index[2:], None)
        _, _, davidson = torch.ops.rmfast.pairwise_loss_fwd(hidden, weight, None, index[:2], index[2:], None,
                                                            torch.zeros(1), torch.zeros(2, dtype=torch.bool))
        assert davidson.shape == (2,)
        d_hidden, d_weight = torch.ops.rmfast.pairwise_loss_bwd(hidden, weight, index, torch.empty(4), True)
    assert [t.shape for t in (rc, rr, loss, d_weight)] == [(2,), (2,), (2,), (3,)]
    assert d_hidden.shape == (10, 3) and d_hidden.dtype == hidden.dtype


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_out_of_range_index_fails_under_compile(backend):
    require(backend)
    torch._dynamo.reset()
    case = make_case()
    case["rejected"][3] = 40  # hidden has 40 rows
    compiled = torch.compile(loss_fn(backend), fullgraph=True, backend="aot_eager")
    with pytest.raises(RuntimeError, match="outside hidden's 40 rows"):
        run(compiled, case)


COLD = """
import sys
import torch
from rmfast import backends, pairwise_reward_loss

g = torch.Generator().manual_seed(0)
hidden, weight = torch.randn(20, 8, generator=g), torch.randn(8, generator=g)
chosen, rejected = torch.randint(0, 20, (5,), generator=g), torch.randint(0, 20, (5,), generator=g)
for backend in sys.argv[1:]:  # each one's first call in this process is under torch.compile
    def fn(hidden, weight, chosen, rejected):
        out = pairwise_reward_loss(hidden, weight, chosen, rejected, margin=0.1, center_coef=0.05, backend=backend)
        return out.loss

    h = hidden.clone().requires_grad_(True)
    loss = torch.compile(fn, fullgraph=True, backend="aot_eager")(h, weight, chosen, rejected)
    loss.backward()
    ref_h = hidden.clone().requires_grad_(True)
    ref = pairwise_reward_loss(ref_h, weight, chosen, rejected, margin=0.1, center_coef=0.05, backend="torch").loss
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(h.grad, ref_h.grad)
    print(backend, backends.select(backend, "cpu"))
"""


@pytest.mark.slow  # a process of its own (imports torch and the libraries): over 5 s
def test_fullgraph_compile_as_the_first_call_in_a_fresh_process():
    """Backend selection (and the extension's first load, under its lock) under a cold torch.compile: nothing
    in it may be untraceable (a lock, an import, a warning). One fresh process: auto first (it loads the
    extension), then triton (its first import), torch, and cpu asked for by name."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("RMFAST_BACKEND", None)
    order = ["auto", "triton", "torch", "cpu"]
    out = subprocess.run([sys.executable, "-c", COLD, *order], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["auto", "cpu", "triton", "triton", "torch", "torch", "cpu", "cpu"]
