"""Rules JSON Schema cannot say (PROTOCOL.md §4 step 6): the gateway refuses a body that
breaks one with 422 ``schema_violation``; ``fedgate emit`` checks them before queueing."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .routes import Route
from .validate import SchemaError


def check_semantics(route: Route, body: Mapping[str, Any]) -> None:
    """Raise ``SchemaError`` (pointer, message) for the first rule ``body`` breaks."""
    # JSON Schema counts 1.0 as an integer; the wire protocol means a JSON integer.
    if type(body["timestamp"]) is not int:
        raise SchemaError("/timestamp", "timestamp must be an integer")
    if route.kind == "query" and "limit" in body and type(body["limit"]) is not int:
        raise SchemaError("/limit", "limit must be an integer")
    if route.kind == "telemetry":
        fingerprint = body["payload"]["attributes"].get("execution_fingerprint")
        if fingerprint is not None and fingerprint.lower() != body["execution_hash"].lower():
            raise SchemaError("/payload/attributes/execution_fingerprint",
                              "execution_fingerprint must equal execution_hash")
