"""The joint and random-split baselines of flow ``merit`` (docs/incremental.md): planned
(an incremental run reuses the previous run's baseline branches whose sources did not
change), trained or reused, merged, and their state committed for the next run."""

from typing import NamedTuple

from flows.branches import run_branches
from flows.common import run_logger
from merit_core.config import MeritConfig
from merit_core.pipeline.baselines_rerun import BaselinePlan
from merit_core.pipeline.incremental import RerunPlan
from merit_core.refs import BranchRef, ConflictMatrix, MixtureRef, ModelRef
from tasks import merge_task
from tasks.baselines import plan_baselines_task, save_baselines_state_task

STAGES = {"joint": "train joint baseline", "random": "train random-split baseline"}


class Baselines(NamedTuple):
    """What the baselines add to the run: their plans, branches and models by label."""

    plans: list[BaselinePlan]
    branches: dict[str, list[BranchRef]]
    models: dict[str, ModelRef]


def train_or_reuse(config: MeritConfig, base: ModelRef, mixture: MixtureRef, groups: list[list[str]],
                   retrain: list[int], reuse: dict[int, BranchRef], run_id: str, label: str) -> list[BranchRef]:
    """The branches of one partition in group order: groups ``retrain`` trained now
    (flows/branches.py, from θ(0)), the others ``reuse``d from the store as they are."""
    trained = run_branches(config, base, mixture, [groups[k] for k in retrain], run_id, label,
                           indices=retrain) if retrain else []
    for k, ref in sorted(reuse.items()):
        run_logger("merit.incremental").info("branch %s/%d reused from %s (%s)", label, k, ref.uri,
                                             ", ".join(ref.sources))
    return sorted([*reuse.values(), *trained], key=lambda b: b.index)


def train_baselines(config: MeritConfig, base: ModelRef, mixture: MixtureRef, conflict: ConflictMatrix,
                    plan: RerunPlan, run_id: str, stage) -> Baselines:
    """Joint training (K = 1, same data) and a random split into K groups merged like MERIT,
    as ``config.baselines`` says, each timed as a stage by the flow's ``stage`` timer; then
    the baselines state is committed for the next incremental run."""
    if not (config.baselines.joint or (config.baselines.random_split and plan.partition.k > 1)):
        return Baselines([], {}, {})
    plans = plan_baselines_task(config, base, mixture, conflict, plan)
    log = run_logger("merit.incremental")
    out = Baselines(plans, {}, {})
    for p in plans:
        log.info("%s baseline: %s — %s", p.label, p.mode, p.reason)
        with stage(STAGES[p.label]):
            refs = out.branches[p.label] = train_or_reuse(config, base, mixture, p.groups, p.retrain, p.reuse,
                                                          run_id, p.label)
            out.models[p.label] = (merge_task(config, base, refs, run_id, "random") if p.label == "random" else
                                   ModelRef(key=refs[0].key, uri=refs[0].uri, label="joint"))
    save_baselines_state_task(config, base, mixture, plans, out.branches, run_id)
    return out
