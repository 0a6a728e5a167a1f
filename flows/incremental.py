"""The split, branch-training and report seams of flow ``merit`` for incremental runs,
the forecast and the merge-readiness diagnostics (docs/incremental.md).

- :func:`plan_split`: full PCA split, or a finished run's groups with the new sources
  placed in them (``run.rerun``), plus the forecast of candidate partitions;
- :func:`train_planned_branches`: trains only the groups the plan retrains, reuses the
  others' committed branches, and commits the split state the next run reuses;
- :func:`readiness`: paper appendix B diagnostics when ``eval.diagnostics`` is on;
- :func:`report_sections`: the forecast, incremental and diagnostics report sections.
"""

from flows.baselines import train_or_reuse
from flows.common import run_logger
from merit_core.config import MeritConfig
from merit_core.pipeline.baselines_rerun import BaselinePlan, baselines_markdown, with_baselines
from merit_core.pipeline.incremental import RerunPlan, rerun_markdown, rerun_summary
from merit_core.pipeline.readiness import readiness_markdown
from merit_core.refs import BranchRef, ConflictMatrix, MixtureRef, ModelRef, SketchRef
from merit_core.split.forecast import forecast_markdown
from tasks.incremental import merge_readiness_task, plan_split_task, save_split_state_task


def plan_split(config: MeritConfig, base: ModelRef, mixture: MixtureRef, conflict: ConflictMatrix,
               sketches: list[SketchRef], run_id: str) -> RerunPlan:
    """The run's partition and its branches to train or reuse; logs the decision."""
    plan = plan_split_task(config, base, mixture, conflict, sketches, run_id)
    log = run_logger("merit.incremental")
    log.info("split: %s run — %s", plan.mode, plan.reason)
    if plan.forecast:
        f = plan.forecast
        log.info("forecast: PCA split score %.3f, beats %s of random splits; suggested r = %d (%s)",
                 f["candidates"][0]["score"], "–" if f["pca_beats_random"] is None else f"{f['pca_beats_random']:.0%}",
                 f["suggested_r"], f["reason"])
    return plan


def train_planned_branches(config: MeritConfig, base: ModelRef, mixture: MixtureRef, plan: RerunPlan,
                           run_id: str) -> list[BranchRef]:
    """The MERIT branches of ``plan`` in group order: the retrained groups trained now
    (flows/branches.py, from θ(0)), the others reused from the store; then the split state
    is committed for the next incremental run."""
    branches = train_or_reuse(config, base, mixture, plan.partition.groups, plan.retrain, plan.reuse, run_id,
                              "merit")
    save_split_state_task(config, base, mixture, plan, branches, run_id)
    return branches


def readiness(config: MeritConfig, base: ModelRef, models: dict[str, ModelRef], branches: list[BranchRef],
              mixture: MixtureRef, stage) -> dict | None:
    """Merge-readiness diagnostics of the MERIT merge (eval.diagnostics) timed as a stage by
    the flow's ``stage`` timer, or None when off."""
    if not config.eval.diagnostics:
        return None
    with stage("merge-readiness diagnostics"):
        return merge_readiness_task(config, base, branches, models["merit"], mixture, models.get("joint"))


def report_sections(plan: RerunPlan, branches: dict[str, list[BranchRef]], diagnostics: dict | None, extra: dict,
                    baselines: list[BaselinePlan] | None = None) -> dict:
    """``sections`` (title, markdown) and ``extra`` (report.json keys: ``extra`` plus
    ``rerun``, ``forecast``, ``diagnostics``), as keyword arguments of ``report_task``.
    ``branches``: label -> branches (merit, and the baselines of ``baselines``, listed
    in the incremental section beside MERIT's)."""
    summary = with_baselines(rerun_summary(plan, branches["merit"]), baselines or [], branches)
    sections = [("Forecast before training", forecast_markdown(plan.forecast))] if plan.forecast else []
    md = "\n\n".join(filter(None, [rerun_markdown(summary), baselines_markdown(summary)]))
    sections.append(("Incremental run" if plan.mode == "incremental" else "Rerun mode", md))
    if diagnostics is not None:
        sections.append(("Merge-readiness diagnostics", readiness_markdown(diagnostics)))
    return {"sections": sections,
            "extra": {**extra, "rerun": summary, "forecast": plan.forecast, "diagnostics": diagnostics}}
