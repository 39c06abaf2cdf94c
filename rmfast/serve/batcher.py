"""Dynamic batching: the requests that arrive while the model is busy, or within max_wait of the first one
waiting, are merged into one prefix-shared forward of up to a token budget (each group's prompt once, across
requests), run on one thread that owns the model, off the event loop. A full queue refuses new work (the
route answers 503 with Retry-After); a request whose client went away before its forward is skipped."""

import asyncio
import collections
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from .. import layouts
from ..data.tokens import TokenizedGroups
from ..score import _token_batches


class QueueFull(Exception):
    """The queue holds max_queue requests (or the server is draining); retry_after: seconds to suggest."""

    def __init__(self, message, retry_after=1):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class _Job:
    groups: TokenizedGroups
    tokens: int
    future: asyncio.Future
    enqueued: float


class Metrics:
    """The server's Prometheus metrics, in a registry of their own (GET /metrics)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("rmfast_serve_requests", "HTTP requests answered", ["route", "status"], registry=r)
        self.rewards = Counter("rmfast_serve_rewards", "rewards computed", registry=r)
        self.tokens = Counter("rmfast_serve_tokens", "tokens computed (each prompt once per forward)", registry=r)
        self.positions = Counter("rmfast_serve_positions", "token positions the forwards computed (rows x length, "
                                                           "padding included)", registry=r)
        self.forwards = Counter("rmfast_serve_forwards", "model forwards", registry=r)
        self.rejected = Counter("rmfast_serve_rejected", "requests refused with 503: queue full or draining",
                                registry=r)
        self.cancelled = Counter("rmfast_serve_cancelled", "requests dropped before their forward: the client "
                                                           "disconnected", registry=r)
        self.queue_depth = Gauge("rmfast_serve_queue_depth", "requests waiting for a forward", registry=r)
        self.batch_requests = Histogram("rmfast_serve_batch_requests", "requests merged into one batch",
                                        buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.batch_tokens = Histogram("rmfast_serve_batch_tokens", "tokens of one forward",
                                      buckets=(256, 1024, 4096, 16384, 65536, 262144), registry=r)
        self.forward_seconds = Histogram("rmfast_serve_forward_seconds", "time of one forward", registry=r)
        self.latency = Histogram("rmfast_serve_request_seconds", "time from request to answer", ["route"],
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60), registry=r)


class Batcher:
    """Owns the scorer: submit() a request's units, await the rewards. token_budget: tokens per forward (a
    larger request is split into several, a group larger than the budget takes one of its own); max_wait_s:
    how long the first waiting request waits for others; max_queue: requests waiting at most."""

    def __init__(self, scorer, token_budget, max_wait_s, max_queue, metrics, normalize=False):
        self.scorer, self.token_budget, self.max_wait_s, self.max_queue = scorer, token_budget, max_wait_s, max_queue
        self.metrics, self.normalize = metrics, normalize
        self.pending = collections.deque()
        self.draining = False
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="rmfast-forward")
        self._task = None

    def start(self):
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self):
        """Finish what is queued, then stop (the server has stopped taking requests)."""
        self.draining = True
        self._wake.set()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)

    def submit(self, groups):
        """Queue one request's units (a TokenizedGroups); returns the future of its rewards: one float32 array
        per unit, over its responses as computed."""
        if self.draining:
            raise QueueFull("the server is shutting down; send to another one", retry_after=5)
        if len(self.pending) >= self.max_queue:
            self.metrics.rejected.inc()
            raise QueueFull(f"{len(self.pending)} requests are waiting (--max-queue {self.max_queue}); retry later")
        loop = asyncio.get_running_loop()
        job = _Job(groups, int(groups.lengths("prefix_shared").sum()), loop.create_future(), loop.time())
        self.pending.append(job)
        self.metrics.queue_depth.set(len(self.pending))
        self._wake.set()
        return job.future

    def _take(self):
        """Jobs for the next batch: in arrival order up to the token budget (at least one), skipping those
        whose client went away."""
        jobs, tokens = [], 0
        while self.pending:
            job = self.pending[0]
            if job.future.cancelled():
                self.pending.popleft()
                self.metrics.cancelled.inc()
                continue
            if jobs and tokens + job.tokens > self.token_budget:
                break
            jobs.append(self.pending.popleft())
            tokens += job.tokens
        self.metrics.queue_depth.set(len(self.pending))
        return jobs

    async def _gather(self, loop):
        """Wait until the queue holds a budget's worth of tokens or the first job has waited max_wait_s."""
        deadline = self.pending[0].enqueued + self.max_wait_s
        while not self.draining and sum(j.tokens for j in self.pending) < self.token_budget:
            left = deadline - loop.time()
            if left <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), left)
            except asyncio.TimeoutError:
                return

    async def _run(self):
        loop = asyncio.get_running_loop()
        while True:
            while not self.pending:
                if self.draining:
                    return
                self._wake.clear()
                await self._wake.wait()
            await self._gather(loop)
            jobs = self._take()
            if not jobs:
                continue
            merged = TokenizedGroups.concat([j.groups for j in jobs])
            self.metrics.batch_requests.observe(len(jobs))
            try:
                rewards = await loop.run_in_executor(self._executor, self.forward, merged)
            except Exception as exc:  # noqa: BLE001 - answered to the requests of this batch, the server goes on
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(exc)
                continue
            at = 0
            for j in jobs:
                n = len(j.groups)
                if not j.future.done():
                    j.future.set_result(rewards[at:at + n])
                at += n

    def forward(self, groups):
        """Rewards of every unit of `groups` (one float32 array per unit: [K], or [K, 1 + A] with an attribute
        head's A attributes after each reward), in forwards of up to the token budget. Runs on the batcher's
        thread."""
        costs = groups.lengths("prefix_shared")
        out = [None] * len(groups)
        scorer = self.scorer
        for batch_indices in _token_batches(costs, max(self.token_budget, int(costs.max()))):
            t0 = time.perf_counter()
            batch = layouts.prefix_shared(groups, batch_indices, scorer.tokenizer.pad_token_id or 0,
                                          max_tokens=scorer.row_tokens)
            with torch.inference_mode():
                r, attributes = scorer._outputs(batch, batch.response_index)
            if self.normalize:
                r = scorer.normalize(r)
            values = r if attributes is None else np.column_stack([r, attributes])  # an attribute head's after
            sizes = [len(groups.responses[i]) for i in batch_indices]
            for i, part in zip(batch_indices, np.split(values, np.cumsum(sizes)[:-1])):
                out[i] = part
            self.metrics.forwards.inc()
            self.metrics.forward_seconds.observe(time.perf_counter() - t0)
            self.metrics.batch_tokens.observe(batch.tokens)
            self.metrics.tokens.inc(batch.tokens)
            self.metrics.positions.inc(batch.positions)
            self.metrics.rewards.inc(len(r))
        return out
