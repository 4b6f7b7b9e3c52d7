"""Read a /metrics answer with prometheus_client's own text parser (a malformed
exposition fails here, not in a regex)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """(sample name, frozenset of label items) → value."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(text: str, name: str, **labels: str) -> float | None:
    return samples(text).get((name, frozenset(labels.items())))


def by_label(text: str, name: str, label: str) -> dict[str, float]:
    """Samples of ``name`` keyed by one label's value."""
    return {dict(key)[label]: v for (n, key), v in samples(text).items() if n == name}
