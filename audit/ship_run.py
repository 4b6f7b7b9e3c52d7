"""``fedgate audit ship``: the shipper as its own long-running process (docs/AUDIT.md).

SIGTERM / SIGINT stop it between rounds (the state file always names a delivered line).
Every ``progress_s`` seconds, when something changed, one line on stderr::

    fedgate: audit ship: shipped_total=1200 lag_events=0 sequence=1200 failures=3

and, when ``metrics_path`` is configured, the two Prometheus metrics
(``fedgate_audit_shipped_total``, ``fedgate_audit_shipper_lag_events``) in that file, for
node_exporter's textfile collector (replaced atomically).
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from audit.ship_position import ShipError
from audit.shipper import Shipper

__all__ = ["run_shipper"]


def _say(msg: str) -> None:
    print(f"fedgate: audit ship: {msg}", file=sys.stderr, flush=True)


def run_shipper(audit_path: Path, cfg: Any, *, once: bool = False,
                progress_s: float = 10.0) -> int:
    """0 when stopped (or, with ``once``, caught up); 1 when shipping cannot continue."""
    try:
        shipper = Shipper(audit_path, cfg, log=_say)
    except ShipError as exc:
        _say(f"error: {exc}")
        return 1
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    last: dict[str, Any] = {"at": 0.0, "line": None}

    def progress(s: Shipper, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - last["at"] < progress_s:
            return
        line = (f"shipped_total={s.shipped_total} lag_events={s.lag_events} "
                f"sequence={s.state.sequence} failures={s.failures}")
        if cfg.metrics_path is not None:
            s.write_metrics(Path(cfg.metrics_path))
        if line != last["line"] or force:
            _say(line)
        last.update(at=now, line=line)

    _say(f"{audit_path} -> {cfg.transport}://{cfg.host}:{cfg.port} from sequence "
         f"{shipper.state.sequence + 1}")
    try:
        shipper.run(stop, once=once, progress=progress)
        progress(shipper, force=True)
        return 0
    except ShipError as exc:
        _say(f"error: {exc}")
        return 1
    finally:
        shipper.close()
