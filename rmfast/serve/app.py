"""rmfast-serve: an exported reward model served over HTTP for RL loops (PPO, GRPO, RLOO).

  rmfast-serve MODEL_DIR [--host 127.0.0.1] [--port 8000] [--device auto] [--dtype fp32]
               [--token-budget 16384] [--max-wait-ms 5] [--max-queue 256] [--normalize]

Routes (the OpenAPI page is at /docs):
  POST /get_reward              OpenRLHF's remote reward model (--remote_rm_url http://HOST:PORT/get_reward):
                                {query, prompts?, labels?} -> {rewards, scores, extra_logs}; queries of one
                                prompt are scored as one group, the prompt computed once
  POST /classify, /v1/classify  vLLM's classify protocol (verl's reward loop, SGLang clients): {model, input |
                                messages, use_activation?} -> {id, object, created, model, data, usage}
  POST /v1/rewards              groups: {prompt | messages, responses} or {groups: [...]} -> a reward per
                                response and the best one, each group's prompt computed once
  GET  /health, /v1/models, /metrics (Prometheus)

Every route reads texts as rmfast-score does (the export's reward-token convention, the training length
policy: --max-length, 1024 by default), so its rewards are rmfast-score's. Concurrent requests are merged
into prefix-shared forwards of up to --token-budget tokens, waiting at most --max-wait-ms for each other.
SIGTERM stops taking requests, answers those in flight, and exits 0.
"""

import argparse
import asyncio
import math
import signal
import sys
import time

import numpy as np

from . import protocol as P
from .batcher import Batcher, Metrics, QueueFull
from .inputs import BadInput

ROUTES = ("/get_reward", "/classify", "/v1/classify", "/v1/rewards", "/health", "/v1/models", "/metrics")


def _error(status, message, param=None, kind="invalid_request_error", headers=None):
    from fastapi.responses import JSONResponse

    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


def _param(loc):
    """A pydantic error location ('body', 'query', 3) as the field it names: query[3] (the members of a union
    that it tried, 'str' or 'list[dict[str,any]]', left out)."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, str) and (not part.isidentifier() or part in ("str", "int", "float", "bool", "list")):
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


class _Guard:
    """ASGI middleware: refuses bodies over max_bytes (413) and counts every request and its latency."""

    def __init__(self, app, max_bytes, metrics):
        self.app, self.max_bytes, self.metrics = app, max_bytes, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from fastapi import HTTPException

        route = scope["path"] if scope["path"] in ROUTES else "other"
        started, status = time.perf_counter(), [500]
        too_large = HTTPException(413, f"the body is over the size limit of {self.max_bytes} bytes (--max-body-mb)")
        headers = dict(scope["headers"])
        if scope["method"] == "POST" and b"json" not in headers.get(b"content-type", b""):
            # the body is read as JSON whatever it is labelled (curl -d labels it a form)
            headers[b"content-type"] = b"application/json"
            scope = dict(scope, headers=list(headers.items()))
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            response = _error(413, too_large.detail, "body", "request_too_large")
            self.metrics.requests.labels(route, "413").inc()
            return await response(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:  # a body sent without Content-Length
                raise too_large
            return message

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, limited, sending)
        finally:
            self.metrics.requests.labels(route, str(status[0])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)


async def _disconnected(request):
    while not await request.is_disconnected():
        await asyncio.sleep(0.05)


class _Gone(Exception):
    """The client went away before its rewards were computed."""


class Service:
    """What the routes share: the scorer, the request tokenization, the batcher, the metrics."""

    def __init__(self, scorer, inputs, batcher, metrics, name, label):
        self.scorer, self.inputs, self.batcher, self.metrics = scorer, inputs, batcher, metrics
        self.name, self.label = name, label

    async def tokenize(self, fn, *args):
        from starlette.concurrency import run_in_threadpool

        return await run_in_threadpool(fn, *args)

    async def rewards(self, work, request):
        """The rewards of a request's units (see Batcher.submit), or _Gone when its client disconnects first."""
        future = self.batcher.submit(work.groups)
        watch = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({future, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
        if future not in done:
            future.cancel()
            raise _Gone()
        return future.result()


def build_app(service, max_body_bytes):
    """The FastAPI application of one Service."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.exceptions import HTTPException

    @asynccontextmanager
    async def lifespan(app):
        service.batcher.start()
        yield
        await service.batcher.stop()  # uvicorn has answered every request in flight by now

    errors = {400: {"model": P.ErrorResponse}, 413: {"model": P.ErrorResponse},
              422: {"model": P.ErrorResponse}, 503: {"model": P.ErrorResponse}}
    app = FastAPI(title="rmfast-serve", version="0.1.0", lifespan=lifespan, responses=errors,
                  description="A reward model for RL loops: OpenRLHF's /get_reward, vLLM's /classify and rmfast's "
                              "/v1/rewards, each group's prompt computed once.")
    app.add_middleware(_Guard, max_bytes=max_body_bytes, metrics=service.metrics)

    @app.exception_handler(BadInput)
    async def bad_input(request, exc):
        return _error(exc.status, f"{exc.param}: {exc.message}" if exc.param else exc.message, exc.param, exc.kind)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc):
        errs = exc.errors()
        first = errs[0] if errs else {"loc": ("body",), "msg": "invalid request", "type": ""}
        if first.get("type") == "json_invalid":
            return _error(400, f"the body is not valid JSON ({first.get('ctx', {}).get('error', first['msg'])})",
                          "body")
        said = list(dict.fromkeys(f"{_param(e['loc'])}: {e['msg']}" for e in errs))
        more = f" (and {len(said) - 3} more)" if len(said) > 3 else ""
        said = said[:3]
        return _error(422, "; ".join(said) + more, _param(first["loc"]))

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 400 and "parsing the body" in detail:
            detail = "the body could not be read as JSON (is it UTF-8?)"
        return _error(exc.status_code, detail, "body" if exc.status_code in (400, 413) else None,
                      "request_too_large" if exc.status_code == 413 else "invalid_request_error")

    @app.exception_handler(QueueFull)
    async def queue_full(request, exc):
        return _error(503, str(exc), None, "overloaded", headers={"Retry-After": str(exc.retry_after)})

    @app.exception_handler(_Gone)
    async def gone(request, exc):
        return Response(status_code=499)  # nobody is listening; nginx's code for it

    @app.exception_handler(Exception)
    async def failed(request, exc):
        return _error(500, f"{type(exc).__name__}: {exc}", None, "internal_error")

    @app.get("/health")
    async def health():
        if service.batcher.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": service.name, "object": "model", "owned_by": "rmfast",
                                            "created": int(time.time()),
                                            "max_model_len": service.inputs.policy.max_length}]}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/get_reward", response_model=P.GetRewardResponse)
    async def get_reward(body: P.GetRewardRequest, request: Request):
        """OpenRLHF's remote reward model protocol."""
        work, where = await service.tokenize(service.inputs.queries, body.query, body.prompts)
        per = work.per_response(await service.rewards(work, request))
        rewards = [per[u][k] for u, k in where]
        groups = work.groups
        tokens = [len(groups.prompt[u]) + len(groups.responses[u][groups.origin[u][k]]) for u, k in where]
        truncated = [float(work.truncated[u]) for u, _ in where]
        return {"rewards": rewards, "scores": rewards,
                "extra_logs": {"truncated": truncated, "tokens": [float(t) for t in tokens]}}

    async def classify(body: P.ClassifyRequest, request: Request):
        """vLLM's classify protocol: one label, probs = [sigmoid(reward)] (or [reward] without activation)."""
        if (body.input is None) == (body.messages is None):
            raise BadInput("input", "give `input` (a text or a list of texts) or `messages`, one of them")
        last = body.truncate_prompt_tokens
        if last is not None and last != -1 and last < 1:
            raise BadInput("truncate_prompt_tokens", f"is {last}; give k ≥ 1 (keep each input's last k tokens) or -1 "
                                                     f"(no limit but max_length)")
        last = None if last == -1 else last
        if body.messages is not None:
            work = await service.tokenize(service.inputs.messages, body.messages, "messages", last)
        else:
            texts = [body.input] if isinstance(body.input, str) else body.input
            if not texts:
                raise BadInput("input", "is an empty list; give at least one text")
            rendered = body.add_special_tokens is False
            work = await service.tokenize(service.inputs.texts, texts, "input", rendered, last)
        computed = await service.rewards(work, request)
        activate = next((x for x in (body.use_activation, body.activation, body.softmax) if x is not None), True)
        names = getattr(service.scorer, "attributes", [])
        if names:  # an attribute head (a regression config): its A values, as vLLM returns a regression's
            values = [row[0] for row in work.per_response_attributes(computed)]
            data = [{"index": i, "label": names[int(np.argmax(v))], "num_classes": len(names),
                     "truncated": bool(work.truncated[i]), "probs": v} for i, v in enumerate(values)]
        else:
            rewards = [float(np.reshape(r, -1)[0]) for r in computed]
            data = [{"index": i, "label": service.label, "num_classes": 1, "truncated": bool(work.truncated[i]),
                     "probs": [1.0 / (1.0 + math.exp(-r)) if activate else r]} for i, r in enumerate(rewards)]
        tokens = work.tokens
        return P.ClassificationResponse(model=service.name, data=data,
                                        usage=P.Usage(prompt_tokens=tokens, total_tokens=tokens))

    for path in ("/classify", "/v1/classify"):
        app.post(path, response_model=P.ClassificationResponse)(classify)

    @app.post("/v1/rewards", response_model=P.RewardsResponse)
    async def rewards(body: P.RewardsRequest, request: Request):
        """Groups of responses to one prompt: a reward per response, each group's prompt computed once."""
        if body.groups is not None:
            if body.responses is not None:
                raise BadInput("groups", "give one group at the top level or several under `groups`, not both")
            rows, param = [g.model_dump() for g in body.groups], "groups"
        else:
            if not body.responses:
                raise BadInput("responses", "is missing or empty; give {prompt | messages, responses: [at least "
                                            "one]} or {groups: [...]}")
            rows, param = [body.model_dump(include={"prompt", "messages", "responses"})], None
        work = await service.tokenize(service.inputs.groups, rows, param)
        computed = await service.rewards(work, request)
        per = work.per_response(computed)
        data = [{"index": g, "rewards": r, "best": int(np.argmax(r)), "truncated": bool(work.truncated[g])}
                for g, r in enumerate(per)]
        names = getattr(service.scorer, "attributes", [])
        if names:  # an attribute head: each response's attributes by name
            for d, values in zip(data, work.per_response_attributes(computed)):
                d["attributes"] = {n: [v[a] for v in values] for a, n in enumerate(names)}
        tokens = work.tokens
        return P.RewardsResponse(model=service.name, data=data,
                                 usage=P.Usage(prompt_tokens=tokens, total_tokens=tokens))

    return app


def parse_args(argv=None):
    from ..attention import ATTENTIONS
    from ..data.options import DEFAULTS
    from ..errors import ArgumentParser

    parser = ArgumentParser(prog="rmfast-serve", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="an exported reward model folder (rmfast-export / rmfast-train's export/)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                        help="weights and activations (fp32 scores exactly; bf16 is faster on a GPU)")
    parser.add_argument("--attention", default="auto", choices=list(ATTENTIONS),
                        help="attention of the packed batches (as rmfast-score's)")
    parser.add_argument("--token-budget", type=int, default=16384, help="tokens per forward")
    parser.add_argument("--max-wait-ms", type=float, default=5.0,
                        help="how long a request waits for others to share its forward")
    parser.add_argument("--max-queue", type=int, default=256,
                        help="requests waiting at most; more are answered 503 with Retry-After")
    parser.add_argument("--normalize", action="store_true", help="(r - eval mean) / eval std from the export")
    parser.add_argument("--max-length", type=int, default=DEFAULTS.max_length,
                        help=f"tokens per sequence, the training length policy (default: {DEFAULTS.max_length}, "
                             f"as rmfast-train and rmfast-score)")
    parser.add_argument("--chat-template", help="Jinja chat template (text or file) for conversations "
                                                "(default: the tokenizer's)")
    parser.add_argument("--served-model-name", help="the model's name in answers and /v1/models "
                                                    "(default: MODEL_DIR as given)")
    parser.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body taken")
    parser.add_argument("--max-text-chars", type=int, default=1_000_000,
                        help="longest single text taken (longer ones are refused with 413 before tokenization)")
    parser.add_argument("--graceful-timeout", type=float, default=60.0,
                        help="seconds SIGTERM waits for the requests in flight")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    parser.add_argument("--access-log", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    for name in ("token_budget", "max_queue", "max_length", "max_text_chars"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_wait_ms < 0 or args.max_body_mb <= 0:
        parser.error("--max-wait-ms must be >= 0 and --max-body-mb > 0")
    return args


def main(argv=None):
    from ..errors import run

    args = parse_args(argv)

    def body():
        from ..data.loader import DataConfig
        from ..errors import UserError
        from ..score import Scorer, _device

        try:
            import fastapi  # noqa: F401
            import prometheus_client  # noqa: F401
            import uvicorn
        except ImportError as exc:
            raise UserError(f"rmfast-serve needs fastapi, uvicorn and prometheus_client ({exc.name} is missing): "
                            f"pip install 'rmfast[serve]'") from None
        from transformers.utils import logging as hf_logging

        from .inputs import Inputs

        _device(args.device)  # before the model is read
        hf_logging.disable_progress_bar()
        scorer = Scorer(args.model, args.device, args.dtype, args.attention)
        if args.normalize:
            scorer.normalize(np.zeros(1))  # refuses a model without the eval mean and std, before serving
        config = DataConfig(max_length=args.max_length, chat_template=args.chat_template,
                            eos_after_template=scorer.eos_after_template)
        metrics = Metrics()
        id2label = getattr(scorer.model.backbone.config, "id2label", None) or {0: "LABEL_0"}
        label = str(id2label.get(0, id2label.get("0", "LABEL_0")))
        service = Service(scorer, Inputs(scorer.tokenizer, config, args.max_text_chars),
                          Batcher(scorer, args.token_budget, args.max_wait_ms / 1000, args.max_queue, metrics,
                                  args.normalize),
                          metrics, args.served_model_name or args.model, label)
        app = build_app(service, int(args.max_body_mb * 2**20))
        server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                               access_log=args.access_log,
                                               timeout_graceful_shutdown=args.graceful_timeout))
        # uvicorn drains on SIGTERM, then raises the signal again once it has restored the handler it found:
        # found a no-op, the process then ends as the drain did, with 0
        signal.signal(signal.SIGTERM, lambda *_: None)
        print(f"rmfast-serve: {args.model} on {scorer.device} ({args.dtype}), max_length {args.max_length}, "
              f"token budget {args.token_budget}, http://{args.host}:{args.port} (OpenAPI at /docs)",
              file=sys.stderr, flush=True)
        server.run()
        if not server.started:
            raise UserError(f"could not listen on {args.host}:{args.port} (in use?)")

    return run("rmfast-serve", body)


if __name__ == "__main__":
    sys.exit(main())
