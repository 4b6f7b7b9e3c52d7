"""The gateway application's typed keys (aiohttp ``web.AppKey``): every resource made once
at start-up (gateway/http/app.py ``resources``) and reached through one of these, plus the
router's own refusal codes. A module of names only, so app, auditing and probes share them
without importing each other in a circle."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from audit import AuditSink
from audit.writer import GroupWriter
from gateway import logs
from gateway.config.settings import GatewaySettings
from gateway.feedback.issuer import FeedbackIssuer
from gateway.pipeline.pipeline import Pipeline
from gateway.store import Store

from .metrics import Metrics
from .outbox import OutboxAcks
from .tlsaudit import HandshakeAudit

SETTINGS = web.AppKey("settings", GatewaySettings)
KEYS = web.AppKey("keys", tuple)  # (Keyring, PrivateKey)
STORE = web.AppKey("store", Store)
PIPELINE = web.AppKey("pipeline", Pipeline)
AUDIT = web.AppKey("audit", AuditSink)
AUDIT_EXECUTOR = web.AppKey("audit_executor", ThreadPoolExecutor)
AUDIT_WRITER = web.AppKey("audit_writer", GroupWriter)  # group commit of the chain
OUTBOX_ACKS = web.AppKey("outbox_acks", OutboxAcks)  # chained outbox entries to delete
WORKER = web.AppKey("worker", tuple)  # (this worker's index, the worker count)
OWNER = web.AppKey("owner", str)  # the audit outbox owner: <node_name>/<worker index>
ISSUER = web.AppKey("issuer", FeedbackIssuer)
METRICS = web.AppKey("metrics", Metrics)
CLOCK = web.AppKey("clock", object)
READY = web.AppKey("ready", dict)
ECHO = web.AppKey("echo", bool)
STORE_FAILURES = web.AppKey("store_failures", logs.Throttle)
AUDIT_REFUSALS = web.AppKey("audit_refusals", logs.Throttle)
HANDSHAKES = web.AppKey("handshakes", HandshakeAudit)  # refused TLS handshakes
DECISIONS = web.AppKey("decisions", set)  # signed requests being handled (tasks)
DRAINING = web.AppKey("draining", bool)  # stopping: answers close their connection

REQUEST_ID = web.RequestKey("request_id", str)
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
ROUTER_CODES = {404: "not_found", 405: "method_not_allowed"}
OTHER_HTTP_CODE = "bad_request"  # any other HTTP refusal raised below the middleware
