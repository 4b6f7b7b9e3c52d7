"""Prometheus text exposition (version 0.0.4) without a client library.

Counters of requests by route, status and error code; histograms of the pipeline's and
the store's latency; the connection guard's gauges and early closes (gateway/conn.py); refused TLS
handshakes by reason (gateway/tlsaudit.py).
Per process: with ``--workers N`` each worker exposes its own.
No label ever carries tenant data, keys or pins.
"""

from __future__ import annotations

import bisect
from collections import Counter

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Histogram:
    def __init__(self, name: str, help_text: str) -> None:
        self.name, self.help = name, help_text
        self.counts = [0] * (len(BUCKETS) + 1)
        self.total = 0.0
        self.n = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds
        self.n += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        running = 0
        for bound, count in zip(BUCKETS, self.counts, strict=False):
            running += count
            lines.append(f'{self.name}_bucket{{le="{bound}"}} {running}')
        lines.append(f'{self.name}_bucket{{le="+Inf"}} {self.n}')
        lines += [f"{self.name}_sum {self.total:.6f}", f"{self.name}_count {self.n}"]
        return lines


class Metrics:
    def __init__(self) -> None:
        self.requests: Counter[tuple[str, int, str]] = Counter()
        self.pipeline = Histogram("fedgate_pipeline_seconds",
                                  "Time from body read to decision, per signed request.")
        self.store = Histogram("fedgate_store_commit_seconds",
                               "Time of the atomic store commit (steps 12-14).")
        self.records_skipped: Counter[str] = Counter()  # by reason (gateway/evidence.py)
        self.connections_closed: Counter[str] = Counter()  # reason -> n (gateway/conn.py)
        self.connections_open = 0
        self.connections_max = 0
        self.tls_handshake_failures: Counter[str] = Counter()  # reason -> n (gateway/tlsaudit.py)

    def count(self, route: str, status: int, error: str | None) -> None:
        self.requests[(route, status, error or "")] += 1

    def render(self) -> str:
        lines = ["# HELP fedgate_requests_total Requests by route, status and error code.",
                 "# TYPE fedgate_requests_total counter"]
        for (route, status, error), n in sorted(self.requests.items()):
            lines.append(
                f'fedgate_requests_total{{route="{route}",status="{status}",error="{error}"}} {n}')
        lines += ["# HELP fedgate_feedback_records_skipped_total Stored records a feedback "
                  "decision left out, by reason.",
                  "# TYPE fedgate_feedback_records_skipped_total counter"]
        for reason, n in sorted(self.records_skipped.items()):
            lines.append(f'fedgate_feedback_records_skipped_total{{reason="{reason}"}} {n}')
        lines += self.pipeline.render() + self.store.render()
        lines += ["# HELP fedgate_connections_closed_total Connections closed early by the "
                  "gateway, by reason.", "# TYPE fedgate_connections_closed_total counter"]
        lines += [f'fedgate_connections_closed_total{{reason="{reason}"}} {n}'
                  for reason, n in sorted(self.connections_closed.items())]
        lines += ["# HELP fedgate_connections_open Connections open in this worker.",
                  "# TYPE fedgate_connections_open gauge",
                  f"fedgate_connections_open {self.connections_open}",
                  "# HELP fedgate_connections_max The per-worker connection cap in force.",
                  "# TYPE fedgate_connections_max gauge",
                  f"fedgate_connections_max {self.connections_max}"]
        lines += ["# HELP fedgate_tls_handshake_failures_total TLS handshakes refused or "
                  "abandoned, by reason.", "# TYPE fedgate_tls_handshake_failures_total counter"]
        lines += [f'fedgate_tls_handshake_failures_total{{reason="{reason}"}} {n}'
                  for reason, n in sorted(self.tls_handshake_failures.items())]
        return "\n".join(lines) + "\n"
