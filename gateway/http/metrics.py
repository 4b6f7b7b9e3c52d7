"""Prometheus metrics through ``prometheus_client`` (exposition format 0.0.4).

Counters of requests by route, HTTP status (``code``) and error code; histograms of the
pipeline's and the store's latency; feedback records skipped; the connection guard's
gauges and early closes (gateway/http/conn.py); refused TLS handshakes by reason
(gateway/http/tlsaudit.py); ``fedgate_build_info``; ``process_*``.
No label ever carries tenant data, keys or pins.

**One view of every worker.** ``fedgate serve --workers N`` sets
``PROMETHEUS_MULTIPROC_DIR`` to a private directory before it spawns the workers
(gateway/http/workers.py): each worker records into its own files there, and any scrape — a
worker's ``/metrics`` on the mTLS listener or the admin listener's, in the supervisor —
sums all of them (counters and histograms over every worker, also one that has exited;
``fedgate_connections_open`` summed over the live workers, ``fedgate_connections_max``
the largest live cap). ``process_*`` carry a ``process`` label: ``main`` in one-process
mode; ``supervisor`` and ``worker-1``…``worker-N`` with workers.

``Metrics`` keeps the call sites of the hand-written version: ``count(route, status,
error)``, ``pipeline.observe(s)``, ``store.observe(s)``, ``records_skipped.update(...)``,
``connections_closed[reason] += 1``, ``connections_open = n``, ``connections_max = n``.
"""

from __future__ import annotations

import json
import os
from collections import Counter as _Tally
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.process_collector import ProcessCollector

prometheus_client.disable_created_metrics()  # no *_created series: not in the old exposition

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)  # events per audit write
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
PROCESSES_FILE = "processes.json"  # written by the supervisor: {"worker-1": pid, …}


class LabeledCounter:
    """A one-label counter that also reads like ``collections.Counter``:
    ``c[key] += n`` and ``c.update(mapping)`` increment; ``c[key]`` is this process's
    count."""

    def __init__(self, counter: Counter) -> None:
        self._counter, self._seen = counter, _Tally()

    def __getitem__(self, key: str) -> int:
        return self._seen[key]

    def __setitem__(self, key: str, value: int) -> None:
        delta = value - self._seen[key]
        if delta < 0:
            raise ValueError("a counter only goes up")
        self._seen[key] = value
        self._counter.labels(key).inc(delta)

    def update(self, counts: Mapping[str, int]) -> None:
        for key, n in counts.items():
            self[key] += n


class Metrics:
    """The gateway's metrics, made once per process (in ``make_app``)."""

    def __init__(self) -> None:
        self.multiproc_dir = os.environ.get(MULTIPROC_ENV) or None
        self.registry = CollectorRegistry(auto_describe=True)  # what this process records
        reg = self.registry
        self._requests = Counter("fedgate_requests", "Requests by route, status and error code.",
                                 ["route", "code", "error"], registry=reg)
        self._children: dict[tuple[str, int, str | None], Any] = {}
        self.pipeline = Histogram("fedgate_pipeline_seconds",
                                  "Time from body read to decision, per signed request.",
                                  buckets=BUCKETS, registry=reg)
        self.store = Histogram("fedgate_store_commit_seconds",
                               "Time of the atomic store commit (steps 12-14).",
                               buckets=BUCKETS, registry=reg)
        self.audit_batch = Histogram(  # group commit (audit/writer.py)
            "fedgate_audit_batch_events",
            "Audit events written per batch (one write and one fsync of the chain).",
            buckets=BATCH_BUCKETS, registry=reg)
        self.store_batch = Histogram(  # group commit (gateway/store/batcher.py)
            "fedgate_store_commit_batch_commits",
            "Requests' commits sent to the store together (one round trip / transaction).",
            buckets=BATCH_BUCKETS, registry=reg)
        self.records_skipped = LabeledCounter(Counter(  # by reason (gateway/feedback/evidence.py)
            "fedgate_feedback_records_skipped",
            "Stored records a feedback decision left out, by reason.", ["reason"],
            registry=reg))
        self.connections_closed = LabeledCounter(Counter(  # by reason (gateway/http/conn.py)
            "fedgate_connections_closed", "Connections closed early by the gateway, by reason.",
            ["reason"], registry=reg))
        self._batch_items = Counter(  # the batch route's items (gateway/http/batch.py)
            "fedgate_batch_items", "Items of batch requests by status and error code.",
            ["code", "error"], registry=reg)
        self.store_amnesia = Counter(  # docs/STORES.md "Store amnesia"
            "fedgate_store_amnesia", "New replay-store epochs seen begin: the store had lost "
            "its state (flushed, restarted empty) or was new.", registry=reg)
        self.tls_handshake_failures = LabeledCounter(Counter(  # by reason (tlsaudit.py)
            "fedgate_tls_handshake_failures", "TLS handshakes refused or abandoned, by reason.",
            ["reason"], registry=reg))
        self.reloads = LabeledCounter(Counter(  # SIGHUP, by result (gateway/http/reload.py)
            "fedgate_config_reloads", "SIGHUP reloads of keyring, identities, pins and "
            "operator map, by result (ok, error: the previous configuration stays).",
            ["result"], registry=reg))
        self._revoked = Gauge(  # the kill switch (gateway/http/killswitch.py)
            "fedgate_revoked_keys", "Revoked producer keys this gateway knows of (the "
            "smallest among the live workers).", registry=reg, multiprocess_mode="livemin")
        self.revoked_keys = self._revoked.set
        self._open = Gauge("fedgate_connections_open", "Connections open in all workers.",
                           registry=reg, multiprocess_mode="livesum")
        self._max = Gauge("fedgate_connections_max", "The per-worker connection cap in force.",
                          registry=reg, multiprocess_mode="livemax")
        self._values = {"open": 0, "max": 0}
        self.exposition = (exposition(self.multiproc_dir) if self.multiproc_dir
                           else exposition(None, own=reg))

    def count(self, route: str, status: int, error: str | None) -> None:
        key = (route, status, error)  # a handful of combinations: labels() looked up once
        if (child := self._children.get(key)) is None:
            child = self._children[key] = self._requests.labels(route, str(status), error or "")
        child.inc()

    def batch_items(self, status: int, error: str | None) -> None:
        self._batch_items.labels(str(status), error or "").inc()

    @property
    def connections_open(self) -> int:
        return self._values["open"]

    @connections_open.setter
    def connections_open(self, n: int) -> None:
        if n != self._values["open"]:  # a multiprocess gauge's set is an mmap write
            self._values["open"] = n
            self._open.set(n)

    @property
    def connections_max(self) -> int:
        return self._values["max"]

    @connections_max.setter
    def connections_max(self, n: int) -> None:
        self._values["max"] = n
        self._max.set(n)

    def render(self) -> bytes:
        return generate_latest(self.exposition)


def exposition(multiproc_dir: str | Path | None, *, own: CollectorRegistry | None = None,
               processes: Callable[[], Mapping[str, int]] | None = None) -> CollectorRegistry:
    """What a scrape shows: every worker's files in ``multiproc_dir`` (or the ``own``
    registry of a single process), build info and ``process_*``."""
    registry = CollectorRegistry()
    if multiproc_dir is not None:
        MultiProcessCollector(registry, path=str(multiproc_dir))
        processes = processes or _processes_file(Path(multiproc_dir) / PROCESSES_FILE)
    else:
        if own is not None:
            registry.register(_Forward(own))
        processes = processes or (lambda: {"main": os.getpid()})
    registry.register(BuildInfo())
    registry.register(ProcessMetrics(processes))
    return registry


class _Forward:
    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self):
        return self._registry.collect()


class BuildInfo:
    def __init__(self) -> None:
        from common.version import package_version  # the same lookup as `fedgate --version`

        self.version = package_version()

    def collect(self):
        info = GaugeMetricFamily("fedgate_build_info", "The running fedgate version.",
                                 labels=["version"])
        info.add_metric([self.version], 1)
        yield info


def _processes_file(path: Path) -> Callable[[], Mapping[str, int]]:
    def read() -> Mapping[str, int]:
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}  # the supervisor has not written it yet
    return read


class ProcessMetrics:
    """``process_*`` (prometheus_client's ProcessCollector, Linux /proc) of each named
    process, labelled ``process``; a process that is gone is left out."""

    def __init__(self, processes: Callable[[], Mapping[str, int]]) -> None:
        self.processes = processes
        self._collectors: dict[int, ProcessCollector] = {}

    def collect(self):
        families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}
        for name, pid in sorted(self.processes().items()):
            collector = self._collectors.get(pid)
            if collector is None:
                collector = self._collectors[pid] = ProcessCollector(
                    pid=lambda pid=pid: pid, registry=None)
            for fam in collector.collect():
                kind = CounterMetricFamily if fam.type == "counter" else GaugeMetricFamily
                out = families.setdefault(fam.name, kind(fam.name, fam.documentation,
                                                         labels=["process"]))
                for sample in fam.samples:
                    out.add_metric([name], sample.value)
        yield from families.values()
