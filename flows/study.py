"""The MERIT study as a Prefect flow (docs/study.md): does splitting and merging help on
this mixture, beyond the seed-to-seed noise?

``merit-study`` reads like the experiment protocol:

1. θ(0), the training mixture and the out-of-mixture benchmark suite (evaluation only;
   a benchmark overlapping a training source is refused when the config is read);
2. conflict estimation once — source gradients come from the store's cache — and the
   PCA partition for every r of ``study.r_values``;
3. for every seed: joint training (K = 1), MERIT-rD (the PCA groups, merged with token
   weights and, on the same branches, with uniform weights) and a random split into
   the same K groups drawn with this seed — all one epoch over the same data, with
   this seed's data order;
4. every model on held-out and benchmark data, and its displacement ||θ − θ(0)||;
5. the report: per-seed numbers, mean ± std, paired comparisons with t intervals and
   sign tests, budget, plots.

It is composed of the same tasks as the ``merit`` flow (tasks/stages.py) and trains
branches through ``flows.merit.run_branches`` (local, processes or deployment).
"""


from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.merit import resolve_config, run_branches, stage_timer
from merit_core.artifacts import ModelRef, StageTiming
from merit_core.config import MeritConfig
from merit_core.store import safe_key
from merit_core.study import (
    check_study_config,
    merit_label,
    model_result,
    r_values,
    random_label,
    seeds,
    uniform_label,
)
from tasks import (
    conflict_task,
    displacement_task,
    evaluate_benchmarks_task,
    evaluate_task,
    merge_task,
    prepare_base_task,
    resolve_benchmarks_task,
    resolve_mixture_task,
    source_gradient_task,
    split_task,
    study_report_task,
)


def _with(config: MeritConfig, **sections) -> MeritConfig:
    """A copy of ``config`` with fields of some sections replaced, e.g. ``train={"seed": 1}``."""
    return config.model_copy(update={k: getattr(config, k).model_copy(update=v) for k, v in sections.items()})


@flow(name="merit-study", flow_run_name="study-{config.run.name}", log_prints=True)
def merit_study(config: MeritConfig, n_seeds: int | None = None, config_path: str | None = None,
                overrides: list[str] | None = None) -> dict:
    """Train joint, MERIT and random-split models over ``n_seeds`` seeds (default
    ``study.seeds``), evaluate them in and out of the mixture, and report whether the
    differences exceed the noise. ``config_path`` / ``overrides`` as in flow ``merit``."""
    log = get_run_logger()
    config = resolve_config(config, config_path, overrides)
    if n_seeds is not None:
        config = _with(config, study={"seeds": n_seeds})
    check_study_config(config)
    study_id = safe_key(config.study.id or f"{config.run.name}-study-{(flow_run.get_id() or 'local')[:8]}")
    log.info("study %s: %d seeds, r in %s", study_id, config.study.seeds, r_values(config))
    timings: list[StageTiming] = []
    stage = stage_timer(timings)

    def evaluate(model: ModelRef, label: str, seed: int | None, branches=(), disp: float | None = None):
        model = model.model_copy(update={"label": label if seed is None else f"{label}-s{seed}"})
        return model_result(label, seed, evaluate_task(config, model, mixture),
                            evaluate_benchmarks_task(config, model, suite), disp, branches)

    # 1. θ(0), the training mixture, the out-of-mixture benchmarks (never trained on).
    with stage("prepare base, mixture, benchmarks"):
        base = prepare_base_task(config)
        mixture = resolve_mixture_task(config, base)
        suite = resolve_benchmarks_task(config, base)

    # 2. Conflict estimation once (source gradients cached in the store); PCA split per r.
    with stage("source gradients, conflict matrix, PCA splits"):
        sketches = [source_gradient_task(config, base, s) for s in mixture.sources]
        conflict = conflict_task(config, sketches)
        partitions = {r: split_task(_with(config, split={"r": r}), conflict, mixture) for r in r_values(config)}

    with stage("evaluate θ(0)"):
        results = [evaluate(base, "base", None)]

    # 3-4. Every seed: joint, MERIT-rD (token-weighted and uniform merge), random split.
    random_partitions = {}
    for seed in seeds(config):
        cfg = _with(config, train={"seed": seed.train_seed}, split={"seed": seed.split_seed})
        run_id = f"{study_id}-s{seed.index}"
        trained: dict[str, tuple[ModelRef, list]] = {}
        with stage(f"seed {seed.index}: train and merge"):
            joint = run_branches(cfg, base, mixture, [mixture.names], run_id, "joint")
            trained["joint"] = (ModelRef(key=joint[0].key, uri=joint[0].uri, label="joint"), joint)
            for r in r_values(config):
                cfg_r = _with(cfg, split={"r": r})
                merit = run_branches(cfg_r, base, mixture, partitions[r].groups, run_id, merit_label(r))
                trained[merit_label(r)] = (merge_task(cfg_r, base, merit, run_id, merit_label(r)), merit)
                if config.study.uniform_merge:
                    uniform = _with(cfg_r, merge={"method": "uniform"})
                    trained[uniform_label(r)] = (merge_task(uniform, base, merit, run_id, uniform_label(r)), merit)
                rnd = split_task(cfg_r, conflict, mixture, strategy="random")
                random_partitions[f"seed {seed.index} / r={r}"] = rnd
                rnd_branches = run_branches(cfg_r, base, mixture, rnd.groups, run_id, random_label(r))
                trained[random_label(r)] = (merge_task(cfg_r, base, rnd_branches, run_id, random_label(r)),
                                            rnd_branches)
        with stage(f"seed {seed.index}: evaluate"):
            disp = displacement_task(config, base, {k: m for k, (m, _) in trained.items()}) \
                if config.study.displacement else {}
            results += [evaluate(m, label, seed.index, b, disp.get(label)) for label, (m, b) in trained.items()]

    # 5. Report: per-seed numbers, mean ± std, paired comparisons, budget, plots.
    report = study_report_task(config, study_id, seeds=seeds(config), mixture=mixture, suite=suite,
                               conflict=conflict, partitions=partitions, random_partitions=random_partitions,
                               results=results, timings=timings)
    log.info("study report: %s", report["report_uri"])
    return report
