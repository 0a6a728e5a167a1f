"""Prefect tasks: one thin wrapper per stage of merit_core.pipeline.

Importing the package registers :func:`tasks.credentials.session_from_block` as the
store's provider of sessions for Prefect credentials blocks, and sends the ``merit`` and
``merit_core`` loggers to the Prefect run's logs (:mod:`tasks.logs`)."""

import tasks.credentials  # noqa: F401 — registers the store's session provider
from tasks.logs import send_merit_logs_to_prefect
from tasks.stages import (  # noqa: F401
    collect_branches_task,
    collect_source_gradients_task,
    conflict_task,
    displacement_task,
    evaluate_benchmarks_task,
    evaluate_task,
    load_seed_records_task,
    merge_task,
    plan_source_gradients_task,
    prepare_base_task,
    report_task,
    resolve_benchmarks_task,
    resolve_mixture_task,
    save_seed_record_task,
    source_gradient_task,
    source_gradients_task,
    split_task,
    study_report_task,
    train_branch_task,
)

send_merit_logs_to_prefect()
