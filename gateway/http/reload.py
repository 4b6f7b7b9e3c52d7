"""``SIGHUP``: re-read the producer keyring, the identities (their pins and tenants) and
the operator map from the files, without dropping a connection (PROTOCOL.md §8 v1.1).

The new files are read and checked exactly as at start-up (``load_settings``,
``load_producer_keyring``); if anything is wrong the old configuration stays and one
error line says why. Otherwise the pipeline's ``Trust`` is swapped in one assignment
(gateway/pipeline/trust.py) and one line says what is in force. Everything else is read
at start-up only (ports, TLS files, the store, the audit log, the feedback key, policy
rules, the other security members): a change there is named in the line and needs a
restart. ``fedgate_config_reloads_total{result}`` counts reloads. With ``--workers N``
the supervisor forwards the signal to every worker (gateway/http/workers.py); each worker
reloads and logs for itself.
"""

from __future__ import annotations

import dataclasses
import signal
from collections.abc import Callable
from typing import Any

from aiohttp import web

from common.tomlfile import ConfigError
from gateway import logs
from gateway.config.settings import GatewaySettings, load_producer_keyring, load_settings

from .appkeys import METRICS, PIPELINE, SETTINGS

log = logs.get_logger("fedgate.reload")
RELOADED = ("identities", "operator_tenants")  # of the security members
_FILE_ONLY = ("path", "security", "producer_keyring")  # compared elsewhere or reloaded


def reload_trust(app: web.Application) -> bool:
    """One reload; True when the new files are in force."""
    started = app[SETTINGS]
    pipeline = app[PIPELINE]
    try:
        new = load_settings(started.path)
        keyring = load_producer_keyring(new)
    except (ConfigError, OSError, ValueError) as exc:
        app[METRICS].reloads["error"] += 1
        log.error(f"reload failed, the previous configuration stays in force: {exc}")
        return False
    current = pipeline.trust.config
    changed = {f.name: getattr(new.security, f.name) for f in dataclasses.fields(current)
               if f.init and f.name in RELOADED}
    pipeline.reload(dataclasses.replace(current, **changed), keyring)
    app[METRICS].reloads["ok"] += 1
    ignored = not_reloaded(started, new)
    log.info("reloaded producer_keyring, identities, pins and operator_tenants",
             keys=len(keyring), identities=len(new.security.identities),
             operators=len(new.security.operator_tenants),
             **({"not_reloaded_restart_to_apply": ",".join(ignored)} if ignored else {}))
    return True


def not_reloaded(old: GatewaySettings, new: GatewaySettings) -> list[str]:
    """The settings that differ but are read at start-up only."""
    out = [f"security.{f.name}" for f in dataclasses.fields(old.security)
           if f.init and f.name not in RELOADED
           and getattr(old.security, f.name) != getattr(new.security, f.name)]
    for f in dataclasses.fields(old):
        if f.name in _FILE_ONLY:
            continue
        a, b = getattr(old, f.name), getattr(new, f.name)
        if a == b:
            continue
        if dataclasses.is_dataclass(a) and dataclasses.is_dataclass(b):
            out += [f"{f.name}.{g.name}" for g in dataclasses.fields(a)
                    if getattr(a, g.name) != getattr(b, g.name)]
        else:
            out.append(f.name)
    return out


class SighupLatch:
    """Installed first thing in a process: a SIGHUP before the gateway is up is remembered
    (not fatal, as the default action would be) and acted on once ``attach``\\ed."""

    def __init__(self) -> None:
        self.pending = False
        signal.signal(signal.SIGHUP, self._note)

    def _note(self, *_: Any) -> None:
        self.pending = True

    def attach(self, loop, action: Callable[[], Any]) -> None:
        loop.add_signal_handler(signal.SIGHUP, action)
        if self.pending:
            self.pending = False
            action()
