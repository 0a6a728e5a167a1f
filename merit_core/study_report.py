"""The study report (docs/study.md): per-seed numbers, means ± standard deviations,
paired comparisons with confidence intervals and sign tests stated in words, budget
(steps, tokens, wall time), displacement, per-benchmark and per-source bars with error
bars, the conflict heat map and PCA scatter. Written as report.md, report.json, PNGs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

from merit_core.artifacts import ConflictReport, MixtureManifest, Partition, StageTiming
from merit_core.benchmarks import BENCH_AVG, BenchmarkSuite
from merit_core.config import MeritConfig
from merit_core.report import HEATMAP, _mixture_table, plot_conflict, plot_pca
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

BENCH_PLOT = "benchmarks.png"
HELDOUT_PLOT = "heldout_loss.png"
MAIN_METRICS = ("bench_acc", "heldout_loss")
"""Metrics whose comparisons open the report (out-of-mixture accuracy, in-mixture loss)."""


def _clean(obj):
    """NaN -> None, recursively (report.json stays strict JSON)."""
    if isinstance(obj, float):
        return None if math.isnan(obj) else obj
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _f(x: float | None, digits: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _pm(stats: dict | None, digits: int = 3) -> str:
    if not stats:
        return "–"
    if len(stats["values"]) < 2:
        return _f(stats["mean"], digits)
    return f"{_f(stats['mean'], digits)} ± {_f(stats['std'], digits)}"


def plot_bars(values: Mapping[str, Mapping[str, tuple[float, float]]], path: str | Path, *, ylabel: str,
              title: str) -> Path:
    """Grouped bars: one group per category, one bar per model, error bars = ±1 std over
    seeds. ``values``: model -> category -> (mean, std)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    models = list(values)
    cats = list(dict.fromkeys(c for v in values.values() for c in v))
    width = 0.8 / max(1, len(models))
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(cats) * max(1, len(models)) * 0.35 + 2), 4.5))
    x = np.arange(len(cats))
    cmap = plt.get_cmap("tab10")
    for i, m in enumerate(models):
        mean = [values[m].get(c, (np.nan, np.nan))[0] for c in cats]
        err = [0.0 if not np.isfinite(values[m].get(c, (0, np.nan))[1]) else values[m][c][1] for c in cats]
        ax.bar(x + (i - (len(models) - 1) / 2) * width, mean, width, yerr=err, capsize=2, label=m, color=cmap(i % 10))
    ax.set_xticks(x, cats, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def conflict_structure_of(conflict: ConflictReport, partitions: Mapping[int, Partition],
                          n_random: int = 1000) -> dict:
    """:func:`merit_core.split.conflict_structure` of the study's C and PCA partitions
    (source weights as the split balanced them)."""
    import numpy as np

    from merit_core.split import conflict_structure

    names = conflict.names
    first = next(iter(partitions.values()), None)
    w = np.array([first.weights.get(n, 1.0) for n in names]) if first else np.ones(len(names))
    index = {n: i for i, n in enumerate(names)}
    groups = {r: [[index[n] for n in g] for g in p.groups] for r, p in partitions.items()}
    return conflict_structure(np.asarray(conflict.matrix), w, groups, n_random=n_random)


def conflict_structure_markdown(structure: dict) -> list[str]:
    """The report's "Conflict structure" section."""
    md = ["## Conflict structure", ""]
    off = structure.get("offdiag")
    md.append(f"- Off-diagonal cosines C_ij: {structure['negative_share']:.1%} negative"
              + (f"; min {off['min']:+.3f}, median {off['median']:+.3f}, max {off['max']:+.3f}." if off else "."))
    evr = structure["explained_variance_ratio"]
    md.append("- Explained variance of the PCs of column-centred C: "
              + ", ".join(f"PC{i + 1} {v:.1%}" for i, v in enumerate(evr)) + ".")
    for r, sp in structure["splits"].items():
        md.append(f"- MERIT-{r}D (K = {sp['k']}) split score {sp['score']:.3f} (share of the gradient scatter "
                  f"between groups) against {sp['random_mean']:.3f} ± {sp['random_std']:.3f} for "
                  f"{sp['n_random']} random balanced splits; it beats {sp['beats_random']:.1%} of them.")
    md += ["", ("A split can only help where the sources' gradients disagree: negative cosines, a few dominant "
                "principal components, and a PCA split that puts much more of the gradient scatter between "
                "branches than a random split does (merit_core.split.split_score)."), ""]
    return md


def _seed_table(results: Sequence[ModelResult], labels: Sequence[str], metric: Metric, seeds: Sequence[Seed],
                summary: dict, digits: int = 3) -> str:
    head = "| model | " + " | ".join(f"seed {s.index}" for s in seeds) + " | mean ± std |"
    lines = [head, "|---|" + "---:|" * (len(seeds) + 1)]
    for label in labels:
        vals = per_seed(results, label, metric)
        if not vals or all(v is None for v in vals):
            continue
        if label == "base":
            cells = [_f(vals[0], digits)] * len(seeds) + [_f(vals[0], digits) + " (θ(0), no seed)"]
        else:
            cells = [_f(v, digits) for v in vals] + [_pm(summary["models"].get(label, {}).get(metric.name), digits)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _comparison_table(comps: Sequence[dict], digits: int = 3) -> str:
    lines = ["| comparison | metric | mean diff | std | CI | seeds +/−/0 | sign p | beyond noise? |",
             "|---|---|---:|---:|---|---:|---:|---|"]
    for c in comps:
        ci = f"[{_f(c['ci_low'], digits)}, {_f(c['ci_high'], digits)}]"
        noise = "**yes**" if c["exceeds_noise"] else "no"
        if c["n"] < 2:
            noise = "n/a (1 seed)"
        lines.append(f"| {c['model']} − {c['baseline']} | {c['metric']} | {c['mean_diff']:+.{digits}f} | "
                     f"{_f(c['std_diff'], digits)} | {ci} | {c['positives']}/{c['negatives']}/{c['ties']} | "
                     f"{c['sign_p']:.3g} | {noise} |")
    return "\n".join(lines)


def write_study_report(
    out_dir: str | Path,
    *,
    study_id: str,
    config: MeritConfig,
    seeds: Sequence[Seed],
    mixture: MixtureManifest,
    suite: BenchmarkSuite,
    conflict: ConflictReport,
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
    conf = config.study.confidence
    head_metrics = headline_metrics()
    bench_metrics = benchmark_metrics(suite.names)
    pairs = comparisons(config)
    summary = summarise_study([r for r in results if r.seed is not None], pairs, head_metrics + bench_metrics, conf)
    base = next((r for r in results if r.label == "base"), None)
    labels = list(dict.fromkeys(r.label for r in results))
    trained = [lab for lab in labels if lab != "base"]
    n = len(seeds)
    md = [f"# MERIT study `{study_id}`", ""]
    md += [
        (f"{n} seed{'s' if n != 1 else ''} (data-order seeds `train.seed` = "
        f"{', '.join(str(s.train_seed) for s in seeds)}; random-split seeds `split.seed` = "
        f"{', '.join(str(s.split_seed) for s in seeds)}); {len(mixture.sources)} training sources; "
        f"{len(suite.benchmarks)} out-of-mixture benchmarks; models per seed: {', '.join(trained)}. "
        f"Every model trains {config.train.epochs:g} epoch(s) over the same mixture (budget-matched)."),
        "",
    ]

    # -- what it says
    main = [c for c in summary["comparisons"] if c["metric_key"] in MAIN_METRICS]
    md += ["## What the study says", ""]
    md += [f"- {c['verdict']}." for c in main] or ["- (no comparison: too few models or metrics)"]
    md += ["", (f"\"Beyond the noise\" means the {conf:.0%} Student-t confidence interval of the mean paired "
           "difference over seeds excludes 0. The exact two-sided sign test is reported beside it; with "
           f"{n} seeds its smallest possible p is {min(1.0, 2 / 2 ** n):.3g}."), ""]

    # -- conflict structure: is there anything to split on?
    structure = conflict_structure_of(conflict, partitions)
    md += conflict_structure_markdown(structure)

    # -- summary table
    def cell(label: str, name: str, digits: int = 3) -> str:
        if label == "base":
            m = next(m for m in head_metrics if m.name == name)
            return _f(m.get(base), digits) if base else "–"
        return _pm(summary["models"].get(label, {}).get(name), digits)

    budget = budget_rows(results)
    md += ["## Summary (mean ± std over seeds)", "",
           ("| model | bench acc | bench acc (norm) | held-out loss | held-out EM | held-out MC acc | "
           "||θ − θ(0)|| | steps | trained tokens | train wall s |"),
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label in labels:
        b = budget.get(label, {})
        md.append(f"| {label} | {cell(label, 'bench_acc')} | {cell(label, 'bench_acc_norm')} | "
                  f"{cell(label, 'heldout_loss')} | {cell(label, 'heldout_exact_match')} | "
                  f"{cell(label, 'heldout_mc_accuracy')} | {cell(label, 'displacement', 2)} | "
                  f"{_f(b.get('steps'), 0)} | {_f(b.get('trained_tokens'), 0)} | {_f(b.get('train_wall_s'), 0)} |")
    md += ["", ("Benchmark accuracy: multiple-choice accuracy by option log-likelihood (length-normalised: "
           "log-likelihood per UTF-8 byte), exact match for short-answer benchmarks; mean over benchmarks. "
           "Held-out: in-mixture examples of the training sources."), ""]

    # -- paired comparisons
    md += ["## Paired comparisons (model − baseline, per seed)", "",
           ("Loss: negative is better for the model. Accuracy: positive is better. Displacement: no better "
           "direction (the paper expects the merged model closer to θ(0))."), "",
           _comparison_table([c for c in summary["comparisons"] if not c["metric_key"].startswith("bench:")]), ""]
    md += ["### In words", ""]
    md += [f"- {c['verdict']}." for c in summary["comparisons"] if not c["metric_key"].startswith("bench:")]
    md.append("")

    # -- per-seed numbers
    md += ["## Per-seed numbers", ""]
    for m in head_metrics:
        t = _seed_table(results, labels, m, seeds, summary, 2 if m.name == "displacement" else 3)
        if t.count("\n") > 1:
            md += [f"### {m.title}", "", t, ""]

    # -- benchmarks
    if suite.benchmarks:
        bars: dict[str, dict[str, tuple[float, float]]] = {}
        for label in labels:
            bars[label] = {}
            for m in bench_metrics + [next(m for m in head_metrics if m.name == "bench_acc")]:
                cat = BENCH_AVG if m.name == "bench_acc" else m.title
                if label == "base":
                    v = m.get(base) if base else None
                    if v is not None:
                        bars[label][cat] = (v, float("nan"))
                elif m.name in summary["models"].get(label, {}):
                    s = summary["models"][label][m.name]
                    bars[label][cat] = (s["mean"], s["std"])
        plot_bars(bars, out / BENCH_PLOT, ylabel="accuracy", title="out-of-mixture benchmarks (mean ± std over seeds)")
        md += ["## Out-of-mixture benchmarks", "", f"![benchmarks]({BENCH_PLOT})", "",
               "| benchmark | task | examples | multiple choice | " + " | ".join(labels) + " |",
               "|---|---|---:|---:|" + "---:|" * len(labels)]
        for b, m in zip(suite.benchmarks, bench_metrics):
            cells = []
            for label in labels:
                if label == "base":
                    cells.append(_f(m.get(base)) if base else "–")
                else:
                    cells.append(_pm(summary["models"].get(label, {}).get(m.name)))
            md.append(f"| {b.name} | {b.kind} {b.task} | {b.examples} | {b.multiple_choice} | " + " | ".join(cells) + " |")
        md += ["", "### Per-benchmark paired comparisons", "",
               _comparison_table([c for c in summary["comparisons"] if c["metric_key"].startswith("bench:")]), ""]

    # -- in-mixture per source
    loss_bars: dict[str, dict[str, tuple[float, float]]] = {}
    from merit_core.study import mean_std

    for label in labels:
        rs = [r for r in results if r.label == label]
        loss_bars[label] = {}
        for s in mixture.names:
            vals = [next((row["loss"] for row in r.heldout["rows"] if row["source"] == s), None) for r in rs]
            vals = [v for v in vals if v is not None]
            if vals:
                loss_bars[label][s] = mean_std(vals)
    plot_bars(loss_bars, out / HELDOUT_PLOT, ylabel="nats / answer token",
              title="in-mixture held-out loss per source (mean ± std over seeds)")
    md += ["## In-mixture held-out loss per source", "", f"![held-out loss]({HELDOUT_PLOT})", "",
           "| source | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for s in mixture.names:
        cells = []
        for label in labels:
            mean, std = loss_bars[label].get(s, (float("nan"), float("nan")))
            cells.append(_f(mean) if math.isnan(std) else f"{_f(mean)} ± {_f(std)}")
        md.append(f"| {s} | " + " | ".join(cells) + " |")
    md.append("")

    # -- budget
    md += ["## Budget (mean per seed)", "",
           ("Joint training and every split see each training example the same number of times "
           f"(train.epochs = {config.train.epochs:g}); steps differ only by partial last batches per branch."), "",
           "| model | branches | training examples | optimizer steps | trained tokens | same tokens as joint | train wall s |",
           "|---|---:|---:|---:|---:|---|---:|"]
    for label, b in budget.items():
        same = {True: "yes", False: "**no**", None: "–"}[b["same_tokens_as_joint"]]
        md.append(f"| {label} | {b['branches']} | {_f(b['examples'], 0)} | {_f(b['steps'], 0)} | "
                  f"{_f(b['trained_tokens'], 0)} | {same} | {_f(b['train_wall_s'], 0)} |")
    md.append("")

    # -- partitions
    plot_conflict(conflict, out / HEATMAP)
    md += ["## Partitions", "", f"![conflict matrix]({HEATMAP})", ""]
    for r, p in partitions.items():
        png = plot_pca(conflict, p, out / f"pca_groups_r{r}.png")
        evr = p.explained_variance_ratio or []
        md += [f"### MERIT-{r}D (K = {p.k})", ""]
        if evr:
            md.append("explained variance of the PCs: " + ", ".join(f"PC{i + 1} {v:.1%}" for i, v in enumerate(evr)))
            md.append("")
        md += [f"- group {k}: {', '.join(g)}" for k, g in enumerate(p.groups)]
        md.append("")
        if png:
            md += [f"![PCA r={r}]({png.name})", ""]
    if random_partitions:
        md += ["### Random splits", ""]
        md += [f"- {key}: " + " | ".join(", ".join(g) for g in p.groups) for key, p in random_partitions.items()]
        md.append("")

    md += ["## Mixture", "", _mixture_table(mixture), ""]
    if environments:
        md += ["## Where the seeds ran", "", "| seed | device | torch | transformers | CUDA | host |",
               "|---:|---|---|---|---|---|"]
        md += [f"| {i} | {e.get('device', '–')} | {e.get('torch', '–')} | {e.get('transformers', '–')} | "
               f"{e.get('cuda') or '–'} | {e.get('host', '–')} |" for i, e in sorted(environments.items())]
        md.append("")
    if timings:
        md += ["## Stage wall time", "", "| stage | seconds |", "|---|---:|"]
        md += [f"| {t.stage} | {t.seconds:.1f} |" for t in timings]
        md.append("")
    (out / "report.md").write_text("\n".join(md))
    data = _clean({
        "study_id": study_id,
        "seeds": [asdict(s) for s in seeds],
        "models": labels,
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
