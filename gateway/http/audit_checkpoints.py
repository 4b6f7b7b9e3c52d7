"""The gateway's signed audit checkpoints (docs/AUDIT.md *Checkpoints*): the
``Checkpointer`` built from ``[audit] checkpoint_*`` and each worker's timer.

Every worker ticks every ``checkpoint_every_s / 4`` seconds in the audit executor;
``Checkpointer.tick`` takes the file's flock and signs only when the head is unsigned
and the sidecar is ``checkpoint_every_s`` old, so N workers write one checkpoint per
period. The count trigger runs inside each append (audit/checkpoints.py).
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor

from audit.chain import AuditLog
from audit.checkpoints import Checkpointer
from gateway.config.settings import GatewaySettings, load_checkpoint_key

log = logging.getLogger("fedgate.audit")


def checkpointer(settings: GatewaySettings) -> Checkpointer | None:
    """The configured checkpointer; None (said once at info) without a checkpoint key."""
    cfg = settings.audit_checkpoints
    key = load_checkpoint_key(settings)
    if cfg is None or key is None:
        log.info("audit checkpoints off: no [audit] checkpoint_key configured")
        return None
    log.info("audit checkpoints every %d events or %g s, kid %s", cfg.every_events,
             cfg.every_s, cfg.kid)
    return Checkpointer(key, cfg.kid, every_events=cfg.every_events, every_s=cfg.every_s)


async def tick_forever(cp: Checkpointer, audit_log: AuditLog, executor: Executor) -> None:
    """The time trigger, until cancelled; a failed tick is logged and retried."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(cp.every_s / 4)
        try:
            await loop.run_in_executor(executor, cp.tick, audit_log)
        except Exception:
            log.exception("audit checkpoint failed; retrying at the next tick")
