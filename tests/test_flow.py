"""The `merit` flow end to end on a tiny model under prefect_test_harness."""

from __future__ import annotations

import json
import os

import pytest
import yaml
from prefect.testing.utilities import prefect_test_harness

from merit_core.config import ConfigError, MeritConfig, load_config
from merit_core.store.manifest import verify_manifest
from tests.helpers import write_jsonl_sources

SOURCES = ["alpha", "beta", "gamma", "delta"]


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def tiny_config(tmp_path, model_dir, **over) -> MeritConfig:
    specs = write_jsonl_sources(tmp_path / "data", SOURCES, n=40)
    raw = {
        "run": {"name": "tiny"},
        "model": {"source": str(model_dir)},
        "data": {"sources": specs, "max_length": 64, "heldout_min": 8, "heldout_fraction": 0.2},
        "conflict": {"calibration_size": 8, "sketch": "countsketch", "sketch_dim": 512, "batch_size": 8},
        "split": {"r": 1},
        "train": {"learning_rate": 1e-3, "batch_size": 8, "epochs": 1, "save_steps": 2, "logging_steps": 1},
        "eval": {"batch_size": 8, "max_examples_per_source": 8, "max_new_tokens": 4},
        "store": {"uri": str(tmp_path / "store")},
    }
    for k, v in over.items():
        raw[k] = {**raw.get(k, {}), **v}
    return MeritConfig.model_validate(raw)


def _flow_runs_named(name: str) -> list:
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    async def go():
        async with get_client() as client:
            return await client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[name])))

    return asyncio.run(go())


def _artifacts(keys: list[str]) -> list:
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async def go():
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))

    return asyncio.run(go())


def _child_runs(parent_id) -> list:
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    async def go():
        async with get_client() as client:
            return await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_id])))

    return asyncio.run(go())


def _log_messages(flow_run_id) -> list[str]:
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)

    async def go():
        async with get_client() as client:
            return await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))

    return [log.message for log in asyncio.run(go())]


def test_flow_local_runs_every_stage(harness, tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("MERIT_CACHE_DIR", str(tmp_path / "cache"))
    from flows.merit import merit

    before = len(_flow_runs_named("merit-branch"))
    cfg = tiny_config(tmp_path, tiny_model_dir)
    # config_path wins over a filled-in config form (another run name), overrides apply on top
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    form = cfg.model_copy(update={"run": cfg.run.model_copy(update={"name": "the-form"})})
    state = merit(config_path=str(path), overrides=["eval.max_new_tokens=3"], config=form, return_state=True)
    report = state.result()
    parent = state.state_details.flow_run_id
    groups = report["partition"]["groups"]
    assert len(groups) == 2 and sorted(sum(groups, [])) == sorted(SOURCES)
    # one merit-branch flow run per group, plus joint (1) and random split (2)
    assert len(_flow_runs_named("merit-branch")) - before == 2 + 1 + 2
    assert set(report["metrics"]) == {"base", "merit", "joint", "random"}
    for table in report["metrics"].values():
        assert [r["source"] for r in table["rows"]] == SOURCES
    # token-weighted merge weights are the branches' trained tokens
    merged_dir = tmp_path / "store" / report["models"]["merit"]["key"]
    verify_manifest(merged_dir)
    meta = json.loads((merged_dir / "manifest.json").read_text())["metadata"]
    assert meta["trained_tokens"] == [b["trained_tokens"] for b in report["branches"]["merit"]]
    report_dir = tmp_path / "store" / "runs" / report["run_id"] / "report"
    for f in ["report.md", "report.json", "conflict_matrix.png", "pca_groups.png"]:
        assert (report_dir / f).is_file(), f

    # the report is published as Prefect artifacts of the run
    arts = _artifacts(["merit-report", "merit-summary", "mixture"])
    assert {"merit-report", "merit-summary", "mixture"} <= {a.key for a in arts}
    md = next(a for a in arts if a.key == "merit-report").data
    assert "Held-out answer cross-entropy" in md and report["run_id"] in md

    # which config ran: the file + overrides, stated in the log, the report and the merit-config artifact
    source = f"{path} + overrides [eval.max_new_tokens=3] (config form ignored: config_path is set)"
    assert report["config_source"] == source
    assert f"\nConfig: {source}\n" in (report_dir / "report.md").read_text()
    messages = _log_messages(parent)
    assert any(m.startswith("config form ignored: config_path is set") for m in messages), messages
    assert f"config: {source} (4 sources)" in messages
    (config_art,) = [a for a in _artifacts(["merit-config"]) if a.flow_run_id == parent]
    published = yaml.safe_load(config_art.data.split("```yaml\n", 1)[1].split("```", 1)[0])
    assert published == load_config(path, ["eval.max_new_tokens=3"]).model_dump(mode="json")
    assert published["eval"]["max_new_tokens"] == 3 and published["run"]["name"] == "tiny"

    # run names: the parent is its run id, each branch <run id>-<label>-branch-<k>
    assert report["run_id"] == f"tiny-{str(parent)[:8]}"
    (parent_run,) = [r for r in _flow_runs_named("merit") if r.id == parent]
    assert parent_run.name == report["run_id"]
    expected = [f"{report['run_id']}-{label}-branch-{k}" for label, n in (("merit", 2), ("joint", 1), ("random", 2))
                for k in range(n)]
    assert sorted(r.name for r in _child_runs(parent)) == sorted(expected)

    # a second run reuses every cached source gradient: no sketch is rewritten
    sketches = sorted((tmp_path / "store" / "sketches").rglob("*.npy"))
    assert len(sketches) == len(SOURCES)
    mtimes = [p.stat().st_mtime_ns for p in sketches]
    report2 = merit(config=cfg.model_copy(update={"baselines": cfg.baselines.model_copy(update={"joint": False, "random_split": False})}))
    assert report2["partition"]["groups"] == groups and report2["config_source"] == "the config form"
    assert [p.stat().st_mtime_ns for p in sorted((tmp_path / "store" / "sketches").rglob("*.npy"))] == mtimes


def test_flow_processes_mode(harness, tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("MERIT_CACHE_DIR", str(tmp_path / "cache"))
    from flows.merit import merit

    before = len(_flow_runs_named("merit-branch"))
    cfg = tiny_config(tmp_path, tiny_model_dir, run={"branch_execution": "processes", "max_parallel_branches": 2},
                      baselines={"joint": False, "random_split": False})
    state = merit(config=cfg, return_state=True)
    report = state.result()
    assert len(report["branches"]["merit"]) == 2
    assert len(_flow_runs_named("merit-branch")) - before == 2
    names = {r.name for r in _flow_runs_named("merit-branch")}
    assert {f"{report['run_id']}-merit-branch-{k}" for k in (0, 1)} <= names
    assert report["run_id"] == f"tiny-{str(state.state_details.flow_run_id)[:8]}"


def test_wrong_config_fails_before_training(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("split:\n  r: 3\ndata:\n  sources:\n    - {name: a, kind: jsonl, path: x.jsonl}\n    - {name: b, kind: jsonl, path: y.jsonl}\n")
    with pytest.raises(ConfigError, match=r"K=2\^r=8"):
        load_config(p)
    p.write_text("trian:\n  lr: 1\n")
    with pytest.raises(ConfigError, match="trian"):
        load_config(p)
    p.write_text("data:\n  sources:\n    - {name: a, kind: bigbench}\n")
    with pytest.raises(ConfigError, match="needs field 'task'"):
        load_config(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_merit_core_never_imports_prefect():
    import subprocess
    import sys

    code = (
        "import importlib, pkgutil, sys, merit_core\n"
        "for m in pkgutil.walk_packages(merit_core.__path__, 'merit_core.'):\n"
        "    importlib.import_module(m.name)\n"
        "bad = sorted(k for k in sys.modules if k == 'prefect' or k.startswith('prefect.'))\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_deepspeed_without_cuda_fails_before_any_stage(harness, tmp_path, tiny_model_dir, monkeypatch):
    import torch

    from merit_core.train import TrainSetupError

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the no-CUDA error path is not reachable")
    monkeypatch.setenv("MERIT_CACHE_DIR", str(tmp_path / "cache"))
    from flows.merit import merit

    cfg = tiny_config(tmp_path, tiny_model_dir, train={"deepspeed": "deployments/ds_zero2.json"})
    with pytest.raises(TrainSetupError, match="needs CUDA"):
        merit(config=cfg)
    assert not (tmp_path / "store" / "sketches").exists() and not (tmp_path / "store" / "runs").exists()


def test_train_retries_skip_setup_errors(harness):
    from prefect import flow, task

    from merit_core.train import TrainError, TrainSetupError
    from tasks.stages import TRAIN_RETRIES

    attempts: list[str] = []

    @task(**{**TRAIN_RETRIES, "retry_delay_seconds": 0})
    def branch(error: type[Exception]) -> None:
        attempts.append(error.__name__)
        raise error("boom")

    @flow
    def run(error: type[Exception]) -> None:
        branch(error)

    for error, expected in ((TrainSetupError, 1), (TrainError, 1 + TRAIN_RETRIES["retries"])):
        attempts.clear()
        with pytest.raises(error):
            run(error)
        assert len(attempts) == expected, (error.__name__, attempts)
