"""The one error type of the data layer."""

from __future__ import annotations


class DataError(ValueError):
    """Bad data-source input. The message names the culprit: the source, and where it
    applies the file and line (or dataset row), the field, the BIG-bench task."""


def where(source: str, place: str | None = None) -> str:
    """Message prefix ``source 'name': <place>: `` naming the culprit."""
    return f"source {source!r}: {place}: " if place else f"source {source!r}: "
