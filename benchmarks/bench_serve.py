"""rmfast-serve against an OpenRLHF serve_rm-like server, on GRPO-shaped traffic over loopback.

Traffic: each request is one GRPO group, OpenRLHF's remote reward call {query: K whole texts, prompts: the
group's prompt K times}: an HH prompt and K HH answers read after it (bench_groups.hh_groups). Several
clients send their groups concurrently, each waiting for its answer before sending the next (bounded: the
same G groups for both servers). The two servers run the same exported model (a small Llama, as
bench_train.py; fp32):
  baseline      what OpenRLHF's serve_rm does: AutoModelForSequenceClassification on whole query strings
                (pad and EOS stripped, EOS appended), left-padded batches of --baseline-batch texts,
                truncation at max_length, the forward run inside the request handler
  rmfast-serve  the queries of a request grouped by prompt (the prompt computed once), concurrent requests
                merged into prefix-shared forwards up to the token budget, off the event loop

Both servers are up at once and the traffic is sent in rounds that alternate between them (a busy
machine slows both alike). Reported: rewards/s (all rewards over the sum of the rounds' wall times),
p50/p99 request latency, token positions computed per reward (the servers' own counts: rows x padded
length for the baseline, /metrics for rmfast-serve) against the unique tokens per reward (each prompt
once), peak RSS of the server process, and the largest reward difference between the two. CSV, Markdown
and a PNG in benchmarks/results/.

    python benchmarks/bench_serve.py [--k 8] [--groups 48] [--clients 4]
"""

import argparse
import csv
import gzip
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_groups import hh_groups  # noqa: E402
from bench_loss import machine_description  # noqa: E402
from bench_train import DEFAULT_DATA, RESULTS, build_model  # noqa: E402

CONTENDERS = ("baseline", "rmfast-serve")


# ---- the baseline server: OpenRLHF's serve_rm, reduced to what it computes ----

def serve_baseline(model_dir, port, batch_size, max_length):
    import torch
    import uvicorn
    from fastapi import FastAPI, Request
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    stats = {"positions": 0, "rewards": 0}
    app = FastAPI()

    def strip(text, token):
        while token and text.startswith(token):
            text = text[len(token):]
        while token and text.endswith(token):
            text = text[: -len(token)]
        return text

    @app.post("/get_reward")
    async def get_reward(request: Request):
        queries = (await request.json())["query"]
        queries = [strip(strip(q, tok.pad_token), tok.eos_token) + tok.eos_token for q in queries]
        scores = []
        with torch.no_grad():  # in the handler, as serve_rm: requests are served one at a time
            for i in range(0, len(queries), batch_size):
                batch = tok(queries[i:i + batch_size], return_tensors="pt", max_length=max_length, padding=True,
                            truncation=True)
                scores += model(**batch).logits[:, 0].tolist()
                stats["positions"] += batch["input_ids"].numel()
        stats["rewards"] += len(scores)
        return {"rewards": scores, "scores": scores, "extra_logs": {}}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/stats")
    async def get_stats():
        return stats

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# ---- the benchmark ----

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid, field):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    return float("nan")


def prepare(args, work):
    """The HH groups and an export of the model (tokenizer trained on the sample)."""
    import torch

    from rmfast.data.tokenizers import train_bpe_tokenizer
    from rmfast.export import write_export

    rows = [json.loads(line) for line in gzip.open(args.data, "rt")]
    tok = train_bpe_tokenizer([r["chosen"] for r in rows], vocab_size=args.vocab)
    groups = []
    for g in hh_groups(rows, args.k, args.seed):
        lengths = [len(tok(g["prompt"] + r)["input_ids"]) + 1 for r in g["responses"]]
        if max(lengths) <= args.max_length:  # both servers read whole texts: no truncation to tell apart
            groups.append(g)
        if len(groups) == args.groups + args.warmup:
            break
    model = build_model(len(tok), tok.pad_token_id, args.seed, args.hidden, args.layers)
    with torch.no_grad():
        model.head.weight.normal_(std=0.5)  # a fresh head is not zero, and its rewards differ
    path = write_export(model.backbone.config, model.state_dict(), tok, work / "export")
    return groups, path, sum(p.numel() for p in model.parameters()), tok


def unique_tokens(groups, tok):
    """Tokens per reward when each prompt is computed once: (prompt + every response) / K, as rmfast reads."""
    total = 0
    for g in groups:
        prompt = len(tok(g["prompt"])["input_ids"])
        total += prompt + sum(len(tok(g["prompt"] + r)["input_ids"]) + 1 - prompt for r in g["responses"])
    return total / sum(len(g["responses"]) for g in groups)


def start(name, path, port, args, log):
    from rmfast.serve.client import wait_ready

    if name == "baseline":
        cmd = [sys.executable, __file__, "--serve-baseline", str(path), "--port", str(port)]
    else:
        cmd = [sys.executable, "-m", "rmfast.serve.app", str(path), "--port", str(port), "--log-level", "warning",
               "--max-length", str(args.max_length), "--max-wait-ms", str(args.max_wait_ms),
               "--token-budget", str(args.token_budget)]
    cmd += ["--max-length", str(args.max_length), "--baseline-batch", str(args.baseline_batch)] \
        if name == "baseline" else []
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url, 180, log)
    except RuntimeError as exc:
        raise SystemExit(f"{name}: {exc}") from None
    return proc, url


def counters(name, client):
    if name == "baseline":
        s = client.get("/stats").json()
        return s["positions"], s["rewards"]
    from prometheus_client.parser import text_string_to_metric_families

    values = {s.name: s.value for f in text_string_to_metric_families(client.get("/metrics").text)
              for s in f.samples}
    return values["rmfast_serve_positions_total"], values["rmfast_serve_rewards_total"]


def traffic(client, payloads, clients):
    """Send payloads from `clients` concurrent clients, each waiting for its answer before its next request.
    Returns (wall seconds, latency of each, rewards of each)."""
    latencies, rewards = [None] * len(payloads), [None] * len(payloads)

    def one_client(c):
        for i in range(c, len(payloads), clients):
            t0 = time.perf_counter()
            r = client.post("/get_reward", json=payloads[i])
            latencies[i] = time.perf_counter() - t0
            r.raise_for_status()
            rewards[i] = r.json()["rewards"]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one_client, range(clients)))
    return time.perf_counter() - t0, latencies, rewards


def run_contenders(groups, path, args, work):
    """Both servers up at once (the idle one costs nothing), the timed traffic sent in --rounds rounds that
    alternate between them, so that anything else the machine does meets both alike. Returns (rows,
    {contender: rewards in group order})."""
    import httpx

    payloads = [{"query": [g["prompt"] + r for r in g["responses"]], "prompts": [g["prompt"]] * len(g["responses"]),
                 "labels": [None] * len(g["responses"])} for g in groups]
    warm, timed = payloads[: args.warmup], payloads[args.warmup:]
    servers, clients, state = {}, {}, {}
    try:
        for name in CONTENDERS:
            servers[name] = start(name, path, free_port(), args, work / f"{name}.log")
            clients[name] = httpx.Client(base_url=servers[name][1], timeout=600)
            for p in warm:
                clients[name].post("/get_reward", json=p).raise_for_status()
            state[name] = {"idle": rss_mb(servers[name][0].pid, "VmRSS:"), "counters": counters(name, clients[name]),
                           "wall": 0.0, "latencies": [], "rewards": []}
        chunk = -(-len(timed) // args.rounds)
        for r in range(args.rounds):
            part = timed[r * chunk:(r + 1) * chunk]
            for name in CONTENDERS if r % 2 == 0 else CONTENDERS[::-1]:
                wall, latencies, rewards = traffic(clients[name], part, args.clients)
                state[name]["wall"] += wall
                state[name]["latencies"] += latencies
                state[name]["rewards"] += rewards
        rows = []
        for name in CONTENDERS:
            s = state[name]
            positions1, rewards1 = counters(name, clients[name])
            n = sum(len(r) for r in s["rewards"])
            assert rewards1 - s["counters"][1] == n, (name, rewards1, s["counters"], n)
            peak = rss_mb(servers[name][0].pid, "VmHWM:")
            ms = sorted(x * 1000 for x in s["latencies"])
            rows.append({"contender": name, "rewards_per_s": n / s["wall"], "requests": len(ms), "rewards": n,
                         "p50_ms": statistics.median(ms), "p99_ms": float(np.percentile(ms, 99)),
                         "positions_per_reward": (positions1 - s["counters"][0]) / n, "peak_rss_mb": peak,
                         "peak_over_idle_mb": peak - s["idle"]})
            r = rows[-1]
            print(f"{name}: {r['rewards_per_s']:.1f} rewards/s, p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms, "
                  f"{r['positions_per_reward']:.1f} positions/reward, peak RSS {peak:.0f} MB", file=sys.stderr)
    finally:
        for name, (proc, _) in servers.items():
            if name in clients:
                clients[name].close()
            proc.terminate()
            proc.wait(60)
    return rows, {name: [x for r in state[name]["rewards"] for x in r] for name in CONTENDERS}


def plot(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["contender"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    for ax, key, label in zip(axes, ("rewards_per_s", "p99_ms", "positions_per_reward"),
                              ("rewards / s", "p99 latency (ms)", "token positions per reward")):
        ax.bar(names, [r[key] for r in rows], color=["tab:gray", "tab:blue"][: len(rows)])
        ax.set_title(label)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--k", type=int, default=8, help="responses per GRPO group (one request)")
    parser.add_argument("--groups", type=int, default=48, help="timed requests (groups), the same for both")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients")
    parser.add_argument("--rounds", type=int, default=4, help="rounds of traffic, alternating between the servers")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=0, help="torch threads of each server (0: torch's default)")
    parser.add_argument("--baseline-batch", type=int, default=8, help="serve_rm's --batch_size")
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--token-budget", type=int, default=16384)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--tag", default="cpu")
    parser.add_argument("--serve-baseline", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_baseline:
        return serve_baseline(args.serve_baseline, args.port, args.baseline_batch, args.max_length)

    work = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    groups, path, params, tok = prepare(args, work)
    timed = groups[args.warmup:]
    rows, rewards = run_contenders(groups, path, args, work)
    diff = float(np.max(np.abs(np.array(rewards["baseline"]) - np.array(rewards["rmfast-serve"]))))
    unique = unique_tokens(timed, tok)
    base = rows[0]["rewards_per_s"]
    for r in rows:
        r["speedup"] = r["rewards_per_s"] / base
        r["unique_tokens_per_reward"] = unique
        r["max_reward_diff"] = diff

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"bench_serve_{args.tag}"
    with open(f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    command = "python benchmarks/bench_serve.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])
                                                    ).rstrip()
    lines = [f"# bench_serve ({args.tag})", "",
             f"command: `{command}`  ",
             f"machine: {machine_description('cpu')}  ",
             f"model: Llama, {params / 1e6:.1f}M parameters, BPE vocabulary {args.vocab} trained on the sample, "
             f"fp32, exported with rmfast's write_export; {args.threads or 'default'} torch threads per server; "
             f"traffic: {len(timed)} GRPO groups (an HH prompt and K = "
             f"{args.k} HH answers, one OpenRLHF /get_reward request each) from {args.clients} concurrent clients "
             f"on loopback in {args.rounds} rounds alternating between the two servers (both up), after "
             f"{args.warmup} warm-up requests each; max_length {args.max_length}; baseline batch "
             f"{args.baseline_batch}; rmfast-serve --max-wait-ms {args.max_wait_ms:g} --token-budget "
             f"{args.token_budget}; unique tokens per reward (each prompt once): {unique:.1f}; largest reward "
             f"difference between the two servers: {diff:.2e}.", "",
             "| server | rewards/s | speed-up | p50 ms | p99 ms | positions/reward | peak RSS MB | peak over idle MB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['contender']} | {r['rewards_per_s']:.1f} | {r['speedup']:.2f}× | {r['p50_ms']:.0f} | "
                     f"{r['p99_ms']:.0f} | {r['positions_per_reward']:.1f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['peak_over_idle_mb']:.0f} |")
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    try:
        plot(rows, f"{stem}.png", f"rmfast-serve vs a serve_rm-like baseline, K = {args.k}, {args.clients} clients")
    except ImportError:
        pass
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
