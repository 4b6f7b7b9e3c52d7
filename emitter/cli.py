"""``fedgate emit``, ``fedgate outbox`` and ``fedgate feedback`` (PROTOCOL.md §8,
docs/EMITTER.md "CLI").

``add_commands`` registers them on the ``fedgate`` parser; ``main`` is a stand-alone
entry point with the same commands. Exit codes: 0 success (every item accepted, already
delivered or queued; feedback verified), 1 a rejection (or a feedback §6 rejection),
2 a configuration or input error (an invalid item: nothing sent), 130 interrupted
(Ctrl-C: the rest stays queued) — always with one line on stderr saying why.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import re
import sqlite3
import sys
from pathlib import Path
from typing import BinaryIO, TextIO

from common.tomlfile import ConfigError
from schemas.routes import GRAPH, TELEMETRY

from .client import EmitterClient, QueryError
from .outbox import FINAL_STATES, Outbox
from .sending import (
    EXIT_INTERRUPTED,
    Interrupt,
    describe,
    prune_retained,
    send_pending,
    stage_input,
    summary,
)
from .settings import load_emitter_settings
from .verify import SKIP_UNKNOWN_EXECUTION, FeedbackRejected

__all__ = ["add_commands", "describe", "main"]


def add_commands(sub: argparse._SubParsersAction) -> None:
    emit = sub.add_parser(
        "emit", help="sign and send telemetry (or execution graphs) to the gateway",
        description="Read the input (a JSON array of objects, or JSON lines / one object), "
        "streamed; check every item against the schema and max_body_bytes BEFORE anything "
        "is sent (an invalid item: all of them named, nothing sent, exit 2); queue the "
        "whole input in the on-disk outbox (bodies already there are not queued again), "
        "then send every queued item, oldest first. One line per item: 'accepted "
        "<request_id> finding <finding_id>', 'delivered (duplicate of <id>)', 'queued "
        "(<why>; will retry)', 'rejected <status> <code> [at <pointer>]: <message>' or "
        "'refused <code> (...)'; 'fedgate: sent N of M' on stderr. Ctrl-C stops after the "
        "current item, the rest stays queued. Exit 0 when all were accepted or queued, 1 "
        "on any rejection, 2 on a config or input error, 130 when interrupted.")
    emit.add_argument("--config", required=True, type=Path, help="emitter TOML file")
    emit.add_argument("--graph", action="store_true",
                      help="the bodies are execution graphs, not telemetry")
    emit.add_argument("--skip-invalid", action="store_true",
                      help="send the valid items even if some are invalid (they are named "
                      "on stderr, and the exit code is 1)")
    emit.add_argument("--batch", type=_batch_size, default=DEFAULT_BATCH, metavar="N",
                      help=BATCH_HELP)
    emit.add_argument("file", nargs="?", default="-",
                      help="JSON input file, or - for stdin (default)")
    emit.set_defaults(run=cmd_emit)

    ob_parser = sub.add_parser(
        "outbox", help="the emitter's on-disk outbox: status, flush, prune",
        description="Inspect, send or shrink <state_dir>/outbox.db.")
    ob = ob_parser.add_subparsers(metavar="ACTION")
    status = ob.add_parser("status", help="rows and body bytes by state",
                           description="One line per state: rows and body bytes; the file "
                           "size; the oldest pending row. Exit 0.")
    status.add_argument("--config", required=True, type=Path, help="emitter TOML file")
    status.set_defaults(run=cmd_outbox_status)
    flush = ob.add_parser("flush", help="send what is queued",
                          description="Send every pending row, oldest first, as emit does "
                          "(same lines, same exit codes).")
    flush.add_argument("--config", required=True, type=Path, help="emitter TOML file")
    flush.add_argument("--batch", type=_batch_size, default=DEFAULT_BATCH, metavar="N",
                       help=BATCH_HELP)
    flush.set_defaults(run=cmd_outbox_flush)
    prune = ob.add_parser("prune", help="drop rejected/expired rows (and old delivered "
                          "ones); shrink the file",
                          description="Drop every rejected and expired row and, with "
                          "--older-than, delivered rows last changed longer ago than that; "
                          "then VACUUM. Pending rows are never dropped.")
    prune.add_argument("--config", required=True, type=Path, help="emitter TOML file")
    prune.add_argument("--older-than", type=_duration, metavar="AGE",
                       help="also drop delivered rows older than AGE (e.g. 3600, 90m, "
                       "12h, 7d)")
    prune.set_defaults(run=cmd_outbox_prune)

    def missing(args: argparse.Namespace) -> int:
        ob_parser.error(f"missing action (one of: {', '.join(ob.choices)})")
        return 2  # pragma: no cover - parser.error exits

    ob_parser.set_defaults(run=missing)

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


DEFAULT_BATCH = 100
BATCH_HELP = (f"send up to N telemetry items per batch request (default {DEFAULT_BATCH}; "
              "1: one request per item); a gateway without the batch route (404) gets "
              "single requests")


def _batch_size(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= 1000:
        raise argparse.ArgumentTypeError(f"must be an integer in [1, 1000], got {text!r}")
    return n


def _duration(text: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd]?)", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 3600, 90m, 7d)")
    return float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match[2]]


def _fail(message: str, code: int) -> int:
    print(_line(f"fedgate: error: {message}"), file=sys.stderr)
    return code


# -- emit and outbox flush ----------------------------------------------------------------

def _run(args: argparse.Namespace, work) -> int:
    """Load the settings, run ``work(client, interrupt)`` in an event loop; config and
    state-file errors are one line."""
    try:
        settings = load_emitter_settings(args.config)
    except ConfigError as exc:
        return _fail(exc, 2)
    interrupt = Interrupt().install()

    async def go() -> int:
        async with EmitterClient(settings) as client:
            prune_retained(client)
            return await work(client, interrupt)
    try:
        return asyncio.run(go())
    except ConfigError as exc:  # keys and TLS files are loaded by the client
        return _fail(f"{settings.path}: {exc}", 2)
    except (OSError, sqlite3.Error) as exc:  # the state files: disk full, permissions
        return _fail(f"state_dir {settings.state_dir}: {exc}", 1)
    finally:
        interrupt.restore()


def _stdin() -> BinaryIO:
    raw = getattr(sys.stdin, "buffer", None)  # a replaced sys.stdin may be text only
    return raw if raw is not None else io.BytesIO(sys.stdin.read().encode("utf-8"))


def cmd_emit(args: argparse.Namespace) -> int:
    route = GRAPH if args.graph else TELEMETRY
    try:
        stream = _stdin() if args.file == "-" else open(args.file, "rb")  # noqa: SIM115
    except OSError as exc:
        return _fail(f"input {args.file}: {exc.strerror or exc}", 2)

    async def work(client: EmitterClient, interrupt: Interrupt) -> int:
        with stream:
            staged = stage_input(client, stream, route, skip_invalid=args.skip_invalid,
                                 interrupt=interrupt, err=sys.stderr)
        return await _after_staging(client, interrupt, staged, args.file, args.skip_invalid,
                                    args.batch)
    return _run(args, work)


async def _after_staging(client: EmitterClient, interrupt: Interrupt, staged,
                         name: str, args_skip: bool, batch: int = 1) -> int:
    err = sys.stderr
    if staged.interrupted:
        return _fail("interrupted while reading the input: nothing queued, nothing sent",
                     EXIT_INTERRUPTED)
    more = staged.invalid_count - len(staged.invalid)
    if more > 0:
        print(f"fedgate: emit: ... and {more} more invalid item(s)", file=err)
    if staged.error:
        return _fail(f"input {name}: {staged.error}; nothing sent", 2)
    if staged.invalid_count and not args_skip:
        return _fail(f"{staged.invalid_count} of {staged.items} item(s) invalid; nothing "
                     "sent (fix them, or --skip-invalid to send the valid ones)", 2)
    if staged.invalid_count:
        print(f"fedgate: emit: skipped {staged.invalid_count} invalid item(s) of "
              f"{staged.items} (--skip-invalid)", file=err)
    if staged.known:
        print(f"fedgate: emit: {staged.known} item(s) already in the outbox (queued or "
              "delivered earlier): not queued again", file=err)
    pending = client.outbox.count_pending()
    if pending == 0:
        why = "empty input" if staged.items == 0 else "every valid item already delivered"
        print(f"fedgate: emit: nothing to send ({why})", file=err)
        return 1 if staged.invalid_count else 0
    code = await _send(client, interrupt, batch)
    return code if code != 0 or not staged.invalid_count else 1


async def _send(client: EmitterClient, interrupt: Interrupt, batch: int = 1) -> int:
    sent = await send_pending(client, interrupt, sys.stdout, sys.stderr, batch=batch)
    print(summary(sent, client.outbox.count_pending()), file=sys.stderr)
    if sent.interrupted:
        return EXIT_INTERRUPTED
    return 1 if sent.failed else 0


def cmd_outbox_flush(args: argparse.Namespace) -> int:
    return _run(args, lambda client, interrupt: _send(client, interrupt, args.batch))


def _open_outbox(args: argparse.Namespace) -> Outbox:
    settings = load_emitter_settings(args.config)
    return Outbox(settings.state_dir / "outbox.db")


def cmd_outbox_status(args: argparse.Namespace) -> int:
    try:
        outbox = _open_outbox(args)
    except ConfigError as exc:
        return _fail(exc, 2)
    try:
        for state, (rows, size) in outbox.status().items():
            print(f"{state} {rows} row(s) {size} bytes")
        print(f"file {outbox.path} {outbox.file_bytes()} bytes")
        oldest = outbox.oldest_pending()
        if oldest is not None:
            print(_line(f"oldest pending #{oldest.id} created_at {oldest.created_at:.0f} "
                        f"attempts {oldest.attempts} last_error {oldest.last_error or '-'}"))
    finally:
        outbox.close()
    return 0


def cmd_outbox_prune(args: argparse.Namespace) -> int:
    try:
        outbox = _open_outbox(args)
    except ConfigError as exc:
        return _fail(exc, 2)
    try:
        before = outbox.file_bytes()
        staged = outbox.discard_batch()
        dropped = outbox.prune(states=("rejected", "expired"))
        if args.older_than is not None:
            dropped += outbox.prune(states=FINAL_STATES, older_than=args.older_than)
        print(f"pruned {dropped + staged} row(s); {outbox.path} {before} -> "
              f"{outbox.file_bytes()} bytes")
    finally:
        outbox.close()
    return 0


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
