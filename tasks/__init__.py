"""Prefect tasks: one thin wrapper per pipeline stage around merit_core.stages."""

from tasks.stages import (  # noqa: F401
    conflict_task,
    evaluate_task,
    merge_task,
    prepare_base_task,
    report_task,
    resolve_mixture_task,
    source_gradient_task,
    split_task,
    train_branch_task,
)
