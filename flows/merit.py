"""The MERIT pipeline as Prefect 3 flows (Algorithm 1 of arXiv 2606.01717).

``merit`` (deployment ``merit/full``) reads top to bottom like Algorithm 1:
conflict estimation -> PCA split into K = 2^r groups -> one branch per group, trained
with no communication -> one-shot token-weighted merge -> evaluation and report.
``merit-branch`` trains one partition; it is a flow so each branch is its own flow run
(in-process, in its own OS process, or on its own worker through a deployment).
"""


import os

from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run
from prefect.task_runners import ProcessPoolTaskRunner

from merit_core.artifacts import BranchCheckpoint, MixtureManifest, ModelRef, StageTiming
from merit_core.config import MeritConfig, apply_overrides, load_config
from merit_core.store import safe_key
from merit_core.launch import resolve_nproc
from merit_core.pipeline.study import stage_timer as _stage_timer
from merit_core.train import check_train_setup
from tasks import (
    conflict_task,
    evaluate_benchmarks_task,
    evaluate_task,
    merge_task,
    prepare_base_task,
    report_task,
    resolve_benchmarks_task,
    resolve_mixture_task,
    source_gradient_task,
    split_task,
    train_branch_task,
)


def resolve_config(config: MeritConfig, config_path: str | None, overrides: list[str] | None) -> MeritConfig:
    """The run's config: the YAML at ``config_path`` (read when the run starts) if set,
    else ``config``; ``overrides`` (``key.path=value``) applied on top. When branches
    train on this machine, settings it cannot train with fail here
    (:func:`merit_core.train.check_train_setup`), before any stage runs."""
    if config_path:
        config = load_config(config_path, overrides)
        get_run_logger().info("config: %s (%d sources)", config_path, len(config.data.sources))
    elif overrides:
        config = MeritConfig.model_validate(apply_overrides(config.model_dump(mode="json"), overrides))
    if config.run.branch_execution != "deployment":  # branches train here: check now, not after the gradients
        check_train_setup(config.train, resolve_nproc(config.train.nproc_per_node))
    return config


def stage_timer(timings: list[StageTiming]):
    """:func:`merit_core.pipeline.study.stage_timer` logging to the flow run's logger."""
    return _stage_timer(timings, get_run_logger())


@flow(name="merit-branch", flow_run_name="{label}-branch-{index}")
def merit_branch(config: MeritConfig, base: ModelRef, mixture: MixtureManifest, sources: list[str],
                 run_id: str, label: str, index: int) -> BranchCheckpoint:
    """Fine-tune one copy of θ(0) on the union of ``sources`` (spec step 4)."""
    return train_branch_task(config, base, mixture, sources, run_id, label, index)


@task(name="branch-process", task_run_name="branch-process-{label}-{index}")
def _branch_in_process(config: MeritConfig, base: ModelRef, mixture: MixtureManifest, sources: list[str],
                       run_id: str, label: str, index: int) -> BranchCheckpoint:
    return merit_branch(config, base, mixture, sources, run_id, label, index)


def run_branches(config: MeritConfig, base: ModelRef, mixture: MixtureManifest, groups: list[list[str]],
                 run_id: str, label: str) -> list[BranchCheckpoint]:
    """Train one branch per group, independently, as ``config.run.branch_execution`` says."""
    mode = config.run.branch_execution
    args = [dict(config=config, base=base, mixture=mixture, sources=g, run_id=run_id, label=label, index=k)
            for k, g in enumerate(groups)]
    if mode == "local":
        return [merit_branch(**a) for a in args]
    if mode == "processes":
        workers = min(config.run.max_parallel_branches, len(groups))
        if config.train.threads is None:
            per = max(1, (os.cpu_count() or 1) // workers)
            config = config.model_copy(update={"train": config.train.model_copy(update={"threads": per})})
            args = [{**a, "config": config} for a in args]
        with ProcessPoolTaskRunner(max_workers=workers) as runner:
            futures = [runner.submit(_branch_in_process, parameters=a) for a in args]
            return [f.result() for f in futures]
    if mode == "deployment":  # one flow run per branch on the pool's workers (flows/fanout.py)
        from flows.fanout import run_branches_on_deployment

        return run_branches_on_deployment(config, base, mixture, groups, run_id, label)
    raise ValueError(f"run.branch_execution={mode!r}: use 'local', 'processes' or 'deployment'")


@flow(name="merit", flow_run_name="merit-{config.run.name}", log_prints=True)
def merit(config: MeritConfig, config_path: str | None = None, overrides: list[str] | None = None) -> dict:
    """Run MERIT end to end on ``config`` and return the report (also in the store).

    ``config_path``, when set, names a MeritConfig YAML file that replaces ``config``
    (read when the run starts, so deployments, schedules and the
    ``merit.data_source.added`` trigger always run the file's current mixture);
    ``overrides`` are ``key.path=value`` strings applied on top, like ``merit run --set``.
    """
    log = get_run_logger()
    config = resolve_config(config, config_path, overrides)
    run_id = safe_key(f"{config.run.name}-{(flow_run.get_id() or 'local')[:8]}")
    timings: list[StageTiming] = []
    stage = stage_timer(timings)

    with stage("prepare base θ(0)"):
        base = prepare_base_task(config)
    with stage("resolve mixture"):
        mixture = resolve_mixture_task(config, base)

    # 1. Conflict estimation: g_t at θ(0) per source (cached), cosine matrix C.
    with stage("source gradients"):
        sketches = [source_gradient_task(config, base, s) for s in mixture.sources]
        log.info("source gradients: %d computed, %d reused from cache",
                 sum(not s.cached for s in sketches), sum(s.cached for s in sketches))
    with stage("conflict matrix"):
        conflict = conflict_task(config, sketches)

    # 2-3. PCA of C and recursive weighted-median split into K = 2^r groups.
    with stage("split"):
        partition = split_task(config, conflict, mixture)

    # 4. One branch per group from θ(0), no communication between branches.
    with stage("train MERIT branches"):
        branches = {"merit": run_branches(config, base, mixture, partition.groups, run_id, "merit")}
    # 5. One-shot token-weighted merge.
    with stage("merge"):
        models = {"base": base, "merit": merge_task(config, base, branches["merit"], run_id, "merit")}

    # Baselines: joint training (K = 1, same data) and a random split merged the same way.
    if config.baselines.joint:
        with stage("train joint baseline"):
            branches["joint"] = run_branches(config, base, mixture, [mixture.names], run_id, "joint")
            models["joint"] = ModelRef(key=branches["joint"][0].key, uri=branches["joint"][0].uri, label="joint")
    if config.baselines.random_split and partition.k > 1:
        with stage("train random-split baseline"):
            rnd = split_task(config, conflict, mixture, strategy="random")
            branches["random"] = run_branches(config, base, mixture, rnd.groups, run_id, "random")
            models["random"] = merge_task(config, base, branches["random"], run_id, "random")

    # 6. Evaluate every model on the held-out part of every source.
    with stage("evaluate"):
        tables = {label: evaluate_task(config, ref.model_copy(update={"label": label}), mixture)
                  for label, ref in models.items()}

    # Out-of-mixture benchmarks (eval.benchmarks): tasks that no branch trained on.
    benchmarks = {}
    if config.eval.benchmarks:
        with stage("evaluate benchmarks"):
            suite = resolve_benchmarks_task(config, base)
            benchmarks = {label: evaluate_benchmarks_task(config, ref.model_copy(update={"label": label}), suite)
                          for label, ref in models.items()}

    report = report_task(config, run_id, mixture=mixture, conflict=conflict, partition=partition,
                         tables=tables, branches=branches, timings=timings, benchmarks=benchmarks,
                         extra={"models": {k: v.model_dump() for k, v in models.items()}})
    log.info("report: %s", report["report_uri"])
    return report
