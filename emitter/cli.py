"""``fedgate emit`` and ``fedgate feedback`` (PROTOCOL.md §8, docs/EMITTER.md).

``add_commands`` registers both on the ``fedgate`` parser; ``main`` is a stand-alone
entry point with the same commands. Exit codes: 0 success (every item accepted, already
delivered or queued; feedback verified), 1 a rejection (or a feedback §6 rejection),
2 a configuration or input error — always with one line on stderr saying why.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sqlite3
import sys
from pathlib import Path
from typing import Any, TextIO

from gateway.config import ConfigError
from schemas.canonical import dumps

from .client import DeliveryResult, EmitterClient, QueryError
from .settings import load_emitter_settings
from .verify import SKIP_UNKNOWN_EXECUTION, FeedbackRejected

PROGRESS_EVERY = 100


def add_commands(sub: argparse._SubParsersAction) -> None:
    emit = sub.add_parser(
        "emit", help="sign and send telemetry (or execution graphs) to the gateway",
        description="Sign each body, keep it in the on-disk outbox, deliver it over mTLS. "
        "Input: one JSON object, a JSON array of objects, or JSON lines. Pending outbox "
        "items from earlier runs are retried first. Prints one line per item: "
        "'accepted <request_id> finding <finding_id>', 'delivered (duplicate of <id>)', "
        "'queued (gateway unavailable; will retry)', 'rejected <status> <code>' or "
        "'refused <code> (...)'. Exit 0 when all were accepted or queued, 1 on any "
        "rejection, 2 on a config or input error.")
    emit.add_argument("--config", required=True, type=Path, help="emitter TOML file")
    emit.add_argument("--graph", action="store_true",
                      help="the bodies are execution graphs, not telemetry")
    emit.add_argument("file", nargs="?", default="-",
                      help="JSON input file, or - for stdin (default)")
    emit.set_defaults(run=cmd_emit)

    fb = sub.add_parser(
        "feedback", help="query, verify (§6) and apply policy feedback",
        description="Send a signed feedback query, verify the signed answer (PROTOCOL.md "
        "§6) and apply new adjustments once; prints them as JSON lines. Exit 0 when the "
        "answer verified (even with no new adjustment), 1 when it was rejected (stderr "
        "names the §6 code) or the query failed, 2 on a config error.")
    fb.add_argument("--config", required=True, type=Path, help="emitter TOML file")
    fb.add_argument("--tenant", required=True, help="tenant id to ask for")
    fb.add_argument("--operator", required=True, help="operator id of the query")
    fb.add_argument("--limit", type=int, default=100, help="1-1000 (default 100)")
    fb.set_defaults(run=cmd_feedback)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedgate", description="SpectraStrike emitter.")
    add_commands(parser.add_subparsers(title="commands", metavar="COMMAND"))
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return int(exc.code or 0)
    if not hasattr(args, "run"):
        parser.print_help(sys.stderr)
        return 2
    return args.run(args)


def _line(message: object) -> str:
    return " ".join(str(message).split())[:1000]


def _fail(message: str, code: int) -> int:
    print(_line(f"fedgate: error: {message}"), file=sys.stderr)
    return code


# -- emit ------------------------------------------------------------------------------

def cmd_emit(args: argparse.Namespace) -> int:
    try:
        settings = load_emitter_settings(args.config)
    except ConfigError as exc:
        return _fail(exc, 2)
    try:
        bodies = read_bodies(_read_input(args.file))
    except (ValueError, OSError) as exc:
        return _fail(f"input {args.file}: {exc}", 2)
    try:
        return asyncio.run(_emit(settings, bodies, args.graph, sys.stdout, sys.stderr))
    except ConfigError as exc:  # keys and TLS files are loaded by the client
        return _fail(f"{settings.path}: {exc}", 2)
    except (OSError, sqlite3.Error) as exc:  # the state files: disk full, permissions
        return _fail(f"state_dir {settings.state_dir}: {exc}", 1)


def _read_input(name: str) -> str:
    if name == "-":
        return sys.stdin.read()
    return Path(name).read_text(encoding="utf-8")


class _NotFinite:
    """Stands in, while parsing, for a number JSON cannot carry (NaN, Infinity, 1e400)."""

    def __init__(self, text: str) -> None:
        self.text = text


def _float(text: str) -> Any:
    value = float(text)
    return value if math.isfinite(value) else _NotFinite(text)


def _loads(text: str) -> Any:
    return json.loads(text, parse_float=_float, parse_constant=_NotFinite)


def read_bodies(text: str) -> list[dict[str, Any]]:
    """A JSON object, a JSON array of objects, or JSON lines (one object per line).

    The whole input is parsed and every body checked before anything is sent: ValueError
    names the first bad item (``item N`` / ``line N``); nothing is sent then."""
    try:
        doc = _loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except ValueError:
        items = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                items.append((f"line {n}", _loads(line)))
            except RecursionError:
                raise ValueError(f"line {n}: nested too deeply") from None
            except ValueError as exc:
                raise ValueError(f"line {n}: not JSON ({exc})") from None
        return _checked(items)
    docs = doc if isinstance(doc, list) else [doc]
    return _checked([(f"item {n}", item) for n, item in enumerate(docs, 1)])


def _checked(items: list[tuple[str, Any]]) -> list[dict[str, Any]]:
    """Each item an object holding only finite numbers, with a canonical form (§3)."""
    for where, item in items:
        if not isinstance(item, dict):
            raise ValueError(f"{where}: not a JSON object")
        bad = _not_finite(item)
        if bad is not None:
            raise ValueError(f"{where}: {bad} is not a finite number")
        try:
            dumps(item)
        except (ValueError, TypeError, RecursionError) as exc:
            raise ValueError(f"{where}: cannot be signed ({type(exc).__name__})") from None
    return [item for _, item in items]


def _not_finite(value: Any) -> str | None:
    stack = [value]
    while stack:
        current = stack.pop()
        if isinstance(current, _NotFinite):
            return current.text
        if isinstance(current, dict):
            stack.extend(current.values())
        elif isinstance(current, list):
            stack.extend(current)
    return None


def describe(result: DeliveryResult) -> str:
    """The one output line for an item."""
    if result.outcome == "accepted":
        line = f"accepted {result.request_id}"
        line += f" finding {result.finding_id}" if result.finding_id else ""
        return line + (" (possible duplicate: re-signed after a lost answer)"
                       if result.possible_duplicate else "")
    if result.outcome == "duplicate":
        return f"delivered (duplicate of {result.duplicate_of})"
    if result.outcome == "queued":
        return "queued (gateway unavailable; will retry)"
    if result.outcome == "refused":
        return f"refused {result.error} (not sent; kept in the outbox)"
    return f"rejected {result.status or '-'} {result.error}"


async def _emit(settings, bodies: list[dict[str, Any]], graph: bool, out: TextIO,
                err: TextIO) -> int:
    failed = False
    async with EmitterClient(settings) as client:
        earlier = await client.flush()
        if earlier:
            delivered = sum(r.delivered for r in earlier)
            print(f"fedgate: outbox: {delivered} of {len(earlier)} earlier item(s) "
                  "delivered", file=err)
            failed = any(r.outcome in ("rejected", "refused") for r in earlier)
        send = client.send_graph if graph else client.send_telemetry
        for n, body in enumerate(bodies, 1):
            result = await send(body)
            print(describe(result), file=out, flush=True)
            failed |= result.outcome in ("rejected", "refused")
            if n % PROGRESS_EVERY == 0 or (n == len(bodies) and n >= PROGRESS_EVERY):
                print(f"fedgate: emit: {n}/{len(bodies)}", file=err, flush=True)
    return 1 if failed else 0


# -- feedback --------------------------------------------------------------------------

def cmd_feedback(args: argparse.Namespace) -> int:
    if not 1 <= args.limit <= 1000:
        return _fail("--limit must be in [1, 1000]", 2)
    try:
        settings = load_emitter_settings(args.config)
    except ConfigError as exc:
        return _fail(exc, 2)
    try:
        return asyncio.run(_feedback(settings, args, sys.stdout, sys.stderr))
    except ConfigError as exc:
        return _fail(f"{settings.path}: {exc}", 2)
    except (OSError, sqlite3.Error) as exc:
        return _fail(f"state_dir {settings.state_dir}: {exc}", 1)


async def _feedback(settings, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    async with EmitterClient(settings) as client:
        try:
            applied = await client.query_feedback(args.tenant, args.operator, args.limit)
        except FeedbackRejected as exc:
            print(_line(f"fedgate: feedback rejected: {exc.code}: {exc.detail}"), file=err)
            return 1
        except QueryError as exc:  # its detail may come from the network: one line
            print(_line(f"fedgate: feedback query failed: {exc}"), file=err)
            return 1
        for adjustment in applied:
            print(json.dumps(adjustment, sort_keys=True), file=out)
        verified = client.last_feedback
        for fp in verified.skipped_executions:  # §6 step 8 [v1.1]: reported, not applied
            print(_line(f"fedgate: feedback: skipped adjustment for execution {fp}: "
                        f"{SKIP_UNKNOWN_EXECUTION} (this emitter never sent it)"), file=err)
        total = len(verified.adjustments) + len(verified.skipped)
        print(f"fedgate: feedback verified (kid {verified.kid}, {total} adjustment(s), "
              f"{len(applied)} new, {len(verified.skipped)} skipped)", file=err)
    return 0
