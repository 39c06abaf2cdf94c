"""verl's reward-model call (vLLM's classify protocol), against rmfast-serve.

verl's reward loop scores a rollout with a discriminative reward model served by vLLM or SGLang: it renders
the conversation with the reward model's chat template and POSTs it to `/classify` with the activation off
(the raw reward) and no special tokens added (the template wrote them). rmfast-serve speaks the same
protocol at /classify and /v1/classify, and reads such a rendered text where the chat template ends, as the
model was trained (rmfast's reward-token convention), so its rewards are rmfast-score's.

    rmfast-serve runs/rm/export --port 8000
    python examples/serve_verl_classify.py --url http://127.0.0.1:8000 --model runs/rm/export

Sending the conversation itself ({"messages": [...]}) instead of a rendered text gives the same reward.
"""

import argparse
import json
import urllib.request


def post(url, payload):
    request = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.load(response)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", required=True, help="the export folder (its tokenizer renders the chat)")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    conversations = [
        [{"role": "user", "content": "What is 7 times 6?"}, {"role": "assistant", "content": "7 times 6 is 42."}],
        [{"role": "user", "content": "What is 7 times 6?"}, {"role": "assistant", "content": "7 times 6 is 36."}],
    ]
    rendered = [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]
    model = args.model
    # what verl sends: the rendered texts, the raw reward, no special tokens added
    answer = post(f"{args.url}/classify", {"model": model, "input": rendered, "activation": False,
                                          "add_special_tokens": False})
    rewards = [d["probs"][0] for d in answer["data"]]
    # vLLM's chat form: one conversation per request, rendered by the server
    same = [post(f"{args.url}/v1/classify", {"model": model, "messages": c, "use_activation": False})["data"][0]
            ["probs"][0] for c in conversations]
    for c, r, s in zip(conversations, rewards, same):
        print(f"{r:+.4f} (messages: {s:+.4f})  {c[-1]['content']}")


if __name__ == "__main__":
    main()
