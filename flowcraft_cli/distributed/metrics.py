"""Prometheus metrics of one worker (CONTRACT §10), served on 127.0.0.1:PORT ``/metrics``.

Imported only when a worker is started with ``--metrics-port``, so ``prometheus-client`` costs nothing
otherwise. Two hook points, no metric call inside the engine's logic:

- ``Engine.on_claim``: a step claimed a node attempt (started);
- ``Store.on_commit``: a transaction committed, with its run's events, each seen once however often the
  transaction was retried on a conflict: ``node_completed`` (completed, duration), ``attempt_failed``
  (failed, duration), ``attempt_lost`` (lost: written by the worker that recovered it), ``run_finished``
  (runs by final status).

Counters count what this worker did; sum them over the fleet. Batch items are not counted one by one (their
node is). Queue depth is read from Redis when Prometheus scrapes, not polled.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ..errors import OperationalError
from ..jobs import Job
from ..store import Txn

if TYPE_CHECKING:
    from .adapter import ArqAdapter

log = logging.getLogger("flowcraft.metrics")

# node attempts run from milliseconds to the job timeout (minutes)
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, float("inf"))
SCRAPE_READ_TIMEOUT_S = 2.0


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ["blueprint", "node"]
        r = self.registry
        self.started = Counter("flowcraft_steps_started", "Node attempts this worker started.", labels, registry=r)
        self.completed = Counter("flowcraft_steps_completed", "Node attempts that completed.", labels, registry=r)
        self.failed = Counter("flowcraft_steps_failed", "Node attempts that failed (errors, timeouts).", labels,
                              registry=r)
        self.lost = Counter("flowcraft_steps_lost", "Node attempts lost with their worker (recorded by the worker "
                            "that recovered them).", labels, registry=r)
        self.duration = Histogram("flowcraft_step_duration_seconds", "How long a node attempt ran, by outcome.",
                                  [*labels, "outcome"], buckets=DURATION_BUCKETS, registry=r)
        self.runs = Counter("flowcraft_runs_finished", "Runs this worker finished, by final status.",
                            ["blueprint", "status"], registry=r)

    def attach(self, adapter: ArqAdapter) -> None:
        adapter.engine.on_claim = self.on_claim
        adapter.store.on_commit = self.on_commit

    def on_claim(self, blueprint_id: str, job: Job) -> None:
        self.started.labels(blueprint_id, job.node_id).inc()

    def on_commit(self, txn: Txn) -> None:
        bp = txn.blueprint_id or ""
        for e in txn.events:
            kind = e.get("type")
            if kind == "run_finished":
                self.runs.labels(bp, str(e.get("status"))).inc()
                continue
            if "item" in e or kind not in ("node_completed", "attempt_failed", "attempt_lost"):
                continue
            node = str(e.get("node"))
            if kind == "attempt_lost":
                self.lost.labels(bp, node).inc()
                continue
            (self.completed if kind == "node_completed" else self.failed).labels(bp, node).inc()
            started, ended = e.get("started_at"), e.get("ts")
            if isinstance(started, int) and isinstance(ended, int):
                outcome = "completed" if kind == "node_completed" else "failed"
                self.duration.labels(bp, node, outcome).observe(max(0, ended - started) / 1000)

    def serve(self, adapter: ArqAdapter, port: int) -> None:
        """Serve ``/metrics`` on 127.0.0.1:``port`` from a thread; call from the worker's event loop."""
        self.registry.register(_QueueCollector(adapter, asyncio.get_running_loop()))
        try:
            start_http_server(port, addr="127.0.0.1", registry=self.registry)
        except OSError as e:
            raise OperationalError(f"--metrics-port {port}: cannot listen on 127.0.0.1:{port}: {e.strerror or e}") \
                from None


class _QueueCollector(Collector):
    """Queue depth and this worker's running steps, read when scraped (on the worker's event loop)."""

    def __init__(self, adapter: ArqAdapter, loop: asyncio.AbstractEventLoop) -> None:
        self.adapter = adapter
        self.loop = loop

    def collect(self) -> Iterator[Any]:
        running = GaugeMetricFamily("flowcraft_worker_steps_running", "Steps this worker is running now.")
        running.add_metric([], len(self.adapter.in_flight))
        yield running
        try:
            counts = asyncio.run_coroutine_threadsafe(self.adapter.queue.counts(), self.loop) \
                .result(SCRAPE_READ_TIMEOUT_S)
        except Exception as e:  # Redis away or the loop busy: the scrape still answers, without queue depth
            log.warning("metrics: could not read the queue (%s: %s)", type(e).__name__, e)
            return
        depth = GaugeMetricFamily("flowcraft_queue_jobs", "Jobs in the queue by state.", labels=["queue", "state"])
        for state in ("ready", "deferred", "in_progress"):
            depth.add_metric([counts.queue, state], getattr(counts, state))
        yield depth
        oldest = GaugeMetricFamily("flowcraft_queue_oldest_ready_age_seconds",
                                   "How long the oldest ready job has waited (0 when none waits).", labels=["queue"])
        oldest.add_metric([counts.queue], (counts.oldest_ready_age_ms or 0) / 1000)
        yield oldest
