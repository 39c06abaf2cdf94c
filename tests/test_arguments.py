"""Bad arguments raise a ValueError that names the argument; good ones in every accepted form work."""

import pytest
import torch

from rmfast import pairwise_reward_loss


def good():
    return {
        "hidden": torch.randn(6, 4),
        "weight": torch.randn(4),
        "chosen_index": torch.tensor([0, 2]),
        "rejected_index": torch.tensor([1, 3]),
    }


def meta(shape):
    return torch.empty(shape, device="meta")


BAD = {
    "index out of range": ({"chosen_index": torch.tensor([0, 6])}, "chosen_index", "6 rows"),
    "negative index": ({"rejected_index": torch.tensor([1, -1])}, "rejected_index", "valid: 0..5"),
    "float index": ({"chosen_index": torch.tensor([0.0, 2.0])}, "chosen_index", "integer"),
    "bool index": ({"rejected_index": torch.tensor([True, False])}, "rejected_index", "integer"),
    "list index": ({"chosen_index": [0, 2]}, "chosen_index", "torch.Tensor"),
    "2-D index": ({"chosen_index": torch.tensor([[0, 2]])}, "chosen_index", "1-D"),
    "length mismatch": ({"rejected_index": torch.tensor([1, 3, 4])}, "rejected_index", "3 pairs"),
    "no pairs": ({"chosen_index": torch.tensor([], dtype=torch.long),
                  "rejected_index": torch.tensor([], dtype=torch.long)}, "chosen_index", "at least one pair"),
    "hidden/weight mismatch": ({"weight": torch.randn(5)}, "weight", "D=4"),
    "weight matrix": ({"weight": torch.randn(2, 4)}, "weight", "[D]"),
    "integer hidden": ({"hidden": torch.ones(6, 4, dtype=torch.long)}, "hidden", "float"),
    "1-D hidden": ({"hidden": torch.randn(4)}, "hidden", "[N, D]"),
    "empty hidden": ({"hidden": torch.randn(0, 4)}, "hidden", "empty"),
    "hidden on another device": ({"hidden": meta((6, 4))}, "weight", "device"),
    "index on another device": ({"chosen_index": torch.tensor([0, 1], device="meta")}, "chosen_index", "device"),
    "margin of wrong length": ({"margin": torch.zeros(3)}, "margin", "[P=2]"),
    "margin of wrong type": ({"margin": "1"}, "margin", "float"),
    "non-finite margin": ({"margin": float("inf")}, "margin", "finite"),
    "bias of two values": ({"bias": torch.zeros(2)}, "bias", "one value"),
    "unknown reduction": ({"reduction": "avg"}, "reduction", "mean"),
    "non-finite center_coef": ({"center_coef": float("nan")}, "center_coef", "finite"),
    "check_indices not a bool": ({"check_indices": "yes"}, "check_indices", "None, True or False"),
    "index out of range, checked on request": ({"chosen_index": torch.tensor([0, 6]), "check_indices": True},
                                               "chosen_index", "6 rows"),
}


@pytest.mark.parametrize("change,argument,detail", list(BAD.values()), ids=list(BAD))
def test_bad_argument_raises_value_error_naming_it(change, argument, detail):
    kwargs = good()
    kwargs.update(change)
    with pytest.raises(ValueError) as info:
        pairwise_reward_loss(**kwargs)
    assert f"`{argument}`" in str(info.value)
    assert detail in str(info.value)


def test_int32_indices_are_accepted():
    kwargs = good()
    ref = pairwise_reward_loss(**kwargs, backend="torch").loss
    kwargs["chosen_index"] = kwargs["chosen_index"].int()
    kwargs["rejected_index"] = kwargs["rejected_index"].int()
    torch.testing.assert_close(pairwise_reward_loss(**kwargs).loss, ref)


def test_float_bias_and_scalar_margin_tensor_are_accepted():
    kwargs = good()
    a = pairwise_reward_loss(**kwargs, bias=0.5, margin=torch.tensor(0.25), backend="torch")
    b = pairwise_reward_loss(**kwargs, bias=torch.tensor([0.5]), margin=0.25)
    torch.testing.assert_close(a.loss, b.loss)
    torch.testing.assert_close(a.chosen_rewards, b.chosen_rewards)


def test_loss_value_is_bradley_terry():
    hidden = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    weight = torch.tensor([2.0, -1.0])
    out = pairwise_reward_loss(hidden, weight, torch.tensor([0, 2]), torch.tensor([1, 0]), margin=0.5,
                               reduction="none")
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(out.rejected_rewards, torch.tensor([-1.0, 2.0]))
    expected = -torch.nn.functional.logsigmoid(torch.tensor([3.0 - 0.5, 0.0 - 0.5]))
    torch.testing.assert_close(out.loss, expected)


def test_check_indices_false_skips_the_host_check(monkeypatch):
    kwargs = good()
    ref = pairwise_reward_loss(**kwargs).loss

    def no_host_check(*args, **kw):
        raise AssertionError("the index range was checked")

    monkeypatch.setattr(torch, "aminmax", no_host_check)
    torch.testing.assert_close(pairwise_reward_loss(**kwargs, check_indices=False).loss, ref)
    with pytest.raises(AssertionError, match="was checked"):
        pairwise_reward_loss(**kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
def test_cuda_default_does_not_sync_and_true_checks_on_the_host(backend):
    kwargs = {k: v.cuda() for k, v in good().items()}
    kwargs["hidden"].requires_grad_(True)
    kwargs["weight"].requires_grad_(True)
    pairwise_reward_loss(**kwargs, backend=backend, margin=0.5).loss.backward()  # warm-up: kernel builds
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        pairwise_reward_loss(**kwargs, backend=backend, margin=0.5).loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    kwargs["chosen_index"] = torch.tensor([0, 6], device="cuda")
    with pytest.raises(ValueError, match="`chosen_index`.*6 rows"):
        pairwise_reward_loss(**kwargs, backend=backend, check_indices=True)
