"""Thin @task wrappers of the incremental-run, forecast and merge-readiness stages
(merit_core.pipeline.incremental, merit_core.split.forecast, merit_core.pipeline.readiness)."""

import numpy as np
from prefect import task
from prefect.artifacts import create_markdown_artifact

from merit_core.config import MeritConfig
from merit_core.pipeline.incremental import RerunPlan, plan_rerun, save_split_state
from merit_core.pipeline.readiness import merge_readiness, readiness_markdown
from merit_core.refs import BranchRef, ConflictMatrix, MixtureRef, ModelRef, SketchRef
from merit_core.split.forecast import forecast_markdown, forecast_partitions
from tasks.stages import STORAGE_RETRIES
from tasks.store import run_store


@task(name="plan-split", **STORAGE_RETRIES)
def plan_split_task(config: MeritConfig, base: ModelRef, mixture: MixtureRef, conflict: ConflictMatrix,
                    sketches: list[SketchRef], run_id: str) -> RerunPlan:
    """The partition and which branches train or are reused (run.rerun), with the forecast
    of candidate partitions of C (published as the ``merit-forecast`` artifact)."""
    plan = plan_rerun(config, run_store(config), base, mixture, conflict, sketches, run_id)
    weights = np.asarray(list(plan.partition.weights.values()))
    forecast = forecast_partitions(np.asarray(conflict.matrix), weights, config.split.r, seed=config.split.seed)
    create_markdown_artifact(key="merit-forecast", markdown=forecast_markdown(forecast),
                             description="Split scores of candidate partitions and explained variance per PC")
    return plan.model_copy(update={"forecast": forecast})


@task(name="save-split-state", **STORAGE_RETRIES)
def save_split_state_task(config: MeritConfig, base: ModelRef, mixture: MixtureRef, plan: RerunPlan,
                          branches: list[BranchRef], run_id: str) -> str | None:
    """What the next incremental run reuses, committed once every branch is."""
    return save_split_state(config, run_store(config), base, mixture, plan, branches, run_id)


@task(name="merge-readiness")
def merge_readiness_task(config: MeritConfig, base: ModelRef, branches: list[BranchRef], merged: ModelRef,
                         mixture: MixtureRef, joint: ModelRef | None = None) -> dict:
    """Paper appendix B diagnostics (eval.diagnostics), published as ``merit-readiness``."""
    d = merge_readiness(config, run_store(config), base, branches, merged, mixture, joint)
    create_markdown_artifact(key="merit-readiness", markdown=readiness_markdown(d),
                             description="Merge-readiness diagnostics: LMC barrier, noise flatness, contraction")
    return d
