"""Flow ``merit`` (deployment ``merit/full``): Algorithm 1 of arXiv 2606.01717, top to bottom.

Conflict estimation -> PCA split into K = 2^r groups -> one branch per group, trained with no
communication (flows/branches.py) -> one-shot token-weighted merge -> evaluation and report.
Every step is a Prefect task (tasks/) around one stage of merit_core.pipeline."""

from prefect import flow, get_run_logger

from flows.baselines import train_baselines
from flows.common import merit_run_name, resolve_config, run_id, stage_timer, tracked
from flows.gradients import run_source_gradients
from flows.incremental import plan_split, readiness, report_sections, train_planned_branches
from merit_core.config import MeritConfig
from tasks import (
    conflict_task,
    evaluate_benchmarks_task,
    evaluate_task,
    merge_task,
    prepare_base_task,
    report_task,
    resolve_benchmarks_task,
    resolve_mixture_task,
)
from tasks.resume import claim_run_task, finish_run_task


@flow(name="merit", flow_run_name=merit_run_name, log_prints=True)
def merit(config_path: str | None = None, overrides: list[str] | None = None,
          config: MeritConfig | None = None) -> dict:
    """Run MERIT end to end; return the report (also in the store). The flow run is named
    after the run id (``merit-quick-1a2b3c4d``); its config is the ``merit-config`` artifact.

    Args:
        config_path: MeritConfig YAML file, e.g. configs/quick.yaml, read when the run
            starts (schedules and triggers run the file's current sources). It wins: when
            set, the config form is ignored (the run log says so). Leave empty to use the form.
        overrides: key.path=value strings applied on top of config_path or the form, like
            `merit run --set`, e.g. split.r=3 or run.branch_deployment=merit-branch/docker-gpu.
        config: The whole config as a form; used only when config_path is empty.
    """
    log = get_run_logger()
    config, config_source = resolve_config(config_path, overrides, config)
    stage = stage_timer(timings := [])

    with stage("prepare base θ(0)"):
        base = prepare_base_task(config)
    with stage("resolve mixture"):
        mixture = resolve_mixture_task(config, base)
    run = claim_run_task(config, base, mixture, run_id(config.run.name))  # or a dead run of this config (resume)

    # 1. Conflict estimation: g_t at θ(0) per source (cached), cosine matrix C.
    with stage("source gradients"):
        sketches = run_source_gradients(config, base, mixture)  # conflict.execution: local|processes|deployment
        log.info("source gradients: %d computed, %d reused from cache",
                 sum(not s.cached for s in sketches), sum(s.cached for s in sketches))
    with stage("conflict matrix"):
        conflict = conflict_task(config, sketches)

    # 2-3. PCA of C, weighted-median split into K = 2^r groups, or into a finished run's (run.rerun).
    with stage("split"):
        plan = plan_split(config, base, mixture, conflict, sketches, run)  # with a forecast of partitions
    # 4. One branch per group from θ(0), no communication; only changed groups in an incremental run.
    with stage("train MERIT branches"):
        branches = {"merit": train_planned_branches(config, base, mixture, plan, run)}
    with stage("merge"):  # 5. One-shot token-weighted merge.
        models = {"base": base, "merit": merge_task(config, base, branches["merit"], run, "merit")}

    # Baselines: joint training (K = 1, same data) and a random split merged the same way; an incremental
    # run reuses the previous run's baseline branches whose sources did not change.
    baselines = train_baselines(config, base, mixture, conflict, plan, run, stage)
    branches |= baselines.branches
    models |= baselines.models

    # 6. Evaluate every model on the held-out part of every source, and on out-of-mixture
    # benchmarks (eval.benchmarks) that no branch trained on.
    with stage("evaluate"):
        tables = {label: evaluate_task(config, ref.model_copy(update={"label": label}), mixture)
                  for label, ref in tracked(models.items(), "evaluate (held-out)")}
    benchmarks = {}
    if config.eval.benchmarks:
        with stage("evaluate benchmarks"):
            suite = resolve_benchmarks_task(config, base)
            benchmarks = {label: evaluate_benchmarks_task(config, ref.model_copy(update={"label": label}), suite)
                          for label, ref in models.items()}

    diagnostics = readiness(config, base, models, branches["merit"], mixture, stage)  # eval.diagnostics
    extra = {"models": {k: v.model_dump() for k, v in models.items()}, "config_source": config_source}
    report = report_task(config, run, mixture=mixture, conflict=conflict, partition=plan.partition, tables=tables,
                         branches=branches, timings=timings, benchmarks=benchmarks,
                         **report_sections(plan, branches, diagnostics, extra, baselines.plans))
    finish_run_task(config, run)  # its local work directories go
    log.info("report: %s", report["report_uri"])
    return report
