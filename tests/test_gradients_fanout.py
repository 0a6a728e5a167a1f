"""The source-gradient stage fanned out (flows/gradients.py, merit_core.fanout): batches
planned by calibration tokens, θ(0) loaded once per batch, and sketches bit-identical to
a sequential one-source-at-a-time run under the same cache keys, in every mode (local,
a real process pool, deployment children faked at the Prefect API only)."""

from __future__ import annotations

import itertools
import json
import logging
import random
from pathlib import Path
from uuid import uuid4

import numpy as np
import pytest
import yaml
from prefect import flow
from prefect.testing.utilities import prefect_test_harness

from merit_core.config import MeritConfig
from merit_core.conflict import make_sketcher
from merit_core.fanout import balanced_batches, threads_per_worker
from merit_core.pipeline import conflict as stage
from merit_core.pipeline.base import prepare_base
from merit_core.pipeline.layout import sketch_key
from merit_core.pipeline.mixture import load_split, resolve_mixture
from merit_core.refs import ModelRef, SketchRef, SourceInfo
from merit_core.store import open_store
from tests.helpers import write_jsonl_sources

REPO = Path(__file__).resolve().parents[1]
# Five sources of different sizes, so the calibration splits differ in tokens.
SIZES = {"alpha": 30, "beta": 12, "gamma": 40, "delta": 20, "epsilon": 16}


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def _config(tmp_path: Path, model_dir: Path, store: str, **conflict) -> MeritConfig:
    specs = []
    for name, n in SIZES.items():
        specs += write_jsonl_sources(tmp_path / "data" / name, [name], n=n)
    return MeritConfig.model_validate({
        "model": {"source": str(model_dir)},
        "data": {"sources": specs, "max_length": 64, "heldout_min": 4, "heldout_fraction": 0.2},
        "conflict": {"calibration_size": 8, "sketch": "countsketch", "sketch_dim": 512, "batch_size": 3,
                     "threads": 1, **conflict},
        "split": {"r": 1},
        "store": {"uri": str(tmp_path / store)},
    })


def _prepared(cfg: MeritConfig):
    store = open_store(cfg.store)
    base = prepare_base(cfg, store)
    return store, base, resolve_mixture(cfg, store, base)


def _arrays(store, refs) -> dict[str, np.ndarray]:
    return {r.source: stage.load_sketch(store, r.key) for r in refs}


def _assert_bit_identical(store_a, refs_a, store_b, refs_b) -> None:
    assert [r.source for r in refs_a] == [r.source for r in refs_b] == list(SIZES)
    assert [r.key for r in refs_a] == [r.key for r in refs_b]  # same cache keys
    a, b = _arrays(store_a, refs_a), _arrays(store_b, refs_b)
    for name in SIZES:
        assert a[name].dtype == b[name].dtype == np.float32 and a[name].shape == (512,)
        assert np.array_equal(a[name], b[name]) and a[name].tobytes() == b[name].tobytes(), name


@pytest.fixture()
def sequential(tmp_path, tiny_model_dir):
    """Today's path: one source at a time (θ(0) loaded per source), 1 torch thread."""
    cfg = _config(tmp_path, tiny_model_dir, "store-seq")
    store, base, mixture = _prepared(cfg)
    with stage._torch_threads(1):
        refs = [stage.source_gradient(cfg, store, base, s) for s in mixture.sources]
    return store, refs


# --- batching -----------------------------------------------------------------------------


def test_balanced_batches_longest_first_to_the_lightest_batch():
    # by cost: 5(0) 4(2) 3(4) 3(5) 2(3) 1(1) -> b0 5,+3(5)=8,+1=9; b1 4,+3(4)=7,+2=9
    assert balanced_batches([5, 1, 4, 2, 3, 3], 2) == [[0, 1, 5], [2, 3, 4]]
    assert balanced_batches([5, 1, 4, 2, 3, 3], 1) == [[0, 1, 2, 3, 4, 5]]
    assert balanced_batches([2, 2, 2], 5) == [[0], [1], [2]]  # never an empty batch
    assert balanced_batches([], 3) == []
    with pytest.raises(ValueError, match="n=0"):
        balanced_batches([1], 0)
    with pytest.raises(ValueError, match="non-negative"):
        balanced_batches([1, -1], 2)


def test_balanced_batches_partition_and_spread():
    rng = random.Random(0)
    for _ in range(200):
        costs = [rng.randint(0, 1000) for _ in range(rng.randint(1, 40))]
        n = rng.randint(1, 8)
        out = balanced_batches(costs, n)
        assert out == balanced_batches(list(costs), n)  # deterministic
        assert sorted(itertools.chain(*out)) == list(range(len(costs)))
        assert len(out) == min(n, len(costs)) and all(b == sorted(b) for b in out)
        loads = [sum(costs[i] for i in b) for b in out]
        # greedy LPT: the heaviest batch exceeds the lightest by at most one item's cost
        assert max(loads) - min(loads) <= max(costs)


def test_threads_per_worker():
    assert threads_per_worker(3, 2, 16) == 3
    assert threads_per_worker(None, 2, 16) == 8 and threads_per_worker(None, 3, 2) == 1
    assert threads_per_worker(None, 2, None) is None


# --- cache keys -----------------------------------------------------------------------------


def test_sketch_key_ignores_execution_fields_and_keeps_earlier_keys():
    cfg = MeritConfig()
    base = ModelRef(key="models/abc", uri="file:///x", sha256="ab" * 32)
    src = SourceInfo(name="s", kind="jsonl", content_hash="cd" * 32, key="data/x", examples=1, train=1,
                     heldout=0, calibration=1, loss_tokens=1)
    fanned = cfg.model_copy(update={"conflict": cfg.conflict.model_copy(update=dict(
        execution="deployment", workers=7, deployment="merit-gradients/elsewhere", threads=3))})
    key = stage.source_sketch_key(cfg, base, src)
    assert stage.source_sketch_key(fanned, base, src) == key
    # the settings as they were before the execution fields existed: existing caches stay valid
    before = {"conflict": {"calibration_size": 200, "sketch": "countsketch", "sketch_dim": 8192, "stride": 5,
                           "seed": 0, "batch_size": 8, "bf16": False},
              "sketcher": make_sketcher(cfg.conflict).settings(), "trainable": "all", "dtype": "float32"}
    assert key == sketch_key(base.sha256, src.content_hash, before)


# --- the batch entry point --------------------------------------------------------------------


def test_batch_loads_base_once_and_matches_one_source_at_a_time(tmp_path, tiny_model_dir, sequential, monkeypatch):
    store_seq, refs_seq = sequential
    loads = []
    real_load = stage.load_model
    monkeypatch.setattr(stage, "load_model", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    cfg = _config(tmp_path, tiny_model_dir, "store-batch")
    store, base, mixture = _prepared(cfg)
    refs = stage.source_gradients(cfg, store, base, mixture.sources, threads=1)
    assert len(loads) == 1 and not any(r.cached for r in refs)
    _assert_bit_identical(store_seq, refs_seq, store, refs)
    # everything stored: no model load; one sketch removed: one load, only it recomputed
    again = stage.source_gradients(cfg, store, base, mixture.sources, threads=1)
    assert len(loads) == 1 and all(r.cached for r in again) and again == [r.model_copy(update={"cached": True})
                                                                         for r in refs]
    (Path(cfg.store.uri) / refs[2].key).unlink()
    third = stage.source_gradients(cfg, store, base, mixture.sources, threads=1)
    assert len(loads) == 2 and [r.cached for r in third] == [True, True, False, True, True]
    _assert_bit_identical(store_seq, refs_seq, store, third)


def test_plan_balances_uncached_sources_by_calibration_tokens(tmp_path, tiny_model_dir):
    cfg = _config(tmp_path, tiny_model_dir, "store")
    store, base, mixture = _prepared(cfg)
    tokens = {s.name: sum(len(e.input_ids) for e in load_split(store, s, "calibration")) for s in mixture.sources}
    assert [s.calibration_tokens for s in mixture.sources] == [tokens[n] for n in SIZES]
    assert len(set(tokens.values())) > 1
    plan = stage.plan_source_gradients(cfg, store, base, mixture.sources, workers=2)
    expected = balanced_batches([tokens[n] for n in SIZES], 2)
    assert [[s.name for s in b] for b in plan.batches] == [[list(SIZES)[i] for i in b] for b in expected]
    assert plan.batch_tokens == [sum(tokens[s.name] for s in b) for b in plan.batches]
    assert plan.cached == [] and plan.todo == 5
    # computed sketches leave the plan; the rest is rebalanced
    stage.source_gradients(cfg, store, base, mixture.sources[:2], threads=1)
    plan = stage.plan_source_gradients(cfg, store, base, mixture.sources, workers=4)
    assert [r.source for r in plan.cached] == ["alpha", "beta"] and all(r.cached for r in plan.cached)
    assert sorted(s.name for b in plan.batches for s in b) == ["delta", "epsilon", "gamma"]
    assert len(plan.batches) == 3


def test_plan_log_line(caplog, tmp_path):
    from flows.gradients import _log_plan
    from merit_core.refs import GradientPlan, MixtureRef

    infos = [SourceInfo(name=n, kind="jsonl", content_hash=n, key=n, examples=1, train=1, heldout=0,
                        calibration=1, calibration_tokens=10 * (i + 1), loss_tokens=1) for i, n in enumerate(SIZES)]
    cfg = MeritConfig.model_validate({"conflict": {"execution": "processes", "workers": 2}})
    plan = GradientPlan(cached=[SketchRef(source="alpha", key="k", dim=1, cached=True)],
                        batches=[infos[1:3], infos[3:]], batch_tokens=[50, 90])
    with caplog.at_level(logging.INFO, logger="merit.gradients"):
        _log_plan(cfg, MixtureRef(sources=infos), plan)
    assert caplog.messages[0] == ("source gradients: 4 sources in 2 batches on 2 workers (processes); "
                                  "1 of 5 reused from cache")
    assert caplog.messages[1:] == ["gradients-0 (1 of 2): beta, gamma — 50 calibration tokens",
                                   "gradients-1 (2 of 2): delta, epsilon — 90 calibration tokens"]


# --- fanned out under Prefect ------------------------------------------------------------------


@flow(name="gradients-under-test")
def _gradients_flow(config: MeritConfig, base, mixture):
    from flows.gradients import run_source_gradients

    return run_source_gradients(config, base, mixture)


@pytest.mark.parametrize("execution", ["local", "processes"])
def test_fanned_out_sketches_are_bit_identical_to_sequential(harness, tmp_path, tiny_model_dir, sequential,
                                                             execution):
    store_seq, refs_seq = sequential
    cfg = _config(tmp_path, tiny_model_dir, f"store-{execution}", execution=execution, workers=2)
    store, base, mixture = _prepared(cfg)
    refs = _gradients_flow(cfg, base, mixture)
    assert not any(r.cached for r in refs)
    _assert_bit_identical(store_seq, refs_seq, store, refs)
    assert all(r.cached for r in _gradients_flow(cfg, base, mixture))  # rerun: all from the store


def test_merit_gradients_flow_computes_its_batch(harness, tmp_path, tiny_model_dir, sequential):
    """The entry point of deployment merit-gradients/process, as a worker runs it."""
    from flows.gradients import merit_gradients

    store_seq, refs_seq = sequential
    cfg = _config(tmp_path, tiny_model_dir, "store-child")
    store, base, mixture = _prepared(cfg)
    params = json.loads(json.dumps(dict(config=cfg.model_dump(mode="json"), base=base.model_dump(mode="json"),
                                        sources=[s.model_dump(mode="json") for s in mixture.sources[1:3]],
                                        batch=1, threads=1)))
    refs = merit_gradients(**merit_gradients.validate_parameters(params))
    assert [r.source for r in refs] == ["beta", "gamma"]
    assert _arrays(store, refs)["gamma"].tobytes() == _arrays(store_seq, refs_seq)["gamma"].tobytes()


# --- deployment fan-out (Prefect API faked; the children really compute) -----------------------


@pytest.fixture()
def deployment_env(tmp_path, tiny_model_dir, monkeypatch):
    from prefect.client.schemas.objects import FlowRun
    from prefect.states import Completed, Failed, Scheduled

    from flows import gradients as fanout
    from tasks import collect_source_gradients_task

    cfg = _config(tmp_path, tiny_model_dir, "store-dep", execution="deployment", workers=2)
    store, base, mixture = _prepared(cfg)
    calls, runs, outcome = [], {}, {}  # outcome: batch -> "ok" | "fail" | "nothing"

    def fake_run_deployment(name, parameters, idempotency_key, as_subflow, timeout, tags):
        json.dumps(parameters)  # what travels to the API must be plain JSON
        assert timeout == 0 and as_subflow
        calls.append(dict(name=name, key=idempotency_key, **parameters))
        run = FlowRun(id=uuid4(), name=f"gradients-{parameters['batch']}", flow_id=uuid4(), state=Scheduled())
        runs[run.id] = parameters
        return run

    def fake_wait(ids, timeout, on_final=None):
        out = {}
        for i in ids:
            p = runs[i]
            how = outcome.get(p["batch"], "ok")
            if how == "ok":  # what the worker's merit-gradients flow run does
                child_cfg = MeritConfig.model_validate(p["config"])
                stage.source_gradients(child_cfg, open_store(child_cfg.store), ModelRef.model_validate(p["base"]),
                                       [SourceInfo.model_validate(s) for s in p["sources"]], threads=p["threads"])
            state = Failed(message="Flow run encountered an exception: OSError: disk full") if how == "fail" \
                else Completed()
            out[i] = FlowRun(id=i, name=f"gradients-{p['batch']}", flow_id=uuid4(), state=state)
        return out

    monkeypatch.setattr(fanout, "run_deployment", fake_run_deployment)
    monkeypatch.setattr(fanout, "wait_for_flow_runs", fake_wait)
    monkeypatch.setattr(fanout, "_parent_flow_run_id", lambda: "parent-run")
    monkeypatch.setattr(fanout, "collect_source_gradients_task", collect_source_gradients_task.fn)
    monkeypatch.setattr(fanout, "plan_source_gradients_task",
                        lambda c, b, m, w: stage.plan_source_gradients(c, store, b, m.sources, w))
    return fanout, cfg, store, base, mixture, calls, outcome


def test_deployment_children_compute_batches_bit_identical(deployment_env, sequential):
    fanout, cfg, store, base, mixture, calls, _ = deployment_env
    store_seq, refs_seq = sequential
    refs = fanout.run_source_gradients(cfg, base, mixture)
    assert [c["name"] for c in calls] == ["merit-gradients/process"] * 2
    assert [c["batch"] for c in calls] == [0, 1] and all(c["threads"] == 1 for c in calls)
    batches = [[s["name"] for s in c["sources"]] for c in calls]
    plan = balanced_batches([s.calibration_tokens for s in mixture.sources], 2)
    assert batches == [[list(SIZES)[i] for i in b] for b in plan]
    assert not any(r.cached for r in refs)
    _assert_bit_identical(store_seq, refs_seq, store, refs)
    # keys: per batch, stable for the same plan under the same parent
    keys = [c["key"] for c in calls]
    assert len(set(keys)) == 2 and all(k.startswith("parent-run-gradients-") for k in keys)
    assert keys == [fanout.idempotency_key("parent-run", cfg, base, [mixture.get(n) for n in b]) for b in batches]
    # rerun: everything is in the store, no child is started
    assert all(r.cached for r in fanout.run_source_gradients(cfg, base, mixture)) and len(calls) == 2


def test_deployment_fails_with_the_childs_error(deployment_env):
    fanout, cfg, _, base, mixture, _, outcome = deployment_env
    outcome[1] = "fail"
    with pytest.raises(fanout.GradientRunError, match=r"(?s)1 of 2 source-gradient batches.*gradients-1.*disk full"):
        fanout.run_source_gradients(cfg, base, mixture)


def test_deployment_refuses_a_completed_child_without_sketches(deployment_env):
    fanout, cfg, _, base, mixture, _, outcome = deployment_env
    outcome[0] = "nothing"
    with pytest.raises(stage.SketchStoreError, match="missing from store"):
        fanout.run_source_gradients(cfg, base, mixture)


def test_deployment_needs_a_parent_flow_run(tmp_path):
    from flows.gradients import GradientRunError, run_gradients_on_deployment
    from merit_core.refs import GradientPlan

    cfg = MeritConfig.model_validate({"store": {"uri": str(tmp_path / "s")}})
    plan = GradientPlan(batches=[[SourceInfo(name="a", kind="jsonl", content_hash="h", key="k", examples=1, train=1,
                                             heldout=0, calibration=1, loss_tokens=1)]])
    with pytest.raises(GradientRunError, match="needs a Prefect flow run"):
        run_gradients_on_deployment(cfg, ModelRef(key="m", uri="u"), plan)


def test_prefect_yaml_gradients_deployment():
    from flows.gradients import merit_gradients

    deps = [d for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
            if d["entrypoint"] == "flows/gradients.py:merit_gradients"]
    (dep,) = deps
    # `prefect deploy --name merit-gradients/process` matches flow name and entrypoint function
    assert merit_gradients.name == "merit-gradients" and dep["name"] == "process"
    assert MeritConfig().conflict.deployment == f"{merit_gradients.name}/{dep['name']}"
    assert dep["work_pool"]["name"] == "merit-process"
    (pull,) = dep["pull"]
    assert pull["prefect.deployments.steps.set_working_directory"]["directory"] == "{{ repo-dir.stdout }}"
    assert "gradients" in dep["tags"]
