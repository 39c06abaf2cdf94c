"""OpenRLHF's remote reward call, against rmfast-serve.

OpenRLHF's PPO / GRPO trainers take the server as it is:

    rmfast-serve runs/rm/export --host 0.0.0.0 --port 8000
    python -m openrlhf.cli.train_ppo_ray ... --remote_rm_url http://RM_HOST:8000/get_reward

Several servers (one per GPU or node) go in one comma-separated --remote_rm_url; OpenRLHF splits each batch
of queries across them. This script sends what OpenRLHF sends: the whole texts (`query`: prompt + response,
as the policy rendered them), each one's prompt (`prompts`) and `labels`, and reads `rewards`. Queries that
share a prompt are scored as one group by rmfast-serve, the prompt computed once.

    python examples/serve_openrlhf_client.py --url http://127.0.0.1:8000/get_reward
"""

import argparse
import json
import time
import urllib.error
import urllib.request


def remote_rewards(url, queries, prompts, labels=None, retries=5):
    """POST {query, prompts, labels} and return the rewards; a 503 (the server's queue is full) is retried
    after the Retry-After it names, as a loop calling many servers should."""
    body = json.dumps({"query": queries, "prompts": prompts, "labels": labels or [None] * len(queries)}).encode()
    for attempt in range(retries):
        request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=300) as response:
                return json.load(response)["rewards"]
        except urllib.error.HTTPError as exc:
            if exc.code != 503 or attempt == retries - 1:
                raise RuntimeError(f"{url}: {exc.code} {exc.read().decode(errors='replace')}") from None
            time.sleep(float(exc.headers.get("Retry-After", 1)))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000/get_reward")
    args = parser.parse_args()
    prompt = "\n\nHuman: How do I keep basil alive indoors?\n\nAssistant:"
    responses = [" Give it a sunny window and water when the soil is dry.",
                 " Basil is a plant.",
                 " Keep it warm, in bright light, and pinch off the flowers so it keeps growing leaves.",
                 " I don't know."]
    rewards = remote_rewards(args.url, [prompt + r for r in responses], [prompt] * len(responses))
    for r, text in sorted(zip(rewards, responses), reverse=True):
        print(f"{r:+.4f} {text.strip()}")


if __name__ == "__main__":
    main()
