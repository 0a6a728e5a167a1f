"""Thin @task wrappers of the baselines' incremental stages
(merit_core.pipeline.baselines_rerun)."""

from prefect import task

from merit_core.config import MeritConfig
from merit_core.pipeline.baselines_rerun import BaselinePlan, plan_baselines, save_baselines_state
from merit_core.pipeline.incremental import RerunPlan
from merit_core.refs import BranchRef, ConflictMatrix, MixtureRef, ModelRef
from tasks.stages import STORAGE_RETRIES
from tasks.store import run_store


@task(name="plan-baselines", **STORAGE_RETRIES)
def plan_baselines_task(config: MeritConfig, base: ModelRef, mixture: MixtureRef, conflict: ConflictMatrix,
                        plan: RerunPlan) -> list[BaselinePlan]:
    """The joint and random-split baselines' branches to train or reuse (incremental runs
    reuse ``plan.previous_run``'s where their sources did not change)."""
    return plan_baselines(config, run_store(config), base, mixture, conflict, plan)


@task(name="save-baselines-state", **STORAGE_RETRIES)
def save_baselines_state_task(config: MeritConfig, base: ModelRef, mixture: MixtureRef, plans: list[BaselinePlan],
                              branches: dict[str, list[BranchRef]], run_id: str) -> str | None:
    """What the next incremental run reuses of the baselines, committed once their branches are."""
    return save_baselines_state(config, run_store(config), base, mixture, plans, branches, run_id)
