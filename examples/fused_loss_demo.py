"""A small, complete use of the fused loss: learn a value head on frozen features.

Each pair has a chosen and a rejected sequence of hidden states [L, D] (right-padded, different lengths).
A hidden "quality" direction makes the chosen sequence's last token score higher. The value head starts
at random and learns that direction with the fused Bradley–Terry loss; eval accuracy climbs towards 100%.
It also checks that every backend that can run here gives the same loss and gradients.

    python examples/fused_loss_demo.py [--steps 60] [--backend auto]
"""

import argparse
import time

import torch

from rmfast import backends
from rmfast.nn import RewardHead


def make_pairs(pairs, seq_len, hidden_size, quality, generator):
    """hidden [2P, L, D] (chosen rows first), last-token indices of each side, and per-pair margins."""
    hidden = torch.randn(2 * pairs, seq_len, hidden_size, generator=generator)
    lengths = torch.randint(seq_len // 4, seq_len + 1, (2 * pairs,), generator=generator)
    gap = torch.rand(pairs, generator=generator) + 0.25  # how much better the chosen answer is
    rows = torch.arange(2 * pairs)
    last = hidden[rows, lengths - 1]
    last[:pairs] += (gap / 2)[:, None] * quality
    last[pairs:] -= (gap / 2)[:, None] * quality
    hidden[rows, lengths - 1] = last
    flat_last = rows * seq_len + lengths - 1
    return hidden, flat_last[:pairs], flat_last[pairs:], gap


def backends_agree(hidden, head, chosen, rejected):
    results = {}
    for name in backends.BACKENDS:
        if backends.unavailable_reason(name, hidden.device.type) is not None:
            continue
        head.zero_grad()
        out = head(hidden, chosen, rejected, backend=name)
        out.loss.backward()
        results[name] = (out.loss.item(), head.weight.grad.clone())
    base_loss, base_grad = results["torch"]
    for name, (loss, grad) in results.items():
        err = (grad - base_grad).abs().max().item()
        print(f"  {name:<7} loss {loss:.6f}   max |grad - torch grad| {err:.2e}")
        assert abs(loss - base_loss) < 1e-5 and err < 1e-5, f"backend {name} disagrees with torch"
    head.zero_grad()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--pairs", type=int, default=64, help="pairs per step")
    parser.add_argument("--seq-len", type=int, default=48)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    g = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed + 1)  # the head starts unrelated to the data's generator
    quality = torch.nn.functional.normalize(torch.randn(args.hidden, generator=g), dim=0) * 8
    head = RewardHead(args.hidden, bias=True)
    eval_set = make_pairs(512, args.seq_len, args.hidden, quality, g)

    print(f"backend: {backends.select(args.backend, 'cpu')} (auto order on CPU: cpu extension, then torch)")
    print("backends on one batch:")
    backends_agree(eval_set[0][:64], head, eval_set[1][:32] % (64 * args.seq_len),
                   eval_set[2][:32] % (64 * args.seq_len))

    def evaluate():
        with torch.no_grad():
            out = head(eval_set[0], eval_set[1], eval_set[2], backend=args.backend)
        return out.loss.item(), (out.chosen_rewards > out.rejected_rewards).float().mean().item()

    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-2)
    loss0, acc0 = evaluate()
    print(f"step {0:>3}  eval loss {loss0:.4f}  eval accuracy {acc0:6.1%}")
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        hidden, chosen, rejected, gap = make_pairs(args.pairs, args.seq_len, args.hidden, quality, g)
        out = head(hidden, chosen, rejected, margin=0.5 * gap, backend=args.backend)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        if step % 10 == 0 or step == args.steps:
            loss, acc = evaluate()
            print(f"step {step:>3}  train loss {out.loss.item():.4f}  eval loss {loss:.4f}  eval accuracy {acc:6.1%}")
    elapsed = time.perf_counter() - start
    loss, acc = evaluate()
    print(f"done: {args.steps} steps in {elapsed:.1f}s; eval accuracy {acc0:.1%} → {acc:.1%}")
    if acc < 0.9:
        raise SystemExit("eval accuracy stayed below 90%: something is wrong")


if __name__ == "__main__":
    main()
