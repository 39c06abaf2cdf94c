"""Forward+backward time and peak memory of the fused pairwise loss against the usual ways to write it.

Contenders, on hidden states [2P, L, D] of P pairs (chosen rows first, right padding):
  floor      torch.zeros_like(hidden): any backward must allocate and fill a dense d_hidden
  rmfast-*   pairwise_reward_loss with each backend that can run on the device
  dschat     DeepSpeed-Chat step 2: value head on every token, then per pair the mean of -log σ over the span
             from the first differing token to the end
  eager      index the last tokens → nn.Linear → logsigmoid
  compile    torch.compile of eager (where it compiles)

The value head's weight is a trained leaf (requires grad) for every contender. Times are medians over --repeats
rounds that run every contender once each, in a shuffled order. Peak memory is what a fresh forward+backward adds on
top of the inputs (CUDA: the allocator's peak; CPU: the process's peak RSS, reset through /proc/self/clear_refs).
torch.compile is compiled once for all shapes (dynamic shapes), not cold per shape.
Writes benchmarks/results/bench_loss_<tag>.{csv,md,png}.

    python benchmarks/bench_loss.py                 # CPU sweep
    python benchmarks/bench_loss.py --device cuda   # GPU sweep
    python benchmarks/bench_loss.py --shapes "16,64,512,float32" --no-compile --repeats 51   # one quick shape
"""

import argparse
import csv
import gc
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from rmfast import backends, pairwise_reward_loss

RESULTS = Path(__file__).resolve().parent / "results"

CPU_SHAPES = [  # pairs, seq_len, hidden, dtype
    (16, 64, 512, "float32"),  # small: 2,048 rows, where the fixed cost per call shows
    (32, 64, 1024, "float32"),  # 4,096 rows
    (16, 512, 2048, "float32"),
    (256, 64, 1024, "float32"),
    (8, 256, 512, "float32"),
    (32, 64, 4097, "float32"),
    (64, 128, 4096, "float32"),
    (16, 512, 2048, "bfloat16"),
]
CUDA_SHAPES = CPU_SHAPES + [
    (64, 512, 4096, "bfloat16"),
    (256, 256, 8192, "bfloat16"),
    (1024, 64, 4096, "float16"),
]


def pin_cpu_allocator(threshold=1 << 20):
    """Send every CPU buffer of at least `threshold` bytes to mmap, fresh from the kernel, every time.

    glibc moves its mmap threshold as buffers are freed, so the same 8 MB zeros_like costs 0.3 ms (reused
    heap) or 2 ms (fresh pages) depending on what ran before; pinning it gives every contender, the floor
    included, the same allocation path. Returns whether it could be pinned."""
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
        desc = f"{torch.cuda.get_device_name(0)}; host {desc}"
    return desc


def make_inputs(pairs, seq_len, hidden_size, dtype, device, seed=0):
    """Hidden [2P, L, D], token ids with shared prompts and right padding (pad id 0), last-token rows."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(2 * pairs, seq_len, dtype=torch.long)
    lengths = torch.zeros(2 * pairs, dtype=torch.long)
    for i in range(pairs):
        prompt = int(torch.randint(seq_len // 4, seq_len // 2, (1,), generator=g))
        prompt_ids = torch.randint(1, 32000, (prompt,), generator=g)
        for row in (i, pairs + i):
            n = int(torch.randint(prompt + 1, seq_len + 1, (1,), generator=g))
            ids[row, :prompt] = prompt_ids
            ids[row, prompt:n] = torch.randint(1, 32000, (n - prompt,), generator=g)
            lengths[row] = n
    hidden = torch.randn(2 * pairs, seq_len, hidden_size, generator=g).to(device=device, dtype=dtype)
    last = torch.arange(2 * pairs) * seq_len + lengths - 1
    chosen, rejected = last[:pairs].to(device), last[pairs:].to(device)
    weight = (torch.randn(hidden_size, generator=g) / hidden_size**0.5).to(device=device, dtype=dtype)
    return hidden, ids.to(device), chosen, rejected, weight


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


def contenders(device, hidden, ids, chosen, rejected, weight, with_compile):
    out = {"floor": None}
    for name in backends.BACKENDS:
        if backends.unavailable_reason(name, device) is None:
            out[f"rmfast-{name}"] = (
                lambda h, b=name: pairwise_reward_loss(h, weight, chosen, rejected, backend=b).loss)
    out["dschat"] = lambda h: dschat_loss(h, weight, ids)
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
    return out


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def run_once(fn, hidden, weight, device, read=False):
    """Seconds for one forward+backward (or, for the floor, one zeros_like); with read=True, followed by
    a full read of d_hidden, as the backbone's backward would do."""
    hidden.grad = weight.grad = None
    sync(device)
    t0 = time.perf_counter()
    if fn is None:
        grad = torch.zeros_like(hidden)
    else:
        fn(hidden).backward()
        grad = hidden.grad
    if read:
        grad.sum()
    sync(device)
    elapsed = time.perf_counter() - t0
    del grad
    hidden.grad = weight.grad = None
    return elapsed


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


def bench_shape(device, pairs, seq_len, hidden_size, dtype_name, repeats, warmup, with_compile):
    dtype = getattr(torch, dtype_name)
    hidden, ids, chosen, rejected, weight = make_inputs(pairs, seq_len, hidden_size, dtype, device)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    fns = contenders(device, hidden, ids, chosen, rejected, weight, with_compile)
    ref = pairwise_reward_loss(hidden, weight, chosen, rejected, backend="torch").loss.item()
    for name in ("eager", "compile") + tuple(n for n in fns if n.startswith("rmfast-")):
        if name in fns:
            got = fns[name](hidden).item()
            tol = 1e-4 if dtype == torch.float32 else 2e-2
            assert abs(got - ref) <= tol * max(1.0, abs(ref)), f"{name} loss {got} != reference {ref}"
    times = {name: [] for name in fns}
    times_read = {name: [] for name in fns}
    order = list(fns)
    shuffle = random.Random(0).shuffle
    for i in range(warmup + repeats):
        shuffle(order)  # no contender always follows the same one (page-fault costs depend on it)
        for name in order:
            fn = fns[name]
            t = run_once(fn, hidden, weight, device)
            t_read = run_once(fn, hidden, weight, device, read=True)
            if i >= warmup:
                times[name].append(t)
                times_read[name].append(t_read)
    memory = {name: peak_extra_bytes(fn, hidden, weight, device) for name, fn in fns.items()}
    floor = statistics.median(times["floor"])
    floor_read = statistics.median(times_read["floor"])
    rows = []
    for name in fns:
        ts = sorted(times[name])
        med = statistics.median(ts)
        rows.append({
            "device": device, "dtype": dtype_name, "pairs": pairs, "seq_len": seq_len,
            "rows": 2 * pairs * seq_len, "hidden": hidden_size, "contender": name,
            "median_ms": round(med * 1e3, 4), "p10_ms": round(ts[len(ts) // 10] * 1e3, 4),
            "p90_ms": round(ts[(9 * len(ts)) // 10] * 1e3, 4), "x_floor": round(med / floor, 3),
            "peak_mb": round(memory[name] / 2**20, 2),
            "read_median_ms": round(statistics.median(times_read[name]) * 1e3, 4),
            "read_x_floor": round(statistics.median(times_read[name]) / floor_read, 3), "repeats": repeats,
        })
    return rows


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    ax.set_xticklabels([f"{p}×{L}×{D}\n{dt}" for dt, p, L, D in shapes], fontsize=8)
    ax.set_xlabel("pairs × seq_len × hidden")
    ax.set_ylabel("forward+backward time / zeros_like(hidden)")
    ax.set_title(f"Pairwise reward loss, {rows[0]['device']}")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(rows):
    head = ["dtype", "pairs×seq×hidden", "contender", "median ms", "× floor", "then read: ms", "× floor",
            "peak MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(f"| {r['dtype']} | {r['pairs']}×{r['seq_len']}×{r['hidden']} | {r['contender']} | "
                     f"{r['median_ms']:.3f} | {r['x_floor']:.3f} | {r['read_median_ms']:.3f} | "
                     f"{r['read_x_floor']:.3f} | {r['peak_mb']:.1f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    parser.add_argument("--no-pin", action="store_true",
                        help="CPU: leave glibc's mmap threshold alone (buffers it has seen are then reused from "
                             "the heap, as in a plain training loop) instead of pinning it at 1 MiB")
    parser.add_argument("--shapes", default=None,
                        help="P,L,D,dtype;... (default: the built-in sweep for the device)")
    parser.add_argument("--tag", default=None, help="results file suffix (default: the device)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible")
    shapes = CUDA_SHAPES if args.device == "cuda" else CPU_SHAPES
    if args.shapes:
        shapes = [(int(p), int(L), int(D), dt) for p, L, D, dt in (s.split(",") for s in args.shapes.split(";"))]
    machine = machine_description(args.device)
    if args.device == "cpu" and not args.no_pin and pin_cpu_allocator():
        machine += "; glibc mmap threshold pinned at 1 MiB"
    print(f"machine: {machine}", flush=True)
    rows = []
    for shape in shapes:
        print(f"shape pairs={shape[0]} seq_len={shape[1]} hidden={shape[2]} {shape[3]}", flush=True)
        got = bench_shape(args.device, *shape, repeats=args.repeats, warmup=args.warmup,
                          with_compile=not args.no_compile)
        for r in got:
            print(f"  {r['contender']:<14} {r['median_ms']:10.3f} ms  {r['x_floor']:7.3f}× floor   "
                  f"then read: {r['read_median_ms']:10.3f} ms {r['read_x_floor']:7.3f}×   {r['peak_mb']:9.1f} MB",
                  flush=True)
        rows += got
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = args.tag or args.device
    with open(out / f"bench_loss_{tag}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["machine"] + list(rows[0]))
        writer.writeheader()
        for r in rows:
            writer.writerow({"machine": machine, **r})
    plot(rows, out / f"bench_loss_{tag}.png")
    command = "python benchmarks/bench_loss.py " + " ".join(argv if argv is not None else sys.argv[1:])
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    report = (f"# bench_loss ({tag})\n\ncommand: `{command.strip()}`  \nmachine: {machine}  \n"
              f"commit: {commit or 'unknown'}  \nmedians over {args.repeats} rounds after {args.warmup} warm-up "
              f"rounds; × floor = median time / median time of torch.zeros_like(hidden) in the same run. "
              f"'then read' times the same work followed by a full read of d_hidden (grad.sum()), as the "
              f"backbone's backward would do, against zeros_like followed by the same read.\n\n"
              f"{table(rows)}\n")
    (out / f"bench_loss_{tag}.md").write_text(report)
    print()
    print(table(rows))
    print(f"\nwrote {out}/bench_loss_{tag}.csv, .md, .png")


if __name__ == "__main__":
    main()
