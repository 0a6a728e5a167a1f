"""The run report: per-source held-out metrics of θ(0), joint, MERIT and random split;
the conflict matrix as a heat map; the sources in PCA coordinates coloured by group;
wall time of each stage. Written as report.md, report.json and PNGs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from merit_core.artifacts import BranchCheckpoint, ConflictReport, MixtureManifest, Partition, StageTiming

HEATMAP = "conflict_matrix.png"
PCA_PLOT = "pca_groups.png"


def plot_conflict(report: ConflictReport, path: str | Path) -> Path:
    """Heat map of the T×T conflict matrix (cosine similarities of g̃_t) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    C = np.asarray(report.matrix)
    t = len(report.names)
    fig, ax = plt.subplots(figsize=(max(4, 0.45 * t + 2), max(3.5, 0.45 * t + 1.5)))
    lim = float(np.max(np.abs(C))) if C.size else 1.0
    im = ax.imshow(C, cmap="RdBu_r", vmin=-lim, vmax=lim)
    ax.set_xticks(range(t), report.names, rotation=90, fontsize=7)
    ax.set_yticks(range(t), report.names, fontsize=7)
    ax.set_title(f"conflict matrix C ({report.kind})")
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_pca(report: ConflictReport, partition: Partition, path: str | Path) -> Path | None:
    """Sources in the first two PCA coordinates of C, coloured by MERIT group (PNG).

    With r = 1 the second axis is zero. Returns None when the partition has no scores.
    """
    if not partition.scores:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    S = np.asarray(partition.scores, dtype=float)
    if S.ndim == 1 or S.shape[1] == 1:
        S = np.column_stack([S.reshape(-1), np.zeros(S.shape[0])])
    group_of = {n: k for k, g in enumerate(partition.groups) for n in g}
    fig, ax = plt.subplots(figsize=(6, 4.5))
    cmap = plt.get_cmap("tab10")
    for i, name in enumerate(report.names):
        k = group_of.get(name, -1)
        ax.scatter(S[i, 0], S[i, 1], color=cmap(k % 10), s=40)
        ax.annotate(name, (S[i, 0], S[i, 1]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    evr = partition.explained_variance_ratio or []
    ax.set_xlabel(f"PC1 ({evr[0]:.0%} var)" if len(evr) > 0 else "PC1")
    ax.set_ylabel(f"PC2 ({evr[1]:.0%} var)" if len(evr) > 1 else "PC2")
    ax.set_title(f"sources by PCA score, coloured by group (K={partition.k})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _mixture_table(mixture: MixtureManifest) -> str:
    lines = [
        "| source | kind | examples | train | held-out | calibration | loss tokens | truncated | dropped |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in mixture.sources:
        lines.append(
            f"| {s.name} | {s.kind} | {s.examples} | {s.train} | {s.heldout} | {s.calibration} | "
            f"{s.loss_tokens} | {s.truncated} | {s.dropped} |"
        )
    return "\n".join(lines)


def _metrics_table(tables: Mapping[str, dict], metric: str, digits: int = 3) -> str | None:
    models = list(tables)
    rows: dict[str, dict[str, float | None]] = {}
    for m in models:
        for r in tables[m]["rows"] + [tables[m]["mean"]]:
            rows.setdefault(r["source"], {})[m] = r.get(metric)
    if all(v is None for r in rows.values() for v in r.values()):
        return None
    head = "| source | " + " | ".join(models) + " |"
    sep = "|---|" + "---:|" * len(models)
    body = []
    for src, vals in rows.items():
        cells = ["–" if vals.get(m) is None else f"{vals[m]:.{digits}f}" for m in models]
        name = f"**{src}**" if src == "mean" else src
        body.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join([head, sep, *body])


def metrics_markdown(tables: Mapping[str, dict]) -> str:
    """Markdown tables (one per metric) comparing models per source and on the mean."""
    parts = []
    for metric, title in [
        ("loss", "Held-out answer cross-entropy (nats/token, lower is better)"),
        ("exact_match", "Exact match of greedy answers (higher is better)"),
        ("mc_accuracy", "Multiple-choice accuracy by option log-likelihood (higher is better)"),
    ]:
        t = _metrics_table(tables, metric)
        if t:
            parts.append(f"### {title}\n\n{t}")
    return "\n\n".join(parts)


def write_report(
    out_dir: str | Path,
    *,
    run_id: str,
    mixture: MixtureManifest,
    conflict: ConflictReport,
    partition: Partition,
    tables: Mapping[str, dict],
    branches: Mapping[str, Sequence[BranchCheckpoint]],
    timings: Sequence[StageTiming],
    extra: Mapping | None = None,
    benchmarks: Mapping[str, dict] | None = None,
) -> dict:
    """Write report.md, report.json and the PNGs into ``out_dir``; return the JSON dict.

    ``benchmarks``: model -> EvalTable dict on the out-of-mixture benchmarks (optional)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot_conflict(conflict, out / HEATMAP)
    pca_png = plot_pca(conflict, partition, out / PCA_PLOT)
    evr = partition.explained_variance_ratio or []
    md = [f"# MERIT run `{run_id}`", ""]
    md += ["## Results", "", metrics_markdown(tables), ""]
    md += [
        "In-mixture held-out loss favours joint training by design (the merged model stays",
        "closer to θ(0)); the paper's claim is about out-of-mixture benchmarks.",
        "",
    ]
    if benchmarks:
        md += ["## Out-of-mixture benchmarks", "", "Evaluation-only tasks (eval.benchmarks) that no model trained on.", ""]
        for metric, title in [("mc_accuracy", "Multiple-choice accuracy by option log-likelihood"),
                              ("mc_accuracy_norm", "Length-normalised multiple-choice accuracy"),
                              ("exact_match", "Exact match of greedy answers")]:
            t = _metrics_table(benchmarks, metric)
            if t:
                md += [f"### {title}", "", t, ""]
    md += ["## Partition", "", f"method: {partition.method}, K = {partition.k}"]
    if evr:
        md.append("explained variance of the PCs: " + ", ".join(f"PC{i + 1} {v:.1%}" for i, v in enumerate(evr)))
    md.append("")
    for k, g in enumerate(partition.groups):
        md.append(f"- group {k}: {', '.join(g)}")
    md += ["", f"![conflict matrix]({HEATMAP})", ""]
    if pca_png:
        md += [f"![PCA]({PCA_PLOT})", ""]
    md += ["## Branches", "", ("| model | branch | sources | examples | steps | trained tokens N_k | train loss | "
                               "wall s | real tokens |"),
           "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for label, bs in branches.items():
        for b in bs:
            real = "–" if b.real_token_fraction is None else f"{b.real_token_fraction:.1%}"
            real += " (packed)" if b.packed else ""
            md.append(f"| {label} | {b.index} | {', '.join(b.sources)} | {b.examples} | {b.steps} | "
                      f"{b.trained_tokens} | {b.train_loss:.3f} | {b.wall_s:.1f} | {real} |")
    md += ["", "Real tokens: example tokens / all trained positions (the rest is padding).", ""]
    md += ["", "## Mixture", "", _mixture_table(mixture), ""]
    md += ["## Stage wall time", "", "| stage | seconds |", "|---|---:|"]
    md += [f"| {t.stage} | {t.seconds:.1f} |" for t in timings]
    md.append("")
    text = "\n".join(md)
    (out / "report.md").write_text(text)
    data = {
        "run_id": run_id,
        "mixture": mixture.model_dump(),
        "conflict": conflict.model_dump(),
        "partition": partition.model_dump(),
        "metrics": dict(tables),
        "branches": {k: [b.model_dump() for b in v] for k, v in branches.items()},
        "timings": [t.model_dump() for t in timings],
        "benchmarks": dict(benchmarks or {}),
        **(dict(extra) if extra else {}),
    }
    (out / "report.json").write_text(json.dumps(data, indent=2))
    return data
