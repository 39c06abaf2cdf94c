"""Backend choice, the compiled extension, its JIT fallback, the package layout and rmfast-env."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from rmfast import backends, pairwise_reward_loss
from rmfast.nn import RewardHead

ROOT = Path(__file__).resolve().parents[1]


def small():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 5, generator=g), torch.randn(5, generator=g), torch.tensor([0, 1]), torch.tensor([2, 3])


def test_auto_uses_the_cpu_extension_for_cpu_tensors():
    assert backends.select("auto", "cpu") == "cpu"


def test_compiled_extension_is_built_with_cuda_kernels_where_nvcc_exists():
    from rmfast import _extension
    from rmfast._toolchain import find_cuda_home

    source, build, why_not = _extension.info()
    assert source == "compiled", why_not
    assert build["with_cuda"] == (torch.version.cuda is not None and find_cuda_home() is not None)


def test_rmfast_backend_environment_variable_sets_the_auto_choice(monkeypatch):
    monkeypatch.setenv("RMFAST_BACKEND", "torch")
    assert backends.select("auto", "cpu") == "torch"
    assert backends.select("cpu", "cpu") == "cpu"  # an explicit argument wins
    monkeypatch.setenv("RMFAST_BACKEND", "auto")
    assert backends.select("auto", "cpu") == "cpu"


def test_unavailable_backend_warns_once_and_falls_back(monkeypatch):
    monkeypatch.setattr(backends, "_warned", set())
    hidden, weight, c, r = small()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = pairwise_reward_loss(hidden, weight, c, r, backend="cuda")
        b = pairwise_reward_loss(hidden, weight, c, r, backend="cuda")
    messages = [str(w.message) for w in caught if "rmfast" in str(w.message)]
    assert len(messages) == 1 and "'cuda' unavailable" in messages[0] and "'cpu'" in messages[0]
    torch.testing.assert_close(a.loss, b.loss)
    torch.testing.assert_close(a.loss, pairwise_reward_loss(hidden, weight, c, r, backend="torch").loss)


def test_unknown_backend_name_is_reported():
    assert "unknown backend" in backends.unavailable_reason("tpu", "cpu")


def test_reward_head_module_matches_functional():
    hidden, _, c, r = small()
    head = RewardHead(5, bias=True)
    with torch.no_grad():
        head.bias.fill_(0.3)
    out = head(hidden, c, r, margin=0.1)
    ref = pairwise_reward_loss(hidden, head.weight, c, r, bias=head.bias, margin=0.1, backend="torch")
    torch.testing.assert_close(out.loss, ref.loss)
    torch.testing.assert_close(head.rewards(hidden)[c], out.chosen_rewards)
    out.loss.backward()
    assert head.weight.grad is not None and head.bias.grad is not None
    assert "hidden_size=5, bias=True" in repr(head)


def test_reward_head_rejects_empty_hidden_size():
    with pytest.raises(ValueError, match="hidden_size"):
        RewardHead(0)


def test_kernels_package_is_rmfast_kernels():
    import rmfast.kernels

    assert Path(rmfast.kernels.__file__).resolve().parent == ROOT / "rmfast" / "kernels"
    assert callable(rmfast.kernels.pairwise_loss_fwd)


@pytest.mark.slow  # a process of its own (imports torch and the libraries): over 5 s
def test_no_top_level_package_of_ours_hides_another():
    """Run from the repository root (where the current folder comes first on sys.path), no folder of ours
    may stand in for an installed package: transformers imports the hub's `kernels` package when it finds one,
    and a top-level kernels/ of ours broke every model load."""
    ours = sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").exists())
    assert ours == ["rmfast"], ours
    out = subprocess.run([sys.executable, "-c", "import transformers.integrations.hub_kernels"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


@pytest.mark.slow  # a process of its own (imports torch and the libraries): over 5 s
def test_rmfast_env_reports_versions_and_backends():
    out = subprocess.run([sys.executable, "-m", "rmfast.env", "--json"], capture_output=True, text=True,
                         check=True)
    facts = json.loads(out.stdout)
    assert facts["torch"] == torch.__version__
    assert facts["backends"]["torch/cpu"] == "ok"
    assert facts["backends"]["cpu/cpu"] == "ok"
    assert "TRITON_INTERPRET" in facts["backends"]["triton/cpu"] or facts["backends"]["triton/cpu"] == "ok"
    for key in ("triton", "deepspeed", "transformers", "torch CUDA", "extension"):
        assert key in facts


@pytest.mark.slow  # a process of its own (imports torch and the libraries): over 5 s
def test_import_without_extension_falls_back_to_torch_with_a_warning(tmp_path):
    code = (
        "import warnings, torch, rmfast\n"
        "from rmfast import backends\n"
        "warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    out = rmfast.pairwise_reward_loss(torch.randn(4, 3), torch.randn(3), torch.tensor([0]), "
        "torch.tensor([1]))\n"
        "print(backends.select('auto', 'cpu'), out.loss.item() > 0, "
        "any('extension is missing' in str(x.message) for x in w))\n"
    )
    env = dict(os.environ, RMFAST_EXTENSION="none")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["torch", "True", "True"]


@pytest.mark.slow
def test_jit_build_takes_over_when_the_compiled_module_is_absent(tmp_path):
    code = (
        "import torch, rmfast\n"
        "from rmfast import _extension, backends\n"
        "h = torch.randn(6, 7, requires_grad=True); w = torch.randn(7)\n"
        "c = torch.tensor([0, 2]); r = torch.tensor([1, 3])\n"
        "a = rmfast.pairwise_reward_loss(h, w, c, r, backend='cpu'); a.loss.backward()\n"
        "g = h.grad.clone(); h.grad = None\n"
        "b = rmfast.pairwise_reward_loss(h, w, c, r, backend='torch'); b.loss.backward()\n"
        "torch.testing.assert_close(a.loss, b.loss); torch.testing.assert_close(g, h.grad)\n"
        "print(_extension.info()[0], backends.select('auto', 'cpu'))\n"
    )
    env = dict(os.environ, RMFAST_EXTENSION="jit", TORCH_EXTENSIONS_DIR=str(tmp_path), MAX_JOBS="2")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["jit", "cpu"]


@pytest.mark.slow  # a process of its own (imports torch and the libraries): over 5 s
def test_demo_learns_the_preference():
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "fused_loss_demo.py"), "--steps", "30"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    final = out.stdout.strip().splitlines()[-1]
    accuracy = float(final.rsplit("→", 1)[1].strip().rstrip("%"))
    assert accuracy >= 95.0, final
