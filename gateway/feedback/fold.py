"""Per-execution facts kept up to date at commit time (docs/POLICY.md *Facts*).

A feedback query must not re-read history. So every stored finding or graph is folded,
in the same atomic step that stores it, into one small JSON object per
``(tenant, identity, execution_fingerprint, attestation hash)``: the **facts state**.
A query then reads one state per execution (:func:`facts_from_states`), never a record
body. The fold is a short list of operations (:data:`Op`) that both stores apply the
same way — SQLite in Python inside the commit's transaction (:func:`apply`), Redis in
the commit script (``redis_scripts.FOLD_LUA``) — so the two cannot drift.

The state holds exactly what :func:`gateway.feedback.facts.facts_from_records` derives
from the records, for every record of the execution made under that hash:

====================  ===============================================================
``n``                 findings
``s``                 highest severity rank (``SEVERITIES`` index); absent: none
``ts``                latest ``received_at`` (findings and graphs)
``x:<T…>`` ``a:<TA…>`` ``e:<type>``   technique, tactic, event type seen (value 1)
``t:<urn>``           findings naming that target; ``o:<urn>`` the position of the
                      first one (ties of the most common target go to the first seen)
``u``                 findings naming no target (they count for the execution's target)
``gn`` ``ge`` ``gt``  the latest graph's node and edge counts and ``target_urn`` ('': none)
``A``                 (Redis) the execution's anchored hash, as stored: noted by a
                      commit that anchors the execution (:func:`anchored`)
====================  ===============================================================

``A`` spares a Redis query the anchor and owner reads (``Store.list_facts``: an MGET of
two keys per execution, the largest part of its work in Redis's single thread): an
anchor and its owner are written once, by the first accepted commit of the execution,
and a later commit that anchors it is accepted only from that owner with that very hash
— so a state holding ``A`` is the folding identity's, anchored with ``A``, for good. A
state without it (anchoring off, ``put_record``, facts kept before it existed) is looked
up as before (a query reads the note from the state's bytes: :func:`noted_anchor`).
SQLite does not note it: its query joins the anchors (cheap there).

A record that cannot be used (older version, edited: :class:`~.evidence.Unusable`) is
not folded; ``put_record`` and the upgrade's back-fill note it with its reason so every
query still reports it (metric and audit event), as when queries read the records.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from schemas.validate import Validators

from .evidence import Evidence, Unusable, read_evidence, record_id
from .facts import SEVERITY_RANK, UNKNOWN_TARGET, ExecutionFacts, _dict, _finding_target, _text

FOLDED_KINDS = ("finding", "graph")
_VALIDATORS: list[Validators] = []  # compiled on first use (put_record, back-fill)
#: (op, field, value): ``add`` a number, ``max`` keep the larger number, ``num`` set a
#: number, ``set`` set a string, ``first`` set to the record's position unless set
Op = tuple[str, str, Any]


@dataclass(frozen=True, slots=True)
class Fold:
    """What one stored record adds to its execution's facts state."""

    member: str  # "<execution_fingerprint>:<attestation hash>", both lower-case hex
    received_at: int  # orders the identity's executions, newest first
    ops: tuple[Op, ...]


@dataclass(frozen=True, slots=True)
class Skip:
    """A stored record that cannot be folded, reported by every query of its identity."""

    kind: str
    record_id: str  # the record's own id when readable, else '?'
    reason: str


def fold_record(kind: str, raw: bytes, tenant_id: str, identity: str | None, *,
                validators: Validators | None) -> Fold | Skip | None:
    """The fold of one stored record listed under ``identity`` (None: not folded).

    ``validators`` None: the record was just built by this gateway from a body it
    checked (a commit that carries no fold of its own; ``build_commit``'s commits carry
    :func:`body_fold`'s) — the schema check is not repeated. Otherwise (a record from
    ``put_record`` or the back-fill) it is read exactly as a query read it."""
    if kind not in FOLDED_KINDS or identity is None:
        return None
    try:
        ev = read_evidence(kind, raw, validators=validators)
    except Unusable as exc:
        return Skip(kind, record_id(kind, raw) or "?", exc.reason)
    if ev.identity != identity or ev.tenant_id != tenant_id:
        return None  # a query ignored it: another identity's or tenant's record
    return evidence_fold(ev)


def body_fold(kind: str, body: dict[str, Any], *, identity: str, tenant_id: str,
              execution_fingerprint: str, attestation_hash: str,
              received_at: int) -> Fold | None:
    """The fold of the record this gateway is about to store for a body it parsed and
    checked (the commit path, gateway/pipeline/records.py), from what the pipeline holds:
    exactly what :func:`fold_record` would read back from the record's bytes (the same
    :class:`Evidence`, the same ops), without parsing them again. None: not folded."""
    if kind not in FOLDED_KINDS:
        return None
    return evidence_fold(Evidence(kind, identity, tenant_id, execution_fingerprint.lower(),
                                  attestation_hash.lower(), received_at, body))


def evidence_fold(ev: Evidence) -> Fold:
    return Fold(f"{ev.execution_fingerprint}:{ev.attestation_hash}", ev.received_at,
                tuple(evidence_ops(ev)))


ANCHORED = "A"
_HEX64 = re.compile(r"[0-9a-f]{64}")


def anchored(fold: Fold, tenant_id: str, anchor_tenant_id: str, anchor_fp: str,
             anchored_hash: str) -> Fold:
    """``fold`` plus ``A`` = ``anchored_hash`` when the commit that folds it into
    ``tenant_id``'s facts anchors that very execution (the member's fingerprint, in the
    form both stores look anchors up by: 64 lower-case hex digits), else ``fold``."""
    if (anchor_tenant_id != tenant_id or not _HEX64.fullmatch(anchor_fp)
            or not fold.member.startswith(anchor_fp + ":")):
        return fold
    return Fold(fold.member, fold.received_at, (*fold.ops, ("set", ANCHORED, anchored_hash)))


_NOTE = b'"' + ANCHORED.encode() + b'":"'


def noted_anchor(raw: bytes) -> str | None:
    """``orjson.loads(raw).get(ANCHORED)`` for a state as the stores encode it (compact
    JSON; ``A`` is only ever set to a string), without decoding the rest: the state's
    ``"A":"`` right after a ``{`` or a ``,``, then the string up to its closing quote.

    Why a match is the key ``A`` and nothing else: in JSON text a ``"`` inside a string
    is always escaped (``\\"``), so the quote after ``A`` is a structural one — the end
    of a string ending in ``A``, a key since a ``:`` follows; the quote before ``A``
    follows a ``{`` or ``,``, so it is not escaped either: it opens that key, which is
    therefore exactly ``A``. A value holding a backslash (an escape) is decoded whole;
    an encoder that put spaces around the separators would only never match, and the
    state would be looked up as one without the note (correct, as before the notes)."""
    at = raw.find(_NOTE)
    while at > 0 and raw[at - 1] not in b"{,":
        at = raw.find(_NOTE, at + 1)
    if at <= 0:
        return None
    start = at + len(_NOTE)
    end = raw.find(b'"', start)
    value = raw[start:end]
    if end < 0 or b"\\" in value:
        return orjson.loads(raw).get(ANCHORED)
    return value.decode()


def stored_validators() -> Validators:
    """The validators a record from outside the commit path is checked with (once)."""
    if not _VALIDATORS:
        _VALIDATORS.append(Validators())
    return _VALIDATORS[0]


def evidence_ops(ev: Evidence) -> list[Op]:
    ops: list[Op] = [("max", "ts", ev.received_at)]
    if ev.kind == "graph":
        graph = _dict(ev.body.get("graph"))
        nodes, edges = graph.get("nodes"), graph.get("edges")
        return [*ops, ("num", "gn", len(nodes) if isinstance(nodes, list) else 0),
                ("num", "ge", len(edges) if isinstance(edges, list) else 0),
                ("set", "gt", _text(graph.get("target_urn")) or "")]
    payload = _dict(ev.body.get("payload"))
    ops.append(("add", "n", 1))
    if payload.get("severity") in SEVERITY_RANK:
        ops.append(("max", "s", SEVERITY_RANK[payload["severity"]]))
    for prefix, name in (("x:", "mitre_techniques"), ("a:", "mitre_tactics")):
        items = payload.get(name)
        if isinstance(items, list):
            ops += [("num", prefix + v, 1) for v in dict.fromkeys(items) if isinstance(v, str)]
    if event_type := _text(payload.get("event_type")):
        ops.append(("num", "e:" + event_type, 1))
    target = _finding_target(payload)
    if target is None:
        ops.append(("add", "u", 1))
    else:
        ops += [("add", "t:" + target, 1), ("first", "o:" + target, 0)]
    return ops


#: At most this many keyed fields (``x:`` ``a:`` ``e:`` ``t:`` ``o:``) per state: once a
#: record finds the state at the bound, the keyed fields it would add are not added (its
#: counters still are). Without it a producer naming ever new targets or event types in
#: one execution grows the state, and every commit of that execution decodes and
#: re-encodes all of it — in Redis's single thread (docs/POLICY.md *Facts*).
MAX_KEYED = 512


def keyed_count(state: Mapping[str, Any]) -> int:
    return sum(1 for name in state if ":" in name)


def apply(state: dict[str, Any], ops: Iterable[Op], position: int) -> dict[str, Any]:
    """``ops`` applied to ``state`` (in place, returned); the Lua fold does the same."""
    room = keyed_count(state) < MAX_KEYED  # judged once per record: t:/o: stay paired
    for op, name, value in ops:
        if not room and ":" in name and name not in state:
            continue
        if op == "add":
            state[name] = state.get(name, 0) + value
        elif op == "max":
            if name not in state or value > state[name]:
                state[name] = value
        elif op in ("num", "set"):
            state[name] = value
        elif op == "first":
            state.setdefault(name, position)
        else:
            raise ValueError(f"unknown fold op {op!r}")
    return state


def flat_args(fold: Fold) -> list[Any]:
    """The ops as the commit script's ARGV tail: op, field, value, op, field, value…"""
    return [x for op in fold.ops for x in op]


def facts_from_states(tenant_id: str, identity: str,
                      rows: Iterable[tuple[str, bytes | str | Mapping[str, Any],
                                           str | None, str | None]]
                      ) -> list[ExecutionFacts]:
    """Facts per execution (sorted by fingerprint) from ``(member, state, anchor, owner)``
    rows: only executions ``identity`` owns, and only the state made under the anchored
    hash — as :func:`~.facts.facts_from_records` chose the records."""
    out = []
    for member, state, anchor, owner in rows:
        fp, _, att = member.partition(":")
        if owner != identity or not anchor or att != anchor.lower():
            continue
        fields = state if isinstance(state, Mapping) else orjson.loads(state)
        out.append(_facts(tenant_id, fp, anchor, fields))
    return sorted(out, key=lambda f: f.execution_fingerprint)


def _facts(tenant_id: str, fp: str, anchor: str, s: Mapping[str, Any]) -> ExecutionFacts:
    techniques, tactics, events = [], [], []
    for name in s:  # one pass, by the two-character prefix
        head = name[:2]
        if head == "x:":
            techniques.append(name[2:])
        elif head == "a:":
            tactics.append(name[2:])
        elif head == "e:":
            events.append(name[2:])
    target, repeat = target_and_repeat(s)
    severity = s.get("s")
    return ExecutionFacts(
        tenant_id=tenant_id, execution_fingerprint=fp, attestation_hash=anchor,
        target_urn=target,
        max_severity=None if severity is None else _SEVERITY_NAMES[int(severity)],
        techniques=frozenset(techniques), tactics=frozenset(tactics),
        event_types=frozenset(events),
        graph_nodes=int(s.get("gn", 0)), graph_edges=int(s.get("ge", 0)),
        findings=int(s.get("n", 0)), repeat_per_target=repeat,
        latest_timestamp=None if "ts" not in s else int(s["ts"]),
    )


def target_and_repeat(s: Mapping[str, Any]) -> tuple[str, int]:
    """A state's ``(target_urn, repeat_per_target)``, as ``facts_from_records`` finds them:
    the graph's target, else the most named one (the first seen among equals), else
    unknown; findings naming no target count for it."""
    counts = {name[2:]: value for name, value in s.items() if name[:2] == "t:"}
    target = s.get("gt") or UNKNOWN_TARGET
    if counts and not s.get("gt"):  # Counter.most_common(1): the first seen among equals
        best = max(counts.values())
        target = min((s["o:" + t], t) for t, c in counts.items() if c == best)[1]
    if unnamed := s.get("u", 0):
        counts[target] = counts.get(target, 0) + unnamed
    return target, int(max(counts.values(), default=0))


def target_urn(s: Mapping[str, Any]) -> str:
    """``target_and_repeat(s)[0]``; without a pass over the fields when a graph named it."""
    return s.get("gt") or target_and_repeat(s)[0]


_SEVERITY_NAMES = {rank: name for name, rank in SEVERITY_RANK.items()}
