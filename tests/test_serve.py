"""rmfast-serve on a real server: started as a user starts it, on 127.0.0.1 and a free port, spoken to over HTTP
with httpx. Every route's rewards are rmfast-score's for the same texts; bad input is a 4xx naming the field;
load beyond the queue is a 503 with Retry-After; SIGTERM answers what is in flight and exits 0."""

import json
import math
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
prometheus = pytest.importorskip("prometheus_client.parser")

from rmfast.data import generate_pairs  # noqa: E402
from rmfast.data.synthetic import write_jsonl  # noqa: E402
from rmfast.data.tokenizers import train_bpe_tokenizer  # noqa: E402
from rmfast.export import write_export  # noqa: E402
from rmfast.score import main as score_main  # noqa: E402
from rmfast.serve.client import wait_ready  # noqa: E402
from helpers import build, clean_env, free_port  # noqa: E402

MAX_LENGTH = 512  # ordinary test texts fit it (up to ~420 tokens); long_text() does not
MAX_TEXT_CHARS = 5000


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    rows = generate_pairs(12, seed=4, style="explicit")
    chats = generate_pairs(4, seed=5)  # conversational
    tok = train_bpe_tokenizer([r["prompt"] + r["chosen"] for r in rows] +
                              [m["content"] for r in chats for m in r["prompt"] + r["chosen"]], vocab_size=160)
    assert tok.chat_template
    model = build(None, "llama", vocab=len(tok))
    path = write_export(model.backbone.config, model.state_dict(), tok, root / "export",
                        {"eval_reward_mean": 0.5, "eval_reward_std": 2.0})
    return root, path, rows, chats


def start(path, log, *options):
    """rmfast-serve as a user starts it (the console script when installed); returns (process, base url)."""
    script = Path(sys.executable).parent / "rmfast-serve"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "rmfast.serve.app"]
    port = free_port()
    proc = subprocess.Popen(cmd + [str(path), "--port", str(port), "--log-level", "warning", *options],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, env=clean_env())
    url = f"http://127.0.0.1:{port}"
    wait_ready(proc, url, 120, log)
    return proc, url


def stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def server(export):
    root, path, _, _ = export
    proc, url = start(path, root / "server.log", "--max-length", str(MAX_LENGTH), "--max-wait-ms", "20",
                      "--max-text-chars", str(MAX_TEXT_CHARS), "--max-body-mb", "1", "--token-budget", "4096")
    with httpx.Client(base_url=url, timeout=60) as client:
        yield client
    stop(proc)


def scored(path, tmp_path, rows, name):
    """rmfast-score's records for rows written to NAME.jsonl, at the server's max_length."""
    write_jsonl(rows, tmp_path / f"{name}.jsonl")
    out = tmp_path / f"{name}-scores.jsonl"
    assert score_main([str(path), str(tmp_path / f"{name}.jsonl"), "--out", str(out),
                       "--max-length", str(MAX_LENGTH)]) == 0
    records = [json.loads(x) for x in out.read_text().splitlines()]
    return sorted(records, key=lambda r: int(r["location"].rpartition(":")[2]))


def long_text(rows):
    return " ".join(r["prompt"] + r["chosen"] for r in rows[:6])  # well over MAX_LENGTH tokens


# ---- every route gives rmfast-score's rewards ----

def test_get_reward_equals_rmfast_score_on_texts_and_on_groups_of_a_shared_prompt(server, export, tmp_path):
    _, path, rows, _ = export
    prompts = [r["prompt"] for r in rows[:3] for _ in range(3)]
    answers = [rows[(i + j) % len(rows)]["chosen"] for i in range(3) for j in range(3)]
    queries = [p + a for p, a in zip(prompts, answers)]
    long = long_text(rows)
    # without prompts: each query is a text, as rmfast-score scores {"text"} rows
    got = server.post("/get_reward", json={"query": queries + [long], "labels": [None] * 10}).json()
    want = scored(path, tmp_path, [{"text": q} for q in queries + [long]], "texts")
    np.testing.assert_allclose(got["rewards"], [r["reward"] for r in want], atol=1e-4)
    assert got["scores"] == got["rewards"]
    assert got["extra_logs"]["truncated"] == [0.0] * 9 + [1.0]
    # with prompts: the queries of one prompt are one group, as rmfast-score scores {prompt, responses} rows
    got = server.post("/get_reward", json={"query": queries, "prompts": prompts}).json()
    groups = [{"prompt": rows[i]["prompt"], "responses": answers[3 * i:3 * i + 3]} for i in range(3)]
    want = scored(path, tmp_path, groups, "groups")
    np.testing.assert_allclose(got["rewards"], [x for r in want for x in r["rewards"]], atol=1e-4)


def test_classify_speaks_vllms_protocol_with_rmfast_scores_rewards(server, export, tmp_path):
    _, path, rows, chats = export
    texts = [r["prompt"] + r["chosen"] for r in rows[:4]]
    want = [r["reward"] for r in scored(path, tmp_path, [{"text": t} for t in texts], "texts")]
    for route in ("/classify", "/v1/classify"):
        body = server.post(route, json={"model": "rm", "input": texts, "use_activation": False}).json()
        assert body["object"] == "list" and body["id"].startswith("classify-") and isinstance(body["created"], int)
        assert [d["index"] for d in body["data"]] == [0, 1, 2, 3]
        assert all(d["num_classes"] == 1 and d["label"] == "LABEL_0" for d in body["data"])
        np.testing.assert_allclose([d["probs"][0] for d in body["data"]], want, atol=1e-4)
        assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0
    # the activation is on by default (a sigmoid for one label); its older name is read too
    default = server.post("/classify", json={"input": texts[0]}).json()["data"][0]["probs"][0]
    assert default == pytest.approx(1 / (1 + math.exp(-want[0])), abs=1e-5)
    raw = server.post("/classify", json={"input": texts[0], "activation": False}).json()["data"][0]["probs"][0]
    assert raw == pytest.approx(want[0], abs=1e-4)


def test_classify_truncate_prompt_tokens_keeps_each_input_s_last_tokens_as_vllm(server, export):
    from rmfast.score import Scorer, sequence_ids

    _, path, rows, _ = export
    text = rows[0]["prompt"] + rows[0]["chosen"]
    scorer = Scorer(path)
    ids, _ = sequence_ids(scorer.tokenizer, 10**6, text=text)
    assert len(ids) > 6
    want_cut, want_whole = scorer.score_sequences([ids[-6:]])[0], scorer.score_sequences([ids])[0]
    cut = server.post("/classify", json={"input": text, "truncate_prompt_tokens": 6, "use_activation": False})
    whole = server.post("/classify", json={"input": text, "truncate_prompt_tokens": -1, "use_activation": False})
    cut, whole = cut.json()["data"][0], whole.json()["data"][0]
    assert cut["truncated"] and not whole["truncated"]
    assert cut["probs"][0] == pytest.approx(want_cut, abs=1e-4) and whole["probs"][0] == pytest.approx(want_whole,
                                                                                                      abs=1e-4)
    assert abs(want_cut - want_whole) > 1e-3  # what was cut mattered


def test_classify_reads_messages_and_rendered_chat_text_where_the_template_ends(server, export, tmp_path):
    """vLLM's chat form and verl's (the rendered conversation sent with add_special_tokens false) both read the
    reward where apply_chat_template ends, as rmfast-score scores {"messages"} rows."""
    from transformers import AutoTokenizer

    _, path, _, chats = export
    conversations = [c["prompt"] + c["chosen"] for c in chats]
    want = [r["reward"] for r in scored(path, tmp_path, [{"messages": m} for m in conversations], "messages")]
    got = [server.post("/v1/classify", json={"messages": m, "use_activation": False}).json()["data"][0]["probs"][0]
           for m in conversations]
    np.testing.assert_allclose(got, want, atol=1e-4)
    tok = AutoTokenizer.from_pretrained(path)
    rendered = [tok.apply_chat_template(m, tokenize=False) for m in conversations]
    body = server.post("/classify", json={"input": rendered, "add_special_tokens": False, "use_activation": False})
    np.testing.assert_allclose([d["probs"][0] for d in body.json()["data"]], want, atol=1e-4)


def test_rewards_route_scores_groups_as_rmfast_score_with_the_best_response(server, export, tmp_path):
    _, path, rows, chats = export
    groups = [{"prompt": r["prompt"], "responses": [r["chosen"], r["rejected"], rows[i - 1]["chosen"], r["chosen"]]}
              for i, r in enumerate(rows[:3])]
    groups.append({"prompt": rows[3]["prompt"], "responses": [long_text(rows), rows[3]["chosen"]]})
    chat_groups = [{"prompt": c["prompt"], "responses": [c["chosen"], c["rejected"]]} for c in chats]
    want = scored(path, tmp_path, groups, "groups") + scored(path, tmp_path, chat_groups, "chat-groups")
    body = server.post("/v1/rewards", json={"groups": groups[:3] + [groups[3]] + chat_groups}).json()
    assert len(body["data"]) == len(want)
    for got, ref in zip(body["data"], want):
        np.testing.assert_allclose(got["rewards"], ref["rewards"], atol=1e-4)
        assert got["best"] == int(np.argmax(got["rewards"]))
    assert body["data"][0]["rewards"][0] == body["data"][0]["rewards"][3]  # identical responses, one reward
    assert [d["truncated"] for d in body["data"]] == [False, False, False, True] + [False] * len(chat_groups)
    # one group at the top level, its prompt as `messages`
    one = server.post("/v1/rewards", json={"messages": chats[0]["prompt"], "responses": chat_groups[0]["responses"]})
    np.testing.assert_allclose(one.json()["data"][0]["rewards"], body["data"][4]["rewards"], atol=1e-5)


# ---- bad input: a 4xx JSON error naming the field, and the server goes on ----

BAD = [
    ("/get_reward", b'{"query": [', 400, "body"),
    ("/get_reward", b'{"query": ["\xff\xfe"]}', 400, "body"),
    ("/get_reward", b'{"query": []}', 422, "query"),
    ("/get_reward", b'{"query": "one string"}', 422, "query"),
    ("/get_reward", b'{"query": ["a", 3]}', 422, "query[1]"),
    ("/get_reward", b'{"query": ["ab", "cd"], "prompts": ["a"]}', 422, "prompts"),
    ("/get_reward", b'{"query": ["abc", "xyz"], "prompts": ["ab", "ab"]}', 422, "prompts[1]"),
    ("/get_reward", b'[1, 2]', 422, "body"),
    ("/classify", b'{"model": "rm"}', 422, "input"),
    ("/classify", b'{"input": []}', 422, "input"),
    ("/classify", b'{"input": ["fine", "  "]}', 422, "input[1]"),
    ("/classify", b'{"input": "fine", "truncate_prompt_tokens": 0}', 422, "truncate_prompt_tokens"),
    ("/v1/classify", b'{"messages": [{"role": "wizard", "content": "hi"}]}', 422, "messages"),
    ("/v1/rewards", b'{"prompt": "p", "responses": []}', 422, "responses"),
    ("/v1/rewards", b'{"prompt": "p"}', 422, "responses"),
    ("/v1/rewards", b'{"prompt": "p", "responses": ["a", ""]}', 422, "responses[1]"),
    ("/v1/rewards", b'{"groups": [{"prompt": "p", "responses": ["a"]}, {"responses": [7]}]}', 422,
     "groups[1].responses[0]"),
    ("/v1/rewards", b'{"groups": []}', 422, "groups"),
]


@pytest.mark.parametrize("route,body,status,param", BAD, ids=[f"{r}-{p}-{i}" for i, (r, _, _, p) in enumerate(BAD)])
def test_bad_input_is_a_4xx_naming_the_field_and_the_next_request_is_served(server, route, body, status, param):
    response = server.post(route, content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["code"] == status and param in error["message"]
    assert server.post("/get_reward", json={"query": ["still serving"]}).status_code == 200


def test_a_text_far_over_max_length_and_a_body_over_the_limit_are_refused(server):
    response = server.post("/get_reward", json={"query": ["ok", "x" * (MAX_TEXT_CHARS + 1)]})
    assert response.status_code == 413 and response.json()["error"]["param"] == "query[1]"
    big = json.dumps({"query": ["y" * 1000] * 1100}).encode()  # 1.1 MB, over --max-body-mb 1
    response = server.post("/get_reward", content=big)
    assert response.status_code == 413 and response.json()["error"]["param"] == "body"
    chunked = server.post("/get_reward", content=iter([big[i:i + 65536] for i in range(0, len(big), 65536)]))
    assert chunked.status_code == 413  # sent without Content-Length
    assert server.post("/classify", content=b'{"input": "served"}').status_code == 200  # labelled as a form


# ---- batching, metrics, models ----

def metric_values(client):
    families = prometheus.text_string_to_metric_families(client.get("/metrics").text)
    return {s.name + json.dumps(s.labels, sort_keys=True): s.value for f in families for s in f.samples}


def test_concurrent_requests_share_forwards_and_get_the_rewards_they_get_alone(server, export):
    _, _, rows, _ = export
    requests = [[r["prompt"] + r["chosen"], r["prompt"] + r["rejected"]] for r in rows]
    alone = [server.post("/get_reward", json={"query": q}).json()["rewards"] for q in requests]
    before = metric_values(server)
    with ThreadPoolExecutor(6) as pool:  # 12 requests, 6 at a time
        together = list(pool.map(lambda q: server.post("/get_reward", json={"query": q}).json()["rewards"],
                                 requests))
    after = metric_values(server)
    np.testing.assert_allclose(together, alone, atol=1e-5)
    forwards = after["rmfast_serve_forwards_total{}"] - before["rmfast_serve_forwards_total{}"]
    assert forwards < len(requests)
    assert after["rmfast_serve_rewards_total{}"] - before["rmfast_serve_rewards_total{}"] == 2 * len(requests)


def test_metrics_models_health_and_the_openapi_page(server):
    server.post("/get_reward", json={"query": ["count me"]})
    values = metric_values(server)
    for name in ("rmfast_serve_requests_total", "rmfast_serve_rewards_total", "rmfast_serve_tokens_total",
                 "rmfast_serve_batch_requests_bucket", "rmfast_serve_queue_depth",
                 "rmfast_serve_request_seconds_bucket", "rmfast_serve_forward_seconds_count"):
        assert any(k.startswith(name) for k in values), name
    assert values['rmfast_serve_requests_total{"route": "/get_reward", "status": "200"}'] >= 1
    models = server.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["max_model_len"] == MAX_LENGTH
    assert server.get("/health").json() == {"status": "ok"}
    paths = server.get("/openapi.json").json()["paths"]
    assert {"/get_reward", "/classify", "/v1/classify", "/v1/rewards"} <= set(paths)
    assert server.get("/docs").status_code == 200


# ---- load: a full queue, a client gone, SIGTERM ----

@pytest.fixture(scope="module")
def patient(export):
    """A server that waits 400 ms for requests to share a forward, queues at most 2, and normalizes."""
    root, path, _, _ = export
    proc, url = start(path, root / "patient.log", "--max-length", str(MAX_LENGTH), "--max-wait-ms", "400",
                      "--max-queue", "2", "--normalize")
    with httpx.Client(base_url=url, timeout=60) as client:
        yield proc, client
    stop(proc)


def test_a_full_queue_answers_503_with_retry_after_and_normalized_rewards_are_served(patient, server):
    _, client = patient
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: client.post("/get_reward", json={"query": [f"text {i}"]}), range(8)))
    statuses = sorted(a.status_code for a in answers)
    assert statuses.count(503) >= 1 and statuses.count(200) >= 2, statuses
    refused = next(a for a in answers if a.status_code == 503)
    assert int(refused.headers["retry-after"]) >= 1 and refused.json()["error"]["type"] == "overloaded"
    raw = server.post("/get_reward", json={"query": ["text 0"]}).json()["rewards"][0]
    got = client.post("/get_reward", json={"query": ["text 0"]}).json()["rewards"][0]
    assert got == pytest.approx((raw - 0.5) / 2.0, abs=1e-5)  # --normalize: the export's eval mean and std


def test_a_client_that_disconnects_while_queued_costs_no_forward(patient):
    _, client = patient
    before = metric_values(client)
    body = json.dumps({"query": ["gone before its forward"]}).encode()
    port = int(str(client.base_url).rsplit(":", 1)[1].strip("/"))
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /get_reward HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        time.sleep(0.1)  # queued: the server waits 400 ms for company
    time.sleep(0.8)
    after = metric_values(client)
    assert after["rmfast_serve_cancelled_total{}"] - before["rmfast_serve_cancelled_total{}"] == 1
    assert after["rmfast_serve_forwards_total{}"] == before["rmfast_serve_forwards_total{}"]
    assert client.post("/get_reward", json={"query": ["next"]}).status_code == 200


@pytest.mark.slow  # a process of its own (imports torch and the libraries): over 5 s
def test_sigterm_answers_the_requests_in_flight_then_exits_0(export):
    root, path, _, _ = export
    proc, url = start(path, root / "sigterm.log", "--max-wait-ms", "500")
    with httpx.Client(base_url=url, timeout=60) as client, ThreadPoolExecutor(3) as pool:
        pending = [pool.submit(client.post, "/v1/rewards", json={"prompt": "p", "responses": [f"r{i}", "s"]})
                   for i in range(3)]
        time.sleep(0.2)  # the three wait in the queue for 500 ms
        proc.send_signal(signal.SIGTERM)
        answers = [p.result() for p in pending]
    assert [a.status_code for a in answers] == [200] * 3
    assert proc.wait(30) == 0, (root / "sigterm.log").read_text()
    with pytest.raises(httpx.TransportError):
        httpx.get(url + "/health", timeout=2)


def _rewards_served(server):
    text = server.get("/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("rmfast_serve_rewards_total"))


@pytest.mark.slow
def test_trl_grpo_trainer_trains_on_rewards_from_the_server(server, export, tmp_path):
    # examples/serve_trl_grpo.py as a user runs it: TRL's GRPOTrainer, a tiny policy, every prompt's K completions
    # sent to /v1/rewards as one group
    pytest.importorskip("trl")
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from helpers import tiny_config

    _, path, rows, _ = export
    tok = AutoTokenizer.from_pretrained(path)
    cfg = tiny_config("llama", pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, bos_id=tok.bos_token_id,
                      vocab=len(tok))
    cfg.max_position_embeddings = 256  # a prompt and its completion
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "policy")
    tok.save_pretrained(tmp_path / "policy")
    write_jsonl([{"prompt": r["prompt"]} for r in rows[:4]], tmp_path / "prompts.jsonl")
    before = _rewards_served(server)
    res = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "examples" / "serve_trl_grpo.py"),
                          "--policy", str(tmp_path / "policy"), "--prompts", str(tmp_path / "prompts.jsonl"),
                          "--url", str(server.base_url), "--num-generations", "2", "--max-steps", "2",
                          "--max-completion-length", "8", "--output-dir", str(tmp_path / "grpo")],
                         capture_output=True, text=True, timeout=600, env=clean_env())
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "rewards/rmfast_serve/mean" in res.stdout + res.stderr  # TRL logged the server's rewards
    assert _rewards_served(server) - before == 2 * 2  # 2 steps of one prompt's 2 completions


@pytest.mark.slow  # a server of its own: over 5 s
def test_an_attribute_export_is_served_with_its_attributes(export, tmp_path):
    # an A-label export (the regression objectives): /v1/rewards gives each response's attributes beside the
    # combined reward, /classify the A values, /get_reward the combined reward; all as rmfast-score gives them
    import torch

    root, _, rows, _ = export
    tok = train_bpe_tokenizer([r["prompt"] + r["chosen"] for r in rows], vocab_size=160)
    model = build(None, "llama", vocab=len(tok), bias=True)
    model.use_attribute_head(3, [0.5, 0.3, 0.2])
    with torch.no_grad():
        model.head.weight.normal_(std=0.5)
        model.head.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    path = write_export(model.backbone.config, model.state_dict(), tok, tmp_path / "export",
                        attributes=(["helpfulness", "correctness", "verbosity"], [0.5, 0.3, 0.2]))
    groups = [{"prompt": rows[i]["prompt"], "responses": [rows[i]["chosen"], rows[i]["rejected"]]} for i in range(3)]
    want = scored(path, tmp_path, groups, "attribute-groups")
    assert set(want[0]["attributes"]) == {"helpfulness", "correctness", "verbosity"}
    proc, url = start(path, tmp_path / "server.log", "--max-length", str(MAX_LENGTH))
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            got = client.post("/v1/rewards", json={"groups": groups}).json()["data"]
            for g, w in zip(got, want):
                np.testing.assert_allclose(g["rewards"], w["rewards"], atol=1e-4)
                for name, values in w["attributes"].items():
                    np.testing.assert_allclose(g["attributes"][name], values, atol=1e-4)
                combined = np.array([w["attributes"][n] for n in ("helpfulness", "correctness", "verbosity")])
                np.testing.assert_allclose(g["rewards"], [0.5, 0.3, 0.2] @ combined, atol=1e-4)
            classified = client.post("/classify", json={"input": [groups[0]["prompt"] + groups[0]["responses"][0]]})
            data = classified.json()["data"][0]
            assert data["num_classes"] == 3
            np.testing.assert_allclose(data["probs"], [want[0]["attributes"][n][0] for n in
                                                       ("helpfulness", "correctness", "verbosity")], atol=1e-4)
            reward = client.post("/get_reward", json={"query": [groups[1]["prompt"] + groups[1]["responses"][1]],
                                                      "prompts": [groups[1]["prompt"]]}).json()["rewards"]
            assert reward[0] == pytest.approx(want[1]["rewards"][1], abs=1e-4)
    finally:
        stop(proc)
