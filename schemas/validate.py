"""Compiled JSON Schema validators for the federation protocol (PROTOCOL.md sections 5 and 7).

Two engines read the same draft 2020-12 files of this package:

* :class:`Validators` — the hot path, ``jsonschema_rs`` (Rust), compiled once at start-up
  with the linear-time regex engine (no lookaround, no backtracking) and no network.
* :class:`ReferenceValidators` — the same API on the Python ``jsonschema`` package: the
  oracle the tests compare the hot path against, and a fallback.

``validate`` raises :class:`SchemaError` for one error, chosen deterministically:

* hot path: the first error in jsonschema_rs evaluation order — an object's own
  ``type``/``required`` before its members, members in the instance's key order (sorted,
  for a canonical body), depth first. It stops there: jsonschema_rs ``iter_errors`` is
  eager, and a body wrong everywhere would cost seconds.
* reference: among the first ``_MAX_ERRORS`` errors (lazily produced), the one whose
  instance location sorts first (array indices numerically); independent of key order.

When an instance has exactly one error both name the same pointer (tested). Whatever
the instance — huge integers, deep nesting — nothing but :class:`SchemaError` escapes
``validate`` and nothing escapes ``is_valid``. See docs/SCHEMAS.md.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jsonschema
import jsonschema_rs
import referencing

__all__ = [
    "SCHEMA_NAMES",
    "ReferenceValidators",
    "SchemaError",
    "Validators",
    "json_pointer",
    "load_schema",
    "schema_id",
]

SCHEMA_NAMES: tuple[str, ...] = (
    "telemetry",
    "execution_graph",
    "feedback_query",
    "feedback_response",
    "adjustment",
    "finding_record",
    "audit_event",
)

_DIR = Path(__file__).resolve().parent
_BASE_URI = "https://fedgate.local/schemas/"
_MAX_ERRORS = 64  # bounds the work spent on a body that is wrong everywhere
_MAX_MESSAGE = 200
_MASK = "value"  # the hot path never echoes an instance value in a message

InstancePath = tuple[str | int, ...]


class SchemaError(ValueError):
    """An instance the schema refuses: ``pointer`` (RFC 6901, "" = root) and ``message``."""

    def __init__(self, pointer: str, message: str) -> None:
        self.pointer = pointer
        self.message = _truncate(message)
        super().__init__(f"schema violation at {pointer or '(root)'}: {self.message}")


def schema_id(name: str) -> str:
    """The ``$id`` of a schema, e.g. ``https://fedgate.local/schemas/telemetry.schema.json``."""
    return f"{_BASE_URI}{name}.schema.json"


def load_schema(name: str) -> dict:
    """A fresh copy of schema ``name`` (one of :data:`SCHEMA_NAMES`), parsed from its file."""
    if name not in SCHEMA_NAMES:
        raise KeyError(f"unknown schema {name!r}")
    return json.loads((_DIR / f"{name}.schema.json").read_text(encoding="utf-8"))


def _truncate(text: str) -> str:
    text = " ".join(text.split())  # one line: engine messages may carry pretty-printing
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."


def json_pointer(path: Iterable[str | int]) -> str:
    """RFC 6901 pointer of an instance location."""
    return "".join("/" + str(part).replace("~", "~0").replace("/", "~1") for part in path)


def _sort_key(path: InstancePath) -> tuple[tuple[int, int | str], ...]:
    return tuple((0, p) if isinstance(p, int) else (1, p) for p in path)


class _Engine:
    """Shared API; subclasses compile a schema and list an instance's errors."""

    def __init__(self) -> None:
        schemas = {name: load_schema(name) for name in SCHEMA_NAMES}
        self._compiled = self._compile_all(schemas)

    def _compile_all(self, schemas: dict[str, dict]) -> dict[str, Any]:
        raise NotImplementedError

    def _first_error(self, compiled: Any, instance: object) -> tuple[InstancePath, str] | None:
        raise NotImplementedError

    def _get(self, name: str) -> Any:
        try:
            return self._compiled[name]
        except KeyError:
            raise KeyError(f"unknown schema {name!r}") from None

    def is_valid(self, name: str, instance: object) -> bool:
        compiled = self._get(name)
        try:
            return bool(compiled.is_valid(instance))
        except Exception:  # noqa: BLE001 - an engine that cannot judge says "invalid"
            return False

    def validate(self, name: str, instance: object) -> None:
        """Return if ``instance`` is valid, else raise :class:`SchemaError` (first error)."""
        compiled = self._get(name)
        try:
            first = self._first_error(compiled, instance)
        except Exception as exc:  # noqa: BLE001 - fail closed, never leak an engine error
            raise SchemaError("", _unjudgeable(exc)) from None
        if first is not None:
            path, message = first
            raise SchemaError(json_pointer(path), message)


def _unjudgeable(exc: Exception) -> str:
    if isinstance(exc, RecursionError) or "recursion" in str(exc).lower():
        return "value nested too deeply"
    return f"value cannot be validated ({type(exc).__name__})"


class Validators(_Engine):
    """Hot path: ``jsonschema_rs`` validators, compiled once."""

    def _compile_all(self, schemas: dict[str, dict]) -> dict[str, Any]:
        registry = jsonschema_rs.Registry([(schema_id(n), s) for n, s in schemas.items()])
        return {
            name: jsonschema_rs.Draft202012Validator(
                schema,
                registry=registry,
                offline=True,
                mask=_MASK,
                pattern_options=jsonschema_rs.RegexOptions(),
            )
            for name, schema in schemas.items()
        }

    def _first_error(self, compiled: Any, instance: object) -> tuple[InstancePath, str] | None:
        # validate() stops at the first error; iter_errors() is eager and would build every
        # error of a body that is wrong everywhere (seconds for 100k bad array items).
        try:
            compiled.validate(instance)
        except jsonschema_rs.ValidationError as error:
            return tuple(error.instance_path), error.message
        return None


class ReferenceValidators(_Engine):
    """Reference oracle: the Python ``jsonschema`` package, same schemas, same API."""

    def _compile_all(self, schemas: dict[str, dict]) -> dict[str, Any]:
        registry: referencing.Registry = referencing.Registry().with_resources(
            (schema_id(n), referencing.Resource.from_contents(s)) for n, s in schemas.items()
        )
        compiled = {}
        for name, schema in schemas.items():
            jsonschema.Draft202012Validator.check_schema(schema)
            compiled[name] = jsonschema.Draft202012Validator(schema, registry=registry)
        return compiled

    def _first_error(self, compiled: Any, instance: object) -> tuple[InstancePath, str] | None:
        errors = ((tuple(e.absolute_path), e.message) for e in compiled.iter_errors(instance))
        batch = list(itertools.islice(errors, _MAX_ERRORS))  # iter_errors is lazy here
        return min(batch, key=lambda e: _sort_key(e[0])) if batch else None
