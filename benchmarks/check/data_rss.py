"""Resident memory per rank of a two-rank rmfast-train run on a large synthetic pair set: how much of each
rank's memory the tokenized data takes, and whether the ranks of a node share it.

    python benchmarks/check/data_rss.py WORK --make [--pairs 200000]   # model, tokenizer and data, once
    PYTHONPATH=CHECKOUT python benchmarks/check/data_rss.py WORK OUT.json [--steps 4]

The run is made twice with one cache folder: "cold" (global rank 0 tokenizes, the other rank then reads the
cache) and "warm" (both read it). While each runs, every rank's /proc/PID/smaps_rollup is read every 0.2 s;
the peaks of RSS (every page the rank has resident, shared ones included), PSS (shared pages divided among the
processes that map them: the rank's fair share of the machine's memory) and USS (its private pages, which no
other process shares) are kept per rank. The same model trains in both checkouts, so the difference between
two checkouts' figures is their data's. Results: benchmarks/results/data_rss.md."""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make(work, pairs):
    from transformers import LlamaConfig, LlamaModel

    from rmfast.data import generate_pairs
    from rmfast.data.synthetic import write_jsonl
    from rmfast.data.tokenizers import train_bpe_tokenizer
    import torch

    work.mkdir(parents=True, exist_ok=True)
    rows = generate_pairs(pairs, seed=0, style="conversational", max_history=3)
    tok = train_bpe_tokenizer([r["chosen"][-1]["content"] for r in rows[:2000]] +
                              [m["content"] for r in rows[:2000] for m in r["prompt"]], vocab_size=2000)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaModel(cfg).save_pretrained(work / "model")
    tok.save_pretrained(work / "model")
    write_jsonl(rows, work / "train.jsonl")


def memory(pid):
    """(rss, pss, uss) in bytes from /proc/PID/smaps_rollup, or None once the process is gone."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    kb = {}
    for line in text.splitlines()[1:]:
        name, _, rest = line.partition(":")
        if rest.strip().endswith("kB"):
            kb[name] = int(rest.split()[0])
    return kb["Rss"] * 1024, kb["Pss"] * 1024, (kb["Private_Clean"] + kb["Private_Dirty"]) * 1024


def ranks(root_pid):
    """{rank: pid} of the processes under root_pid that have RANK in their environment."""
    found, todo = {}, [root_pid]
    while todo:
        pid = todo.pop()
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        todo += [int(c) for c in children]
        rank = [e[5:].decode() for e in env if e.startswith(b"RANK=")]
        if rank and pid != root_pid:
            found.setdefault(int(rank[0]), pid)
    return found


def run(work, out_dir, steps, cache):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "rmfast.cli", "--model.name_or_path", str(work / "model"), "--data.train", str(work / "train.jsonl"),
           "--data.cache_dir", str(cache), "--data.num_proc", "1", "--train.output_dir", str(out_dir),
           "--train.max_steps", str(steps), "--train.pairs_per_batch", "8", "--train.export", "false",
           "--train.report_to", "none"]
    start = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks = {}
    while proc.poll() is None:
        for rank, pid in ranks(proc.pid).items():
            m = memory(pid)
            if m is not None:
                peaks[rank] = [max(a, b) for a, b in zip(peaks.get(rank, (0, 0, 0)), m)]
        time.sleep(0.2)
    log = proc.stdout.read()
    if proc.returncode != 0:
        raise SystemExit(f"rmfast-train failed ({proc.returncode}):\n{log[-4000:]}")
    mib = 1 / 2**20
    return {"seconds": round(time.time() - start, 1),
            "ranks": {r: {"rss_mib": round(p[0] * mib), "pss_mib": round(p[1] * mib), "uss_mib": round(p[2] * mib)}
                      for r, p in sorted(peaks.items())},
            "data_lines": [line for line in log.splitlines() if "data:" in line][:3]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("out", nargs="?")
    parser.add_argument("--make", action="store_true")
    parser.add_argument("--pairs", type=int, default=200000)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    if args.make:
        return make(args.work, args.pairs)
    import rmfast

    with open(args.work / "train.jsonl") as f:
        result = {"rmfast": str(Path(rmfast.__file__).parent.parent), "pairs": sum(1 for _ in f)}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("cold", "warm"):
            result[name] = run(args.work, Path(tmp) / name, args.steps, Path(tmp) / "cache")
            print(name, json.dumps(result[name]), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
