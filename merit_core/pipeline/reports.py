"""Stages *report*, *save seed record*, *load seed records* and *study report*: the run
report and the study's per-seed records and report, written to the store."""

from __future__ import annotations

import base64
import logging
import mimetypes
from collections.abc import Sequence

from merit_core.pipeline.layout import report_key, seed_record_key, seed_records_prefix
from merit_core.pipeline.study import SeedRecord, combine
from merit_core.report import write_report
from merit_core.report import write_study_report as render_study_report
from merit_core.report.render import link_images
from merit_core.store import ArtifactStore, StoreError

logger = logging.getLogger("merit")


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


def report_for_viewer(store: ArtifactStore, key: str, md: str, expires_s: int = 7 * 24 * 3600) -> str:
    """The report markdown for a viewer that cannot read the store (the Prefect UI): every
    image of the report directory ``key`` (``![alt](name.png)``, a path beside report.md)
    points at a presigned URL valid ``expires_s`` seconds (S3), or is embedded as a
    ``data:`` URI where the store has no URLs (a local directory) or cannot sign one.
    The report.md in the store keeps its relative paths."""
    files = None

    def resolve(name: str) -> str:
        nonlocal files
        try:
            url = store.presigned_url(f"{key}/{name}", expires_s)
        except StoreError as e:
            logger.warning("report image %s: %s; embedding it instead", name, e)
            url = None
        if url:
            return url
        files = files or store.fetch_dir(key)
        path = files / name
        if not path.is_file():
            return name
        mime = mimetypes.guess_type(name)[0] or "application/octet-stream"
        return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"

    return link_images(md, resolve)


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
