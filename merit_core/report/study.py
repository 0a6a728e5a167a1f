"""The study report (docs/study.md): per-seed numbers, means ± standard deviations,
paired comparisons with confidence intervals and sign tests stated in words, budget
(steps, tokens, wall time), displacement, per-benchmark and per-source bars with error
bars, the conflict heat map and PCA scatter. Written as report.md
(templates/study.md.j2), report.json and PNGs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from merit_core.benchmarks import BENCH_AVG, BenchmarkSuite
from merit_core.config import MeritConfig
from merit_core.refs import ConflictMatrix, MixtureRef, Partition, StageTiming
from merit_core.report.plots import (
    BENCH_PLOT,
    HEATMAP,
    HELDOUT_PLOT,
    plot_bars,
    plot_conflict,
    plot_pca,
)
from merit_core.report.render import render
from merit_core.split import conflict_structure
from merit_core.stats import mean_std
from merit_core.study import (
    Metric,
    ModelResult,
    Seed,
    benchmark_metrics,
    budget_rows,
    comparisons,
    headline_metrics,
    per_seed,
    summarise_study,
)

MAIN_METRICS = ("bench_acc", "heldout_loss")
"""Metrics whose comparisons open the report (out-of-mixture accuracy, in-mixture loss)."""

Stats = dict | None
"""``{"values", "mean", "std"}`` of one model and metric over seeds, None without a value."""


def _clean(obj):
    """NaN -> None, recursively (report.json stays strict JSON)."""
    if isinstance(obj, float):
        return None if math.isnan(obj) else obj
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def conflict_structure_of(conflict: ConflictMatrix, partitions: Mapping[int, Partition],
                          n_random: int = 1000) -> dict:
    """:func:`merit_core.split.conflict_structure` of the study's C and PCA partitions
    (source weights as the split balanced them; 1 per source without a partition)."""
    names = conflict.names
    first = next(iter(partitions.values()), None)
    w = np.array([first.weights.get(n, 1.0) for n in names]) if first else np.ones(len(names))
    index = {n: i for i, n in enumerate(names)}
    groups = {r: [[index[n] for n in g] for g in p.groups] for r, p in partitions.items()}
    return conflict_structure(np.asarray(conflict.matrix), w, groups, n_random=n_random)


def _model_stats(labels: Sequence[str], base: ModelResult | None, summary: dict,
                 metrics: Sequence[Metric]) -> dict[str, dict[str, Stats]]:
    """label -> metric name -> stats over seeds; θ(0) (``base``) has its one value."""
    out: dict[str, dict[str, Stats]] = {}
    for label in labels:
        if label == "base":
            values = {m.name: m.get(base) if base else None for m in metrics}
            out[label] = {k: None if v is None else {"values": [v], "mean": v, "std": math.nan}
                          for k, v in values.items()}
        else:
            got = summary["models"].get(label, {})
            out[label] = {m.name: got.get(m.name) for m in metrics}
    return out


def _seed_tables(results: Sequence[ModelResult], labels: Sequence[str], metrics: Sequence[Metric],
                 seeds: Sequence[Seed], stats: dict[str, dict[str, Stats]]) -> list[dict]:
    """Per metric with a value: {title, digits, rows: [{label, per_seed, stats, note}]}."""
    tables = []
    for m in metrics:
        rows = []
        for label in labels:
            vals = per_seed(results, label, m)
            if not vals or all(v is None for v in vals):
                continue
            if label == "base":
                rows.append({"label": label, "per_seed": [vals[0]] * len(seeds), "stats": stats[label][m.name],
                             "note": " (θ(0), no seed)"})
            else:
                rows.append({"label": label, "per_seed": vals, "stats": stats[label][m.name], "note": ""})
        if rows:
            tables.append({"title": m.title, "digits": 2 if m.name == "displacement" else 3, "rows": rows})
    return tables


def _benchmark_section(out: Path, suite: BenchmarkSuite, labels: Sequence[str], bench_metrics: Sequence[Metric],
                       avg: Metric, stats: dict[str, dict[str, Stats]]) -> list[dict] | None:
    """Plot the benchmark bars; the table rows {info, stats per model}; None without benchmarks."""
    if not suite.benchmarks:
        return None
    bars: dict[str, dict[str, tuple[float, float]]] = {}
    for label in labels:
        bars[label] = {}
        for m in [*bench_metrics, avg]:
            s = stats[label][m.name]
            if s is not None:
                bars[label][BENCH_AVG if m is avg else m.title] = (s["mean"], s["std"])
    plot_bars(bars, out / BENCH_PLOT, ylabel="accuracy", title="out-of-mixture benchmarks (mean ± std over seeds)")
    return [{"info": b, "stats": [stats[label][m.name] for label in labels]}
            for b, m in zip(suite.benchmarks, bench_metrics)]


def _heldout_section(out: Path, results: Sequence[ModelResult], labels: Sequence[str],
                     mixture: MixtureRef) -> list[tuple[str, list[tuple[float, float]]]]:
    """Plot the per-source held-out loss bars; the table rows (source, (mean, std) per model)."""
    bars: dict[str, dict[str, tuple[float, float]]] = {}
    for label in labels:
        rs = [r for r in results if r.label == label]
        bars[label] = {}
        for s in mixture.names:
            vals = [next((row["loss"] for row in r.heldout["rows"] if row["source"] == s), None) for r in rs]
            vals = [v for v in vals if v is not None]
            if vals:
                bars[label][s] = mean_std(vals)
    plot_bars(bars, out / HELDOUT_PLOT, ylabel="nats / answer token",
              title="in-mixture held-out loss per source (mean ± std over seeds)")
    nan = (math.nan, math.nan)
    return [(s, [bars[label].get(s, nan) for label in labels]) for s in mixture.names]


def _partition_section(out: Path, conflict: ConflictMatrix, partitions: Mapping[int, Partition]) -> list[dict]:
    """Plot the heat map and one PCA scatter per r; [{r, partition, png name or None}]."""
    plot_conflict(conflict, out / HEATMAP)
    rows = []
    for r, p in partitions.items():
        png = plot_pca(conflict, p, out / f"pca_groups_r{r}.png")
        rows.append({"r": r, "partition": p, "png": png.name if png else None})
    return rows


def _markdown(out: Path, *, study_id: str, config: MeritConfig, seeds: Sequence[Seed], mixture: MixtureRef,
              suite: BenchmarkSuite, conflict: ConflictMatrix, partitions: Mapping[int, Partition],
              random_partitions: Mapping[str, Partition], results: Sequence[ModelResult],
              timings: Sequence[StageTiming], environments: Mapping[int, dict] | None, metrics: Sequence[Metric],
              summary: dict, structure: dict, budget: Mapping[str, dict]) -> str:
    """Draw the plots into ``out``; render templates/study.md.j2. ``metrics``: the headline
    metrics, then the per-benchmark ones (``bench:<name>``)."""
    head_metrics = [m for m in metrics if not m.name.startswith("bench:")]
    bench_metrics = [m for m in metrics if m.name.startswith("bench:")]
    base = next((r for r in results if r.label == "base"), None)
    labels = list(dict.fromkeys(r.label for r in results))
    stats = _model_stats(labels, base, summary, metrics)
    comps = summary["comparisons"]
    avg = next(m for m in head_metrics if m.name == "bench_acc")
    return render(
        "study.md.j2", study_id=study_id, seeds=seeds, mixture=mixture, suite=suite, epochs=config.train.epochs,
        trained=[lab for lab in labels if lab != "base"], labels=labels, confidence=config.study.confidence,
        main=[c for c in comps if c["metric_key"] in MAIN_METRICS], structure=structure,
        summary_rows=[{"label": label, "stats": stats[label],
                       "budget": {k: budget.get(label, {}).get(k) for k in ("steps", "trained_tokens", "train_wall_s")}}
                      for label in labels],
        comparisons=[c for c in comps if not c["metric_key"].startswith("bench:")],
        bench_comparisons=[c for c in comps if c["metric_key"].startswith("bench:")],
        seed_tables=_seed_tables(results, labels, head_metrics, seeds, stats),
        bench_rows=_benchmark_section(out, suite, labels, bench_metrics, avg, stats), bench_plot=BENCH_PLOT,
        heldout_rows=_heldout_section(out, results, labels, mixture), heldout_plot=HELDOUT_PLOT,
        budget=budget, partitions=_partition_section(out, conflict, partitions), heatmap=HEATMAP,
        random_partitions=random_partitions, environments=sorted((environments or {}).items()), timings=timings,
    )


def write_study_report(
    out_dir: str | Path,
    *,
    study_id: str,
    config: MeritConfig,
    seeds: Sequence[Seed],
    mixture: MixtureRef,
    suite: BenchmarkSuite,
    conflict: ConflictMatrix,
    partitions: Mapping[int, Partition],
    random_partitions: Mapping[str, Partition],
    results: Sequence[ModelResult],
    timings: Sequence[StageTiming] = (),
    environments: Mapping[int, dict] | None = None,
) -> dict:
    """Write report.md, report.json and PNGs of a study into ``out_dir``; return the JSON dict.

    Args:
        seeds: the study's repetitions. partitions: r -> PCA partition.
        random_partitions: ``"<seed>/r<r>"`` -> random partition of that seed.
        results: one :class:`ModelResult` per (model, seed), plus ``base`` (seed None).
        environments: seed index -> where it ran (:func:`merit_core.pipeline.study.environment`).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = headline_metrics() + benchmark_metrics(suite.names)
    summary = summarise_study([r for r in results if r.seed is not None], comparisons(config), metrics,
                              config.study.confidence)
    structure = conflict_structure_of(conflict, partitions)
    budget = budget_rows(results)
    text = _markdown(out, study_id=study_id, config=config, seeds=seeds, mixture=mixture, suite=suite,
                     conflict=conflict, partitions=partitions, random_partitions=random_partitions, results=results,
                     timings=timings, environments=environments, metrics=metrics, summary=summary,
                     structure=structure, budget=budget)
    (out / "report.md").write_text(text)
    data = _clean({
        "study_id": study_id,
        "seeds": [asdict(s) for s in seeds],
        "models": list(dict.fromkeys(r.label for r in results)),
        "summary": summary,
        "budget": budget,
        "results": [r.model_dump() for r in results],
        "benchmarks": suite.model_dump(),
        "mixture": mixture.model_dump(),
        "conflict": conflict.model_dump(),
        "partitions": {str(r): p.model_dump() for r, p in partitions.items()},
        "random_partitions": {k: p.model_dump() for k, p in random_partitions.items()},
        "timings": [t.model_dump() for t in timings],
        "conflict_structure": structure,
        "environments": {str(k): v for k, v in (environments or {}).items()},
        "config": config.model_dump(mode="json"),
    })
    (out / "report.json").write_text(json.dumps(data, indent=2))
    return data
