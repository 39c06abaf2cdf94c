"""The fused pairwise loss against its floor and against the usual ways to write it: forward, and
forward+backward, time per call and peak memory.

Contenders, on hidden states [2P, L, D] of P pairs (chosen rows first, right padding), made on the device:
  rmfast-*   pairwise_reward_loss with each backend that can run on the device (triton, cuda / cpu, torch)
  eager      index the last tokens → nn.Linear → logsigmoid
  dschat     DeepSpeed-Chat step 2: value head on every token, then per pair the mean of -log σ over the span
             from the first differing token to the end (a Python loop with host syncs: only up to
             --dschat-max-pairs pairs, where it finishes in time)
  compile    torch.compile of eager (unless --no-compile; compiled once for all shapes, dynamic shapes)
  zeros_like torch.zeros_like(hidden), forward+backward only: what allocating and filling d_hidden costs

Time per call: on CUDA each contender runs --iters times back to back (fewer when one call is slow: at most
about --budget-ms per contender and mode) after a warm-up call, the whole loop timed with CUDA events. On
CPU the contenders take turns: --rounds rounds, in each every contender runs its calls back to back (about
--budget-ms / --rounds of them) timed by the wall clock; the median over rounds is reported. The value
head's weight is a trained leaf (requires grad) for every contender; forward+backward clears both gradients
and calls backward, as a training step does.

Floor: the bytes the op must move over the device's copy bandwidth, measured in the same run with a large
device-to-device copy (bytes read + bytes written per second). The forward reads the 2P gathered rows
(2P·D elements), the head and the indices and writes 3 [P] fp32 vectors; forward+backward adds the dense
d_hidden [N, D] written once (zeros outside the rows: any backward into hidden must produce it), the rows
read again (d_weight needs the upstream gradient, known only in backward) and d_weight. × floor = time /
floor; × eager = eager's time / the contender's. Peak memory: what one forward+backward adds on top of the
inputs (CUDA: the allocator's peak; CPU: the process's peak RSS, reset through /proc/self/clear_refs).
Writes bench_loss_<tag>.{csv,md,png} in --out (default benchmarks/results).

    python benchmarks/bench_loss.py                 # CPU sweep
    python benchmarks/bench_loss.py --device cuda   # GPU sweep (16,384 × 2,048 / 4,096 / 8,192 bf16 and more)
    python benchmarks/bench_loss.py --shapes "16,64,512,float32" --no-compile   # one quick shape
    python benchmarks/bench_loss.py --headline results.csv   # one line: the largest-D 16,384-row shape
    python benchmarks/bench_loss.py --objective regression --heads 5 --no-compile   # the [A, D] head

Other objectives (--objective), each computed inside the op: davidson (Davidson's loss, every third comparison
a tie; eager: index → linear → the same terms in torch), plackett_luce (the 2P sequences as groups of 4, each
ranked at random: rmfast.plackett_luce_loss, every response's reward and each group's terms; eager: index →
linear → the terms in torch) and regression (the [A, D] attribute head, --heads A, and the masked mean squared
error against targets with a fifth missing: rmfast.attribute_regression_loss; eager: index → linear [A, D] →
the same loss in torch).
Their floors count the A-wide head and outputs; dschat and compile are Bradley–Terry's only.
"""

import argparse
import csv
import gc
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rmfast import attribute_regression_loss, backends, pairwise_reward_loss, plackett_luce_loss
from rmfast.objective import davidson_terms, plackett_luce_terms

OBJECTIVES = ("bradley_terry", "davidson", "plackett_luce", "regression")
LOG_NU = 0.5

RESULTS = Path(__file__).resolve().parent / "results"

CPU_SHAPES = [  # pairs, seq_len, hidden, dtype
    (16, 64, 512, "float32"),  # small: 2,048 rows, where the fixed cost per call shows
    (32, 64, 1024, "float32"),  # 4,096 rows
    (16, 512, 2048, "float32"),
    (256, 64, 1024, "float32"),
    (32, 64, 4097, "float32"),
    (64, 128, 4096, "float32"),
    (16, 512, 2048, "bfloat16"),
]
CUDA_SHAPES = [  # 16,384 rows at the hidden sizes of 1B, 7B and 70B models; 65,536 rows; fp32 and fp16
    (16, 512, 2048, "bfloat16"),
    (16, 512, 4096, "bfloat16"),
    (16, 512, 8192, "bfloat16"),
    (64, 512, 4096, "bfloat16"),
    (16, 512, 4096, "float32"),
    (256, 64, 4096, "float16"),
]
MODES = ("fwd", "fwd+bwd")


def pin_cpu_allocator(threshold=1 << 20):
    """Send every CPU buffer of at least `threshold` bytes to mmap, fresh from the kernel, every time.

    glibc moves its mmap threshold as buffers are freed, so the same 8 MB zeros_like costs 0.3 ms (reused
    heap) or 2 ms (fresh pages) depending on what ran before; pinning it gives every contender the same
    allocation path. Returns whether it could be pinned."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold)) and bool(libc.mallopt(M_TRIM_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


def machine_description(device):
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    desc = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    if device == "cuda":
        import triton

        desc = (f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda}, triton {triton.__version__}); "
                f"host {desc}")
    return desc


def make_inputs(pairs, seq_len, hidden_size, dtype, device, seed=0):
    """Hidden [2P, L, D] and head [D] drawn on `device`; token ids [2P, L] with shared prompts and right
    padding (pad id 0); the last-token rows of chosen [P] and rejected [P]."""
    rng = np.random.default_rng(seed)
    prompt = rng.integers(seq_len // 4, seq_len // 2, pairs)
    lengths = rng.integers(np.tile(prompt + 1, 2), seq_len + 1)  # each row: its prompt and at least one token
    ids = rng.integers(1, 32000, (2 * pairs, seq_len))
    cols = np.arange(seq_len)
    shared = cols[None, :] < prompt[:, None]
    ids[pairs:][shared] = ids[:pairs][shared]  # the rejected row repeats its pair's prompt
    ids[cols[None, :] >= lengths[:, None]] = 0
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(2 * pairs, seq_len, hidden_size, generator=g, device=device, dtype=dtype)
    weight = torch.randn(hidden_size, generator=g, device=device, dtype=dtype) / hidden_size**0.5
    last = torch.from_numpy(np.arange(2 * pairs) * seq_len + lengths - 1).to(device)
    return hidden, torch.from_numpy(ids).to(device), last[:pairs], last[pairs:], weight


def dschat_loss(hidden, weight, input_ids, pad_id=0):
    """DeepSpeed-Chat step 2's RewardModel.forward loss (num_padding_at_beginning=0)."""
    bs = input_ids.shape[0] // 2
    seq_len = input_ids.shape[1]
    rewards = (hidden @ weight).float()  # v_head on every token: [2B, L]
    chosen_ids, rejected_ids = input_ids[:bs], input_ids[bs:]
    chosen_rewards, rejected_rewards = rewards[:bs], rewards[bs:]
    loss = 0.0
    for i in range(bs):
        chosen_id, rejected_id = chosen_ids[i], rejected_ids[i]
        c_inds = (chosen_id == pad_id).nonzero()
        c_ind = c_inds[0].item() if len(c_inds) > 0 else seq_len
        divergence = (chosen_id != rejected_id).nonzero()
        if len(divergence) == 0:
            end_ind = rejected_rewards.size(-1)
            div_ind = end_ind - 1
        else:
            r_inds = (rejected_id == pad_id).nonzero()
            r_ind = r_inds[0].item() if len(r_inds) > 0 else seq_len
            end_ind = max(c_ind, r_ind)
            div_ind = divergence[0]
        c = chosen_rewards[i, div_ind:end_ind]
        r = rejected_rewards[i, div_ind:end_ind]
        loss = loss - F.logsigmoid(c - r).mean()
    return loss / bs


def eager_loss(hidden, weight, chosen, rejected):
    """The usual eager code: index the last tokens → linear value head → logsigmoid."""
    rows = hidden.reshape(-1, hidden.shape[-1])[torch.cat([chosen, rejected])]
    r = F.linear(rows, weight.unsqueeze(0)).squeeze(-1).float()
    rc, rr = r.split(chosen.shape[0])
    return -F.logsigmoid(rc - rr).mean()


_compiled = {}


def compiled_eager():
    """torch.compile of eager_loss, built once per process with dynamic shapes: each new shape reuses it
    (a new dtype or device recompiles once) instead of paying a cold compile."""
    if "fn" not in _compiled:
        _compiled["fn"] = torch.compile(eager_loss, dynamic=True)
    return _compiled["fn"]


def masked_mse(predicted, target):
    have = torch.isfinite(target)
    err = torch.where(have, predicted - torch.nan_to_num(target), torch.zeros_like(predicted))
    return err.square().sum() / have.sum()


def objective_contenders(device, objective, chosen, rejected, weight, target):
    """name → loss function of hidden for davidson / plackett_luce / regression: each rmfast backend and eager.
    plackett_luce ranks groups of 4 of the 2P sequences (target: their group [2P] and scores [2P])."""
    index = torch.cat([chosen, rejected])
    tie = torch.arange(chosen.shape[0], device=device) % 3 == 1  # davidson: every third comparison a tie
    out = {}

    def rmfast_fn(b):
        if objective == "plackett_luce":
            group, scores = target

            groups = int(group[-1]) + 1
            # rewards and the groups' terms inside the op
            return lambda h: plackett_luce_loss(h, weight, index, group, scores, backend=b, num_groups=groups).loss
        if objective == "davidson":  # inside the op: its log_nu and tie
            return lambda h: pairwise_reward_loss(h, weight, chosen, rejected, backend=b, log_nu=LOG_NU, tie=tie).loss
        # the masked mean squared error inside the op
        return lambda h: attribute_regression_loss(h, weight, index, target, backend=b).loss

    for name in ("triton", "cuda", "cpu", "torch"):
        if backends.unavailable_reason(name, device) is None:
            out[f"rmfast-{name}"] = rmfast_fn(name)

    def eager(h):
        rows = h.reshape(-1, h.shape[-1])[index]
        if objective == "plackett_luce":
            r = F.linear(rows, weight.unsqueeze(0)).squeeze(-1).float()
            return plackett_luce_terms(r, target[0], target[1], int(target[0][-1]) + 1).mean()
        if objective == "davidson":
            r = F.linear(rows, weight.unsqueeze(0)).squeeze(-1).float()
            rc, rr = r.split(chosen.shape[0])
            return davidson_terms(rc, rr, LOG_NU, tie=tie).mean()
        return masked_mse(F.linear(rows, weight).float(), target)

    out["eager"] = eager
    out["zeros_like"] = None
    return out


def contenders(device, hidden, ids, chosen, rejected, weight, with_compile, dschat_max_pairs):
    """name → loss function of hidden (None: zeros_like, timed in forward+backward only)."""
    out = {}
    for name in ("triton", "cuda", "cpu", "torch"):
        if backends.unavailable_reason(name, device) is None:
            out[f"rmfast-{name}"] = (
                lambda h, b=name: pairwise_reward_loss(h, weight, chosen, rejected, backend=b).loss)
    out["eager"] = lambda h: eager_loss(h, weight, chosen, rejected)
    if with_compile:
        compiled = compiled_eager()
        try:
            probe = hidden.detach().requires_grad_(True)
            compiled(probe, weight, chosen, rejected).backward()
            weight.grad = None
            out["compile"] = lambda h: compiled(h, weight, chosen, rejected)
        except Exception as exc:  # report, don't abort the sweep
            print(f"  compile: skipped ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})")
    if chosen.shape[0] <= dschat_max_pairs:
        out["dschat"] = lambda h: dschat_loss(h, weight, ids)
    out["zeros_like"] = None
    return out


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def call(fn, hidden, weight, mode):
    """The work one call does: the forward (autograd recording, as in training), or forward+backward."""
    if fn is None:
        return lambda: torch.zeros_like(hidden)
    if mode == "fwd":
        return lambda: fn(hidden)

    def step():
        hidden.grad = weight.grad = None
        fn(hidden).backward()
    return step


def time_per_call(work, device, iters, budget_s):
    """(milliseconds per call, calls timed): a warm-up call, one call to size the loop, then up to `iters`
    calls back to back (at most about budget_s in all, at least 3), timed as one span: by CUDA events on
    the GPU (kernel time of the whole stream, launch gaps included), the wall clock on CPU."""
    work()
    sync(device)
    t0 = time.perf_counter()
    work()
    sync(device)
    one = time.perf_counter() - t0
    n = int(max(3, min(iters, budget_s / max(one, 1e-7))))
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            work()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / n, n
    t0 = time.perf_counter()
    for _ in range(n):
        work()
    return (time.perf_counter() - t0) * 1e3 / n, n


def time_interleaved(works, rounds, budget_s):
    """CPU: {name: (median milliseconds per call, calls timed)} of several contenders timed in turns. Each
    is warmed up and sized (n calls ≈ budget_s / rounds, at least one), then `rounds` times every contender
    runs its n calls back to back, one after another; the median over rounds of each contender's time per
    call is kept, so a slow moment of the machine (another process, a frequency change) is not charged to
    whoever ran then, and the order of contenders does not pick a winner."""
    sizes = {}
    for name, work in works.items():
        work()
        t0 = time.perf_counter()
        work()
        one = time.perf_counter() - t0
        sizes[name] = int(max(1, min(2000, budget_s / rounds / max(one, 1e-7))))
    samples = {name: [] for name in works}
    for _ in range(rounds):
        for name, work in works.items():
            n = sizes[name]
            t0 = time.perf_counter()
            for _ in range(n):
                work()
            samples[name].append((time.perf_counter() - t0) * 1e3 / n)
    return {name: (float(np.median(s)), sizes[name] * rounds) for name, s in samples.items()}


def copy_bandwidth(device, mib):
    """Bytes per second of a device-to-device copy of `mib` MiB (each byte read once and written once)."""
    n = mib << 20
    src = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    ms, _ = time_per_call(lambda: dst.copy_(src), device, 20, 1.0)
    return 2 * n / (ms * 1e-3)


def floor_bytes(pairs, rows, hidden_size, dtype, mode, heads=1):
    """Bytes the op must move (see the module docstring): gathered rows, head, indices and outputs for the
    forward; plus d_hidden written, the rows read again and d_weight for forward+backward. heads: A of an
    [A, D] head (its outputs [2P, A])."""
    e = torch.empty((), dtype=dtype).element_size()
    outputs = 3 * pairs * 4 if heads == 1 else 2 * pairs * heads * 4
    fwd = 2 * pairs * hidden_size * e + heads * hidden_size * 4 + 2 * pairs * 8 + outputs
    if mode == "fwd":
        return fwd
    return fwd + rows * hidden_size * e + 2 * pairs * hidden_size * e + heads * hidden_size * 4


def _rss_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra_bytes(fn, hidden, weight, device):
    """Memory a forward+backward adds at its peak, the gradient it leaves included."""
    hidden.grad = weight.grad = None
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the peak RSS
        base = _rss_bytes("VmRSS:")
    grad = torch.zeros_like(hidden) if fn is None else (fn(hidden).backward(), hidden.grad)[1]
    sync(device)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _rss_bytes("VmHWM:")
    del grad
    hidden.grad = weight.grad = None
    return max(peak - base, 0)


def bench_shape(device, pairs, seq_len, hidden_size, dtype_name, *, iters, budget_s, bandwidth, with_compile,
                dschat_max_pairs, objective="bradley_terry", heads=1, rounds=15):
    dtype = getattr(torch, dtype_name)
    hidden, ids, chosen, rejected, weight = make_inputs(pairs, seq_len, hidden_size, dtype, device)
    hidden.requires_grad_(True)
    if objective == "bradley_terry":
        weight.requires_grad_(True)
        fns = contenders(device, hidden, ids, chosen, rejected, weight, with_compile, dschat_max_pairs)
        ref = pairwise_reward_loss(hidden, weight, chosen, rejected, backend="torch").loss.item()
    else:
        g = torch.Generator(device=device).manual_seed(1)
        target = None
        if objective == "regression":
            weight = torch.randn(heads, hidden_size, generator=g, device=device, dtype=dtype) / hidden_size**0.5
            target = torch.randn(2 * pairs, heads, generator=g, device=device)
            target[torch.rand(target.shape, generator=g, device=device) < 0.2] = float("nan")
        elif objective == "plackett_luce":  # groups of 4 of the 2P sequences, each ranked at random
            group = torch.arange(2 * pairs, device=device) // 4
            target = (group, torch.rand(2 * pairs, generator=g, device=device))
        weight.requires_grad_(True)
        fns = objective_contenders(device, objective, chosen, rejected, weight, target)
        ref = fns["rmfast-torch"](hidden).item()
    for name, fn in fns.items():
        if fn is not None and name != "dschat":  # dschat's loss is another loss (a mean over spans)
            got = fn(hidden).item()
            tol = 1e-4 if dtype == torch.float32 else 2e-2
            assert abs(got - ref) <= tol * max(1.0, abs(ref)), f"{name} loss {got} != reference {ref}"
    rows = []
    n_rows = 2 * pairs * seq_len
    A = heads if objective == "regression" else 1
    for mode in MODES:
        floor_ms = floor_bytes(pairs, n_rows, hidden_size, dtype, mode, A) / bandwidth * 1e3
        works = {name: call(fn, hidden, weight, mode) for name, fn in fns.items()
                 if not (fn is None and mode == "fwd")}
        if device == "cuda":
            got = {}
            for name, work in works.items():
                got[name] = time_per_call(work, device, iters, budget_s)
                hidden.grad = weight.grad = None
        else:
            got = time_interleaved(works, rounds, budget_s)
            hidden.grad = weight.grad = None
        eager_ms = got["eager"][0]
        for name, (ms, n) in got.items():
            rows.append({
                "objective": objective, "heads": A,
                "device": device, "dtype": dtype_name, "pairs": pairs, "seq_len": seq_len, "rows": n_rows,
                "hidden": hidden_size, "mode": mode, "contender": name, "ms": round(ms, 5), "calls": n,
                "floor_ms": round(floor_ms, 5), "x_floor": round(ms / floor_ms, 3),
                "x_eager": round(eager_ms / ms, 3),
                "gb_per_s": round(floor_bytes(pairs, n_rows, hidden_size, dtype, mode, A) / (ms * 1e-3) / 1e9, 1),
                "peak_mb": (round(peak_extra_bytes(fns[name], hidden, weight, device) / 2**20, 2)
                            if mode == "fwd+bwd" else ""),
            })
    del hidden, ids, weight, fns
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["mode"] == "fwd+bwd"]
    shapes = list(dict.fromkeys((r["dtype"], r["pairs"], r["seq_len"], r["hidden"]) for r in rows))
    names = list(dict.fromkeys(r["contender"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(9, 1.8 * len(shapes)), 4.5))
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        xs, ys = [], []
        for s, shape in enumerate(shapes):
            for r in rows:
                if (r["dtype"], r["pairs"], r["seq_len"], r["hidden"]) == shape and r["contender"] == name:
                    xs.append(s + k * width)
                    ys.append(r["x_floor"])
        ax.bar(xs, ys, width, label=name)
    ax.axhline(1.1, color="k", ls="--", lw=0.8, label="1.1× floor")
    ax.set_yscale("log")
    ax.set_xticks([s + 0.4 - width / 2 for s in range(len(shapes))])
    ax.set_xticklabels([f"{2 * p * L:,}×{D}\n{dt} ({p} pairs)" for dt, p, L, D in shapes], fontsize=8)
    ax.set_xlabel("rows × hidden")
    ax.set_ylabel("forward+backward time / floor")
    what = f"{rows[0].get('objective', 'bradley_terry')}, A = {rows[0].get('heads', 1)}"
    ax.set_title(f"Fused end of the model ({what}), {rows[0]['device']}: time over bytes moved / copy bandwidth")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(rows):
    head = ["objective (A)", "dtype", "rows×hidden (pairs)", "mode", "contender", "ms", "× floor", "× eager (speed-up)",
            "GB/s", "peak MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        peak = f"{r['peak_mb']:.1f}" if r["peak_mb"] != "" else ""
        lines.append(f"| {r.get('objective', 'bradley_terry')} ({r.get('heads', 1)}) | {r['dtype']} | "
                     f"{r['rows']:,}×{r['hidden']} ({r['pairs']}) | {r['mode']} | {r['contender']} | "
                     f"{r['ms']:.4f} | {r['x_floor']:.2f} | {r['x_eager']:.2f} | {r['gb_per_s']:.1f} | {peak} |")
    return "\n".join(lines)


def headline(path):
    """One line from a results CSV: forward+backward of the 16,384-row shape with the largest D in bf16
    (else the last shape), each rmfast backend and eager against the floor."""
    rows = [r for r in csv.DictReader(open(path)) if r["mode"] == "fwd+bwd"]
    key = lambda r: (r["pairs"], r["seq_len"], r["hidden"], r["dtype"])  # noqa: E731
    pick = [r for r in rows if r["rows"] == "16384" and r["dtype"] == "bfloat16"]
    shape = key(max(pick, key=lambda r: int(r["hidden"])) if pick else rows[-1])
    mine = [r for r in rows if key(r) == shape and (r["contender"].startswith("rmfast-") or r["contender"] == "eager")]
    first = mine[0]
    floor = float(first["floor_ms"])
    return (f"fwd+bwd {int(first['rows']):,}×{first['hidden']} {first['dtype']} (floor {floor:.3f} ms): "
            + ", ".join(f"{r['contender']} {float(r['ms']):.3f} ms = {float(r['x_floor']):.2f}× floor, "
                        f"{float(r['x_eager']):.2f}× eager" for r in mine))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--iters", type=int, default=None, help="calls timed per contender and mode "
                        "(default: 200 on CUDA, 20 on CPU)")
    parser.add_argument("--rounds", type=int, default=15, help="CPU: rounds of turns (the median is reported)")
    parser.add_argument("--budget-ms", type=float, default=None,
                        help="at most about this long per contender and mode (default: 300 on CUDA, 3000 on CPU)")
    parser.add_argument("--copy-mib", type=int, default=None,
                        help="size of the copy that measures bandwidth (default: 1024 on CUDA, 256 on CPU)")
    parser.add_argument("--dschat-max-pairs", type=int, default=64,
                        help="the DeepSpeed-Chat loop only up to this many pairs (a host sync per pair)")
    parser.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    parser.add_argument("--no-pin", action="store_true",
                        help="CPU: leave glibc's mmap threshold alone instead of pinning it at 1 MiB")
    parser.add_argument("--shapes", default=None,
                        help="P,L,D,dtype;... (default: the built-in sweep for the device)")
    parser.add_argument("--tag", default=None, help="results file suffix (default: the device)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--headline", metavar="CSV", help="print the one-line summary of a results CSV and exit")
    parser.add_argument("--objective", default="bradley_terry", choices=OBJECTIVES,
                        help="the loss after the gather (default: bradley_terry, the fused op's own)")
    parser.add_argument("--heads", type=int, default=1, help="regression: A, the attribute head's outputs")
    args = parser.parse_args(argv)
    if args.headline:
        print(headline(args.headline))
        return
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible")
    iters = args.iters or (200 if cuda else 20)
    budget_s = (args.budget_ms or (300 if cuda else 3000)) / 1e3
    shapes = CUDA_SHAPES if cuda else CPU_SHAPES
    if args.shapes:
        shapes = [(int(p), int(L), int(D), dt) for p, L, D, dt in (s.split(",") for s in args.shapes.split(";"))]
    machine = machine_description(args.device)
    if not cuda and not args.no_pin and pin_cpu_allocator():
        machine += "; glibc mmap threshold pinned at 1 MiB"
    bandwidth = copy_bandwidth(args.device, args.copy_mib or (1024 if cuda else 256))
    machine += f"; copy bandwidth {bandwidth / 1e9:.0f} GB/s"
    print(f"machine: {machine}", flush=True)
    rows = []
    for shape in shapes:
        print(f"shape pairs={shape[0]} seq_len={shape[1]} hidden={shape[2]} {shape[3]}", flush=True)
        got = bench_shape(args.device, *shape, iters=iters, budget_s=budget_s, bandwidth=bandwidth,
                          with_compile=not args.no_compile, dschat_max_pairs=args.dschat_max_pairs,
                          objective=args.objective, heads=args.heads, rounds=args.rounds)
        for r in got:
            print(f"  {r['mode']:<8} {r['contender']:<14} {r['ms']:10.4f} ms ({r['calls']} calls)  "
                  f"{r['x_floor']:7.2f}× floor  {r['x_eager']:6.2f}× eager  {r['peak_mb']:>9} MB", flush=True)
        rows += got
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = args.tag or args.device
    with open(out / f"bench_loss_{tag}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["machine", "copy_gb_per_s"] + list(rows[0]))
        writer.writeheader()
        for r in rows:
            writer.writerow({"machine": machine, "copy_gb_per_s": round(bandwidth / 1e9, 1), **r})
    plot(rows, out / f"bench_loss_{tag}.png")
    command = "python benchmarks/bench_loss.py " + " ".join(argv if argv is not None else sys.argv[1:])
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    if cuda:
        timing = (f"CUDA events around up to {iters} calls back to back (at most about {budget_s * 1e3:.0f} ms per "
                  f"contender and mode) after a warm-up call")
    else:
        timing = (f"the median over {args.rounds} rounds in which the contenders take turns, each timing its calls "
                  f"back to back by the wall clock (about {budget_s * 1e3:.0f} ms per contender and mode in all), "
                  f"after a warm-up call")
    report = (f"# bench_loss ({tag})\n\ncommand: `{command.strip()}`  \nmachine: {machine}  \n"
              f"commit: {commit or 'unknown'}  \ntime per call: {timing}; inputs made on the "
              f"device. Floor: the bytes the op must move (forward: the gathered rows, head, indices, outputs; "
              f"forward+backward adds the dense d_hidden written once, the rows read again and d_weight) over the "
              f"measured copy bandwidth. × eager: eager's time over the contender's.\n\n{table(rows)}\n")
    (out / f"bench_loss_{tag}.md").write_text(report)
    print()
    print(table(rows))
    print(f"\n{headline(out / f'bench_loss_{tag}.csv')}")
    print(f"\nwrote {out}/bench_loss_{tag}.csv, .md, .png")


if __name__ == "__main__":
    main()
