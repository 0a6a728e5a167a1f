"""What the Prefect UI shows of a run besides its logs: progress bars of the long
stages, a table per branch, the report with its figures, links to the merged model and
the report, and the summary table (Prefect's artifact API).

A failing artifact call (the API briefly away) is logged and never fails the run:
artifacts describe the work, they are not part of it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar
from uuid import UUID

from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from merit_core.pipeline.layout import report_key
from merit_core.pipeline.reports import report_for_viewer
from merit_core.refs import BranchRef
from merit_core.store import ArtifactStore, StoreError
from merit_core.train import TrainProgress

logger = logging.getLogger("merit.artifacts")
T = TypeVar("T")


def _quietly(what: str, call, *args, **kwargs):
    try:
        return call(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - an artifact is never worth failing the run for
        logger.warning("Prefect artifact (%s) not published: %s: %s", what, type(e).__name__, e)
        return None


class Progress:
    """A Prefect progress artifact of ``total`` steps of work, at 0 % when made; the
    description says ``<what>: <done> of <total>``."""

    def __init__(self, what: str, total: int):
        self.what, self.total, self.done = what, max(0, total), 0
        self.id: UUID | None = _quietly(what, create_progress_artifact, 0.0 if self.total else 100.0,
                                        description=self._description())

    def _description(self, note: str = "") -> str:
        return f"{self.what}: {self.done} of {self.total}{note}"

    def set(self, done: int, note: str = "") -> None:
        """``done`` of ``total`` finished (``note`` is appended to the description)."""
        self.done = min(done, self.total)
        if self.id is not None:
            pct = 100.0 * self.done / self.total if self.total else 100.0
            _quietly(self.what, update_progress_artifact, self.id, pct, description=self._description(note))

    def step(self, n: int = 1) -> None:
        """``n`` more finished."""
        self.set(self.done + n)


def tracked(items: Iterable[T], what: str) -> Iterator[T]:
    """Yield ``items``; a :class:`Progress` of ``what`` advances as each is finished
    (when the loop asks for the next one)."""
    items = list(items)
    progress = Progress(what, len(items))
    for item in items:
        yield item
        progress.step()


class TrainProgressArtifact:
    """A hook for :func:`merit_core.pipeline.branches.train_branch` (``on_progress``): a
    progress artifact that follows the branch's optimizer steps, updated at most every
    ``min_interval_s`` seconds (and on the last log), its description showing the step
    and the loss."""

    def __init__(self, what: str, min_interval_s: float = 2.0):
        self.what, self.min_interval_s = what, min_interval_s
        self.id: UUID | None = _quietly(what, create_progress_artifact, 0.0, description=f"{what}: starting")
        self._last = 0.0

    def __call__(self, p: TrainProgress) -> None:
        now = time.monotonic()
        if self.id is None or (now - self._last < self.min_interval_s and not p.final and p.step < p.max_steps):
            return
        self._last = now
        loss = "" if p.loss is None else f", loss {p.loss:.4f}"
        _quietly(self.what, update_progress_artifact, self.id, 100.0 * p.fraction,
                 description=f"{self.what}: {'done, ' if p.final else ''}step {p.step}/{p.max_steps}{loss}")


def _sig(x, digits: int = 4):
    """``x`` rounded to ``digits`` significant digits (floats only; NaN/inf as they are)."""
    if isinstance(x, float) and math.isfinite(x) and x != 0.0:
        return round(x, digits - 1 - math.floor(math.log10(abs(x))))
    return x


def publish_branch(ref: BranchRef) -> None:
    """A table artifact of one trained branch: its sources, examples, steps, tokens,
    final train loss, training time and the URI of θ_k in the store."""
    rows = [("model", ref.label), ("branch", ref.index), ("sources", ", ".join(ref.sources)),
            ("examples", ref.examples), ("optimizer steps", ref.steps), ("trained tokens N_k", ref.trained_tokens),
            ("final train loss", _sig(ref.train_loss)), ("training s", _sig(ref.wall_s)),
            ("processes", ref.processes), ("resumed from step", ref.resumed_from_step), ("checkpoint", ref.uri)]
    _quietly("branch", create_table_artifact, [{"field": k, "value": v} for k, v in rows],
             description=f"Branch {ref.label}/{ref.index}: what it trained on and where θ_k is")


def summary_table(report: dict, digits: int = 4) -> list[dict]:
    """Mean held-out metrics per model, floats rounded to ``digits`` significant digits."""
    rows = []
    for model, table in report["metrics"].items():
        row = {"model": model}
        row.update({k: _sig(v, digits) for k, v in table["mean"].items() if k != "source" and v is not None})
        rows.append(row)
    return rows


def _file_link(store: ArtifactStore, key: str) -> str:
    """A presigned URL of ``key`` where the store has one, else its store URI (``file://``)."""
    try:
        return store.presigned_url(key) or store.uri_for(key)
    except StoreError:
        return store.uri_for(key)


def publish_run_report(store: ArtifactStore, report: dict, md: str) -> None:
    """The run report as Prefect artifacts: the markdown with its figures viewable in the
    UI (``merit-report``), the mean metrics (``merit-summary``), and links to the merged
    model (``merit-model``) and to report.md (``merit-report-file``)."""
    run_id, key = report["run_id"], report_key(report["run_id"])
    _quietly("report", create_markdown_artifact, key="merit-report", markdown=report_for_viewer(store, key, md),
             description=f"MERIT report of run {run_id}")
    _quietly("summary", create_table_artifact, key="merit-summary", table=summary_table(report),
             description="Mean held-out metrics per model (4 significant digits)")
    merged = report.get("models", {}).get("merit")
    if merged:
        _quietly("model link", create_link_artifact, key="merit-model", link=merged["uri"], link_text=merged["uri"],
                 description=f"Merged model θ̄ of run {run_id} (HF directory in the store)")
    _quietly("report link", create_link_artifact, key="merit-report-file", link=_file_link(store, f"{key}/report.md"),
             link_text=f"{report['report_uri']}/report.md", description=f"report.md of run {run_id}")


def publish_study_report(store: ArtifactStore, study_id: str, md: str) -> None:
    """The study report's markdown, figures viewable in the UI (``merit-study-report``)."""
    _quietly("study report", create_markdown_artifact, key="merit-study-report",
             markdown=report_for_viewer(store, report_key(study_id), md), description=f"MERIT study {study_id}")

