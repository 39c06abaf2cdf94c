"""Model FLOPs utilization of rmfast training: a 1B-parameter Llama-shaped reward model on one GPU.

The model has Llama 3.2 1B's shape (hidden 2048, 16 layers, 32 heads, 8 key-value heads, intermediate 8192:
973M parameters outside the embeddings), randomly initialised from a LlamaConfig, with a byte-level BPE
tokenizer trained on the HH-RLHF sample. It trains through rmfast's real path: rmfast.engine.Trainer (the
DeepSpeed engine at ZeRO-0 by default, torch's fused AdamW, bf16, batches built ahead in a worker thread),
driven step by step with Trainer.train_step, prefix_shared layout with varlen attention, micro-batches cut
by a token budget from the HH sample's own length distribution.

Reported, over the timed steps (each step timed between two CUDA synchronizations):
  tokens/s   unique tokens (each pair's prompt once plus both responses) per second
  step time  mean seconds per optimizer step; peak memory: torch.cuda.max_memory_allocated
  MFU        6 · N · tokens/s / peak, N = the parameters outside the embeddings (the value head included),
             peak = the card's dense bf16 peak (--peak-tflops; 989 TFLOP/s for H100 SXM, the same for H200)
  attention  12 · layers · hidden · S FLOP per step beside it, S = the (query, key) pairs attended under the
             layout's causal masks, counted exactly per pair (chosen: n(n+1)/2 over prefix+chosen; rejected
             suffix of r': r'·prefix + r'(r'+1)/2); 12 = 2 matmuls (QKᵀ, PV) · 2 FLOP · 3 (forward +
             backward, no recomputation counted); "MFU with attention" adds it to the 6·N·tokens term

--token-budget auto (the default) sizes the micro-batch to the card: after a first step (the optimizer's
states), the peak memory of a step at 4,096 and at 12,288 tokens gives what the states and a step take
whatever its size, and what each token adds; the budget is what fits in 88% of the card (at most
65,536, a multiple of 4,096). An out-of-memory step halves the budget and goes on.

    python benchmarks/bench_mfu.py                          # on a GPU
    python benchmarks/bench_mfu.py --gradient-checkpointing --token-budget 65536
    python benchmarks/bench_mfu.py --tiny                   # CPU, a tiny model, 2 steps: checks the script

Writes bench_mfu_<tag>.csv and .md in --out (default benchmarks/results).
"""

import argparse
import csv
import gzip
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-sample.jsonl.gz"
CARRIED_DATA = ROOT / ".whl" / "data" / "hh-rlhf-harmless-sample.jsonl.gz"
RESULTS = ROOT / "benchmarks" / "results"
PROBE_TOKENS = 4096


def non_embedding_params(cfg):
    """Parameters outside the embedding table: attention, MLP and norms of every layer, the final norm and
    the value head (hidden → 1, no bias)."""
    d, i, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    head_dim = getattr(cfg, "head_dim", None) or d // cfg.num_attention_heads
    q = d * cfg.num_attention_heads * head_dim
    kv = 2 * d * cfg.num_key_value_heads * head_dim
    o = cfg.num_attention_heads * head_dim * d
    mlp = 3 * d * i
    return L * (q + kv + o + mlp + 2 * d) + d + d


def attended_pairs(c, r, s):
    """(query, key) pairs attended in the prefix_shared layout, per pair: chosen rows see prefix + chosen
    causally, rejected suffix rows see the prefix and their own suffix causally."""
    c, r, s = (np.asarray(x, dtype=np.int64) for x in (c, r, s))
    rs = r - s
    return c * (c + 1) // 2 + rs * s + rs * (rs + 1) // 2


def machine(device):
    import platform

    host = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    if device == "cuda":
        return f"{torch.cuda.get_device_name(0)}; torch {torch.__version__}; host {host}"
    return f"CPU ({host}); torch {torch.__version__}"


def make_model_dir(work, args, data, device):
    """A BPE tokenizer trained on the sample and a randomly initialised Llama, saved as a model folder."""
    from transformers import LlamaConfig, LlamaModel

    from rmfast.data.tokenizers import train_bpe_tokenizer

    rows = [json.loads(line) for line in gzip.open(data, "rt")]
    tok = train_bpe_tokenizer([r["chosen"] for r in rows], vocab_size=args.vocab)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, max_position_embeddings=max(2048, args.max_length),
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False, rope_theta=500000.0)
    torch.manual_seed(args.seed)
    with torch.device(device):  # initialising a 1B model on the GPU takes a second, on the CPU much longer
        model = LlamaModel(cfg)
    model.to(torch.bfloat16 if args.dtype == "bf16" else torch.float32).save_pretrained(work / "model")
    tok.save_pretrained(work / "model")
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return cfg


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="HH-RLHF sample (default: ../shared/data, else .whl/data)")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=8000, help="BPE vocabulary trained on the sample")
    p.add_argument("--max-length", type=int, default=1024, help="data.max_length (tokens per sequence)")
    p.add_argument("--token-budget", default="auto", help="tokens per micro-batch, or auto (fit the card)")
    p.add_argument("--max-budget", type=int, default=65536, help="cap of the auto budget")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--zero-stage", type=int, default=0, choices=[0, 1, 2])
    p.add_argument("--attention", default="varlen", help="packed attention on CUDA (varlen, flex, auto)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps at the chosen budget")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200 SXM: 989)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true",
                   help="a tiny model for 2 steps (CPU: segment attention, fp32): checks the script")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default=None, help="results file suffix (default: the device)")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    if args.tiny:
        args.hidden, args.layers, args.heads, args.kv_heads, args.intermediate = 64, 2, 4, 2, 128
        args.vocab, args.steps, args.warmup, args.max_length = 1000, 2, 0, 512
        if args.token_budget == "auto":
            args.token_budget = "2048"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is visible (use --tiny on CPU)")
    if args.device == "cpu":  # varlen is refused on CPU and DeepSpeed's CPU path is slow in bf16
        args.attention, args.dtype = "segments", "fp32"
    data = Path(args.data) if args.data else (DEFAULT_DATA if DEFAULT_DATA.exists() else CARRIED_DATA)
    tag = args.tag or args.device
    cuda = args.device == "cuda"

    from rmfast import config as config_module
    from rmfast import layouts
    from rmfast.data.sampler import PairSampler
    from rmfast.engine import Trainer, close_distributed
    from rmfast.metrics import Window

    t_setup = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bench_mfu_"))
    cfg = make_model_dir(work, args, data, args.device)
    n_params = non_embedding_params(cfg)
    fixed = None if args.token_budget == "auto" else int(args.token_budget)
    first_budget = fixed or PROBE_TOKENS
    config = config_module.build(overrides={
        "model.name_or_path": str(work / "model"), "model.dtype": args.dtype,
        "model.gradient_checkpointing": args.gradient_checkpointing,
        "data.train": [str(data)], "data.max_length": args.max_length, "data.cache_dir": str(work / "cache"),
        "train.output_dir": str(work / "run"), "train.layout": "prefix_shared", "train.attention": args.attention,
        "train.token_budget": first_budget, "train.zero_stage": args.zero_stage, "train.lr": 1e-5,
        "train.warmup_ratio": 0.0, "train.max_steps": 10**6, "train.eval_every": 0, "train.save_every": 0,
        "train.log_every": 10**6, "train.export": False, "train.tensorboard": False, "train.seed": args.seed})
    trainer = Trainer(config, log=lambda m: print(m, flush=True))
    pairs = trainer.train_pairs
    s = np.array([len(p) for p in pairs.prompt], np.int64)  # the shared prefix (a pair is a group of two)
    c = s + np.array([len(x[0]) for x in pairs.responses], np.int64)
    r = s + np.array([len(x[1]) for x in pairs.responses], np.int64)
    unique = pairs.lengths("prefix_shared")
    attn = attended_pairs(c, r, s)
    costs, combine = layouts.costs(pairs, "prefix_shared")
    setup_s = time.perf_counter() - t_setup
    print(f"model: Llama {args.hidden}×{args.layers} (heads {args.heads}/{args.kv_heads}, intermediate "
          f"{args.intermediate}), {n_params / 1e6:.1f}M non-embedding parameters; {len(pairs)} pairs, "
          f"{unique.mean():.1f} unique tokens per pair; attention {trainer.attention}; setup {setup_s:.1f} s",
          flush=True)

    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(1, thread_name_prefix="bench-mfu-batches")
    state = {"batches": None, "consumed": []}

    def use_budget(budget):
        """A sampler cutting micro-batches at `budget` tokens, and a fresh stream of batches from it."""
        if state["batches"] is not None:
            state["batches"].close()
        trainer.use_sampler(PairSampler(costs, token_budget=budget, combine=combine, seed=args.seed))
        gen = trainer.micro_batches(pool)

        def tap():  # the pairs of every micro-batch the step takes, for exact token and attention counts
            for item in gen:
                state["consumed"].append(item[0])
                yield item

        state["batches"] = tap()

    def step():
        """One optimizer step: (seconds, unique tokens, attended pairs, pairs)."""
        if cuda:
            torch.cuda.synchronize()
        n = len(state["consumed"])
        t0 = time.perf_counter()
        trainer.train_step(state["batches"], Window(trainer.device))
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        idx = np.concatenate([np.asarray(i, dtype=np.int64) for i in state["consumed"][n:]])
        return dt, int(unique[idx].sum()), int(attn[idx].sum()), len(idx)

    trainer.engine.train()
    budget = first_budget
    use_budget(budget)
    notes = []
    if cuda:
        total = torch.cuda.get_device_properties(0).total_memory
    if fixed is None and cuda:
        step()  # allocates the optimizer's states
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        probes = []
        for probe_budget in (PROBE_TOKENS, 3 * PROBE_TOKENS):  # peak memory at two sizes: its slope per token
            if probe_budget != PROBE_TOKENS:
                use_budget(probe_budget)
            torch.cuda.reset_peak_memory_stats()
            _, tokens, _, _ = step()
            probes.append((tokens, torch.cuda.max_memory_allocated()))
        (t1, p1), (t2, p2) = probes
        per_token = (p2 - p1) / (t2 - t1) if t2 > t1 and p2 > p1 else max(p2 - base, 1) / t2
        fixed_bytes = max(base, p2 - per_token * t2)  # states and what a step needs whatever its size
        budget = int((0.88 * total - fixed_bytes) / per_token) // 4096 * 4096
        budget = max(4096, min(args.max_budget, budget))
        notes.append(f"auto budget: states {base / 2**30:.1f} GiB, fixed {fixed_bytes / 2**30:.1f} GiB, "
                     f"{per_token / 2**10:.0f} KiB per token (probes of {t1} and {t2} tokens) → {budget} tokens "
                     f"per micro-batch")
        print(notes[-1], flush=True)
        use_budget(budget)
    elif fixed is None:
        budget = first_budget
    times, tokens, attended, n_pairs = [], [], [], []
    done = 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    while done < args.warmup + args.steps:
        try:
            got = step()
        except torch.cuda.OutOfMemoryError:
            if budget <= 4096:
                raise
            trainer.engine.zero_grad()
            torch.cuda.empty_cache()
            budget //= 2
            notes.append(f"out of memory: budget halved to {budget}")
            print(notes[-1], flush=True)
            use_budget(budget)
            torch.cuda.reset_peak_memory_stats()
            continue
        if done >= args.warmup:
            for lst, v in zip((times, tokens, attended, n_pairs), got):
                lst.append(v)
        print(f"step {done + 1}: {got[0]:.3f} s, {got[1]} tokens, {got[3]} pairs", flush=True)
        done += 1
    state["batches"].close()
    pool.shutdown(wait=False, cancel_futures=True)
    import shutil

    shutil.rmtree(work, ignore_errors=True)  # the model folder (2 GB at the default size) and the run
    elapsed = sum(times)
    tok_s = sum(tokens) / elapsed
    peak_flops = args.peak_tflops * 1e12
    dense = 6 * n_params * tok_s
    attn_flops = 12 * args.layers * args.hidden * sum(attended) / elapsed
    peak_mem = round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None  # CPU: not measured
    row = {
        "machine": machine(args.device), "model": f"llama-{args.hidden}x{args.layers}", "non_embedding_params_m":
        round(n_params / 1e6, 1), "dtype": args.dtype, "attention": trainer.attention, "zero_stage": args.zero_stage,
        "gradient_checkpointing": args.gradient_checkpointing, "token_budget": budget, "timed_steps": len(times),
        "pairs_per_step": round(sum(n_pairs) / len(times), 1), "tokens_per_step": round(sum(tokens) / len(times)),
        "step_s": round(elapsed / len(times), 4), "tokens_per_s": round(tok_s), "peak_mem_gib": peak_mem,
        "model_tflops": round(dense / 1e12, 1), "attention_tflops": round(attn_flops / 1e12, 1),
        "mfu": round(dense / peak_flops, 4), "mfu_with_attention": round((dense + attn_flops) / peak_flops, 4),
        "peak_tflops": args.peak_tflops, "setup_s": round(setup_s, 1),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"bench_mfu_{tag}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        w.writeheader()
        w.writerow(row)
    md_row = (f"| {row['model']} ({row['non_embedding_params_m']}M) | {row['attention']}, ZeRO-{args.zero_stage}"
              f"{', ckpt' if args.gradient_checkpointing else ''} | {budget} | {row['step_s']:.3f} | "
              f"{row['tokens_per_s']:,} | {peak_mem if peak_mem is not None else 'n/a'} | {row['mfu'] * 100:.1f}% | "
              f"{row['attention_tflops']} | {row['mfu_with_attention'] * 100:.1f}% |")
    command = "python benchmarks/bench_mfu.py " + " ".join(argv if argv is not None else sys.argv[1:])
    table = ("| model | attention | tokens/micro-batch | step s | unique tokens/s | peak GiB | MFU (6·N·tok/s) | "
             "attention TFLOP/s | MFU with attention |\n|---|---|---|---|---|---|---|---|---|\n" + md_row)
    (out / f"bench_mfu_{tag}.md").write_text(
        f"# bench_mfu ({tag})\n\ncommand: `{command.strip()}`  \nmachine: {row['machine']}  \n"
        f"{len(times)} timed steps after {args.warmup} warm-up; prefix_shared on the HH-RLHF sample "
        f"({unique.mean():.1f} unique tokens per pair); peak {args.peak_tflops} TFLOP/s; "
        f"attention FLOPs 12·layers·hidden·(attended query-key pairs).  \n"
        + "".join(f"{n}  \n" for n in notes) + "\n" + table + "\n")
    print(table)
    print("RESULT " + json.dumps(row), flush=True)
    close_distributed()  # as rmfast-train does: a group alive at exit can abort the process
    return row


if __name__ == "__main__":
    main()
