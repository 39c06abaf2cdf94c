"""TRL's GRPOTrainer with its reward from rmfast-serve.

GRPO samples `num_generations` completions of every prompt; TRL hands a reward function the batch's prompts
and completions (the completions of one prompt side by side). `RemoteReward` sends each prompt's
completions to rmfast-serve's /v1/rewards as one group, so the reward model computes the prompt once for
all of them, and returns a reward per completion in TRL's order. Plain-text and conversational datasets
both work (a conversation is rendered by the reward model's chat template, as in its training).

    rmfast-serve runs/rm/export --port 8000
    python examples/serve_trl_grpo.py --policy POLICY_DIR --prompts prompts.jsonl --url http://127.0.0.1:8000
    python examples/serve_trl_grpo.py --check --url http://127.0.0.1:8000     # the reward function alone

prompts.jsonl: one {"prompt": "..."} (or {"prompt": [{"role": "user", "content": "..."}]}) per line.
"""

import argparse
import json
import time
import urllib.error
import urllib.request


class RemoteReward:
    """A TRL reward function (prompts, completions, **columns) -> [float] backed by rmfast-serve."""

    __name__ = "rmfast_serve"  # the name TRL logs the reward under

    def __init__(self, url, timeout=300, retries=5):
        self.url, self.timeout, self.retries = url.rstrip("/") + "/v1/rewards", timeout, retries

    def __call__(self, prompts, completions, **columns):
        groups, where = [], []
        for prompt, completion in zip(prompts, completions):
            if not groups or groups[-1]["prompt"] != prompt:  # a new prompt starts a new group
                groups.append({"prompt": prompt, "responses": []})
            where.append((len(groups) - 1, len(groups[-1]["responses"])))
            groups[-1]["responses"].append(completion)
        data = self._post({"groups": groups})["data"]
        return [data[g]["rewards"][k] for g, k in where]

    def _post(self, payload):
        body = json.dumps(payload).encode()
        for attempt in range(self.retries):
            request = urllib.request.Request(self.url, body, {"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.load(response)
            except urllib.error.HTTPError as exc:  # 503: the queue is full; wait as the server says
                if exc.code != 503 or attempt == self.retries - 1:
                    raise RuntimeError(f"{self.url}: {exc.code} {exc.read().decode(errors='replace')}") from None
                time.sleep(float(exc.headers.get("Retry-After", 1)))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--check", action="store_true", help="only call the reward function on two groups")
    parser.add_argument("--policy", help="a causal LM folder (the policy GRPO trains)")
    parser.add_argument("--prompts", help="a .jsonl of {prompt} rows")
    parser.add_argument("--num-generations", type=int, default=8, help="K completions per prompt")
    parser.add_argument("--max-steps", type=int, default=10)
    parser.add_argument("--max-completion-length", type=int, default=128)
    parser.add_argument("--output-dir", default="runs/grpo")
    args = parser.parse_args()
    reward = RemoteReward(args.url)
    if args.check:
        prompts = ["Q: 2 + 2 =", "Q: 2 + 2 =", "Q: 3 + 5 =", "Q: 3 + 5 ="]
        print(reward(prompts, [" 4", " 5", " 8", " 7"]))
        return
    if not (args.policy and args.prompts):
        parser.error("give --policy and --prompts (or --check)")
    import torch
    from datasets import load_dataset
    from trl import GRPOConfig, GRPOTrainer

    cuda = torch.cuda.is_available()  # TRL's default is bf16, which needs a GPU: on CPU the policy runs in fp32
    config = GRPOConfig(output_dir=args.output_dir, num_generations=args.num_generations,
                        per_device_train_batch_size=args.num_generations,
                        max_completion_length=args.max_completion_length,
                        max_steps=args.max_steps, logging_steps=1, report_to=[], bf16=cuda, use_cpu=not cuda)
    trainer = GRPOTrainer(model=args.policy, reward_funcs=[reward], args=config,
                          train_dataset=load_dataset("json", data_files=args.prompts, split="train"))
    trainer.train()


if __name__ == "__main__":
    main()
