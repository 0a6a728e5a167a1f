"""Stages *report*, *save seed record*, *load seed records* and *study report*: the run
report and the study's per-seed records and report, written to the store."""

from __future__ import annotations

from collections.abc import Sequence

from merit_core.pipeline.layout import report_key, seed_record_key, seed_records_prefix
from merit_core.pipeline.study import SeedRecord, combine
from merit_core.report import write_report
from merit_core.report import write_study_report as render_study_report
from merit_core.store import ArtifactStore


def _with_uri(data: dict, md: str, uri: str) -> tuple[dict, str]:
    data["report_uri"] = uri
    return data, md + f"\n\nReport files: `{uri}` (report.md, report.json, PNGs)\n"


def write_run_report(store: ArtifactStore, run_id: str, **parts) -> tuple[dict, str]:
    """Write report.md/json and PNGs of a run (``parts``: :func:`merit_core.report.write_report`'s
    keyword arguments) to ``runs/<run-id>/report/``.

    Returns:
        (report dict with ``report_uri``, report markdown ending with the store URI of the files).
    """
    key = report_key(run_id)
    staging = store.staging_dir(key)
    data = write_report(staging, run_id=run_id, **parts)
    md = (staging / "report.md").read_text()
    return _with_uri(data, md, store.commit_dir(key, staging, metadata={"kind": "report"}))


def save_seed_record(store: ArtifactStore, record: SeedRecord) -> str:
    """Commit a finished seed's record to ``runs/<study-id>/seeds/<index>``; returns its URI."""
    key = seed_record_key(record.study_id, record.seed["index"])
    staging = store.staging_dir(key)
    (staging / "record.json").write_text(record.model_dump_json(indent=1))
    return store.commit_dir(key, staging, metadata={"kind": "study-seed", "seed": record.seed})


def load_seed_records(store: ArtifactStore, study_id: str) -> list[SeedRecord]:
    """Every finished seed record of a study in the store (verified by its manifest), by seed index.

    Raises:
        pydantic.ValidationError: a record.json does not parse as a SeedRecord.
    """
    keys = store.list_complete(seed_records_prefix(study_id))
    records = [SeedRecord.model_validate_json((store.fetch_dir(k.rstrip("/")) / "record.json").read_text())
               for k in keys]
    return sorted(records, key=lambda r: r.seed["index"])


def write_study_report(store: ArtifactStore, study_id: str, records: Sequence[SeedRecord]) -> tuple[dict, str]:
    """Write the study's report.md/json and PNGs, built from the seed ``records``
    (:func:`merit_core.pipeline.study.combine`), to ``runs/<study-id>/report/``.

    Returns:
        (report dict with ``report_uri``, report markdown ending with the store URI of the files).

    Raises:
        merit_core.pipeline.study.StudyRecordError: the records cannot be reported together.
    """
    key = report_key(study_id)
    staging = store.staging_dir(key)
    data = render_study_report(staging, **combine(records, where=f"study {study_id}"))
    md = (staging / "report.md").read_text()
    return _with_uri(data, md, store.commit_dir(key, staging, metadata={"kind": "study-report"}))
