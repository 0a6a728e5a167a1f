"""The run report: per-source held-out metrics of θ(0), joint, MERIT and random split;
the conflict matrix as a heat map; the sources in PCA coordinates coloured by group;
wall time of each stage. Written as report.md (templates/run.md.j2), report.json and PNGs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from merit_core.refs import (
    BranchRef,
    ConflictMatrix,
    MixtureRef,
    Partition,
    StageTiming,
)
from merit_core.report.plots import HEATMAP, PCA_PLOT, plot_conflict, plot_pca
from merit_core.report.render import macro, render

HELDOUT_METRICS = (
    ("loss", "Held-out answer cross-entropy (nats/token, lower is better)"),
    ("exact_match", "Exact match of greedy answers (higher is better)"),
    ("mc_accuracy", "Multiple-choice accuracy by option log-likelihood (higher is better)"),
)
"""(EvalRow field, table title) of the in-mixture tables, in report order."""

BENCHMARK_METRICS = (
    ("mc_accuracy", "Multiple-choice accuracy by option log-likelihood"),
    ("mc_accuracy_norm", "Length-normalised multiple-choice accuracy"),
    ("exact_match", "Exact match of greedy answers"),
)
"""(EvalRow field, table title) of the out-of-mixture benchmark tables, in report order."""


def metric_table(tables: Mapping[str, dict], metric: str) -> dict | None:
    """One metric of several models side by side, per source and on the mean row.

    Args:
        tables: model -> EvalTable dict (``rows`` and ``mean``, each row with ``source``).
        metric: an EvalRow field, e.g. ``"loss"``.

    Returns:
        ``{"models": [model, ...], "rows": [(source, [value or None per model]), ...]}``
        (sources in first-seen order, the mean row last), or None when no model has a
        value for ``metric``.
    """
    models = list(tables)
    rows: dict[str, dict[str, float | None]] = {}
    for m in models:
        for r in tables[m]["rows"] + [tables[m]["mean"]]:
            rows.setdefault(r["source"], {})[m] = r.get(metric)
    if all(v is None for r in rows.values() for v in r.values()):
        return None
    return {"models": models, "rows": [(src, [vals.get(m) for m in models]) for src, vals in rows.items()]}


def _sections(tables: Mapping[str, dict], metrics: Sequence[tuple[str, str]]) -> list[tuple[str, dict]]:
    """(title, :func:`metric_table`) of each metric some model has."""
    return [(title, t) for metric, title in metrics if (t := metric_table(tables, metric))]


def metrics_markdown(tables: Mapping[str, dict]) -> str:
    """Markdown tables (one per held-out metric that has values) comparing the models per
    source and on the mean, three decimals, "–" where a model lacks the metric.

    ``tables``: model -> EvalTable dict. Returns "" when no metric has a value.
    """
    out = str(macro("metric_sections")(_sections(tables, HELDOUT_METRICS)))
    notes = [f"**Warning** ({model}): {w}" for model, t in tables.items() for r in t.get("rows", [])
             for w in r.get("warnings", [])]
    return "\n\n".join([out.rstrip(), *notes]) + "\n" if notes else out


def fanout_overhead(branches: Mapping[str, Sequence[BranchRef]]) -> dict | None:
    """The fan-out's overhead summed over every branch with a :class:`~merit_core.refs.BranchTiming`:
    ``{"branches", "wall_s", "train_s", "overhead_s", "fraction"}`` (fraction = overhead /
    wall), or None when no branch has one (e.g. a report built outside a flow)."""
    timed = [b.timing for refs in branches.values() for b in refs if b.timing is not None]
    if not timed:
        return None
    wall, train = sum(t.wall_s for t in timed), sum(t.train_s for t in timed)
    return {"branches": len(timed), "wall_s": wall, "train_s": train, "overhead_s": wall - train,
            "fraction": (wall - train) / wall if wall > 0 else 0.0}


def mixture_table(mixture: MixtureRef) -> str:
    """Markdown table of the mixture: per source its kind and example, split, loss-token,
    truncated and dropped counts."""
    return str(macro("mixture_table")(mixture))


def write_report(
    out_dir: str | Path,
    *,
    run_id: str,
    mixture: MixtureRef,
    conflict: ConflictMatrix,
    partition: Partition,
    tables: Mapping[str, dict],
    branches: Mapping[str, Sequence[BranchRef]],
    timings: Sequence[StageTiming],
    extra: Mapping | None = None,
    benchmarks: Mapping[str, dict] | None = None,
    sections: Sequence[tuple[str, str]] = (),
) -> dict:
    """Write report.md, report.json and the PNGs into ``out_dir``; return the JSON dict.

    Args:
        tables: model -> EvalTable dict on the in-mixture held-out data.
        branches: model -> its branch checkpoints.
        extra: more top-level keys of report.json; its ``config_source`` (where the run's
            config came from, e.g. ``configs/quick.yaml + overrides [split.r=3]``) is also
            shown under the report's title.
        benchmarks: model -> EvalTable dict on the out-of-mixture benchmarks (optional;
            the report's benchmark section appears when it is non-empty).
        sections: more (title, markdown) sections after the partition (forecast, incremental
            run, merge-readiness diagnostics).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot_conflict(conflict, out / HEATMAP)
    pca_png = plot_pca(conflict, partition, out / PCA_PLOT)
    fanout = fanout_overhead(branches)
    text = render(
        "run.md.j2", run_id=run_id, results=_sections(tables, HELDOUT_METRICS),
        benchmarks=_sections(benchmarks, BENCHMARK_METRICS) if benchmarks else None, partition=partition,
        heatmap=HEATMAP, pca_plot=PCA_PLOT if pca_png else None, branches=branches, mixture=mixture, timings=timings,
        fanout=fanout, config_source=(extra or {}).get("config_source"), sections=sections,
    )
    (out / "report.md").write_text(text)
    data = {
        "run_id": run_id,
        "mixture": mixture.model_dump(),
        "conflict": conflict.model_dump(),
        "partition": partition.model_dump(),
        "metrics": dict(tables),
        "branches": {k: [b.model_dump() for b in v] for k, v in branches.items()},
        "timings": [t.model_dump() for t in timings],
        "fanout": fanout,
        "benchmarks": dict(benchmarks or {}),
        **(dict(extra) if extra else {}),
    }
    (out / "report.json").write_text(json.dumps(data, indent=2))
    return data
