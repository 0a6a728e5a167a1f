"""The per-source evaluation table of one model: :class:`EvalRow` and :class:`EvalTable`."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, Field

__all__ = ["MEAN_ROW", "METRICS", "EvalRow", "EvalTable", "mean_row"]

METRICS: tuple[str, ...] = ("loss", "exact_match", "mc_accuracy", "mc_accuracy_norm")
"""Metric fields of an :class:`EvalRow`, in table order."""

MEAN_ROW = "mean"
"""``source`` of the mean row of an :class:`EvalTable`."""


class EvalRow(BaseModel):
    """Metrics of one source (or the mean row). ``None`` where a metric does not apply.

    Attributes:
        source: source name (``"mean"`` for the mean row).
        n: examples evaluated (for the mean row: the total over sources).
        n_tokens: response tokens that carried loss (mean row: the total).
        n_mc: examples scored by multiple choice (mean row: the total).
        loss: mean response-token cross-entropy, nats/token.
        exact_match: fraction in [0, 1] of normalised greedy generations equal to the
            normalised reference.
        mc_accuracy: fraction in [0, 1] of multiple-choice examples whose highest summed
            log-likelihood option is the correct one.
        mc_accuracy_norm: the same with length-normalised scores.
        warnings: what is wrong with this row's figures (e.g. a non-finite loss), shown
            under the table.
    """

    source: str
    n: int = 0
    n_tokens: int = 0
    n_mc: int = 0
    loss: float | None = None
    exact_match: float | None = None
    mc_accuracy: float | None = None
    mc_accuracy_norm: float | None = None
    warnings: list[str] = Field(default_factory=list)


class EvalTable(BaseModel):
    """Per-source evaluation of one model: ``rows`` (one per source) and ``mean``.

    ``mean`` holds, for each metric, the unweighted mean over the sources where that
    metric exists (``None`` if it exists nowhere); its counts are totals.
    """

    model: str | None = None
    rows: list[EvalRow] = Field(default_factory=list)
    mean: EvalRow = Field(default_factory=lambda: EvalRow(source=MEAN_ROW))

    @classmethod
    def from_rows(cls, rows: Sequence[EvalRow], model: str | None = None) -> EvalTable:
        """Build a table from per-source rows, computing the mean row."""
        return cls(model=model, rows=list(rows), mean=mean_row(rows))

    def row(self, source: str) -> EvalRow:
        """The row of ``source`` (``"mean"`` gives the mean row). Raises KeyError."""
        if source == MEAN_ROW:
            return self.mean
        for r in self.rows:
            if r.source == source:
                return r
        raise KeyError(f"no row for source {source!r}; sources: {[r.source for r in self.rows]}")

    def metrics(self) -> list[str]:
        """Metric names that have a value in at least one row, in table order."""
        return [m for m in METRICS if getattr(self.mean, m) is not None]

    def to_markdown(self, digits: int = 4) -> str:
        """A markdown table: one line per source, then the mean row."""
        metrics = self.metrics()
        head = ["source", "n", *metrics]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in [*self.rows, self.mean]:
            name = f"**{r.source}**" if r is self.mean else r.source
            cells = [name, str(r.n), *(_fmt(getattr(r, m), digits) for m in metrics)]
            lines.append("| " + " | ".join(cells) + " |")
        lines += [f"\n**Warning** ({self.model or 'model'}): {w}" for r in self.rows for w in r.warnings]
        return "\n".join(lines)


def mean_row(rows: Sequence[EvalRow]) -> EvalRow:
    """Mean over ``rows`` of each metric where it is not None; counts are summed."""
    out = EvalRow(
        source=MEAN_ROW,
        n=sum(r.n for r in rows),
        n_tokens=sum(r.n_tokens for r in rows),
        n_mc=sum(r.n_mc for r in rows),
    )
    for m in METRICS:
        vals = [getattr(r, m) for r in rows if getattr(r, m) is not None]
        setattr(out, m, sum(vals) / len(vals) if vals else None)
    return out


def _fmt(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"
