"""End to end against a real Prefect server and process worker (ARCHITECTURE.md, tier 3).

A `prefect server start` (SQLite in a temporary PREFECT_HOME, free loopback port), the
work pools of deployments/create-pools.sh, a process worker, `prefect deploy` of the
CPU deployments of prefect.yaml (merit/full, merit-branch/process), then:

1. `prefect deployment run merit/full --watch` on a tiny config: Completed; the K = 2
   branches ran as separate flow runs of the merit-branch/process deployment, linked to
   the parent; the merged model's manifest is in the store.
2. `merit sources add` registers one more source and emits merit.data_source.added;
   the deployment trigger re-runs merit/full on the file: Completed, exactly one
   source gradient computed, the four others reused from the store; the run is
   incremental (its report says so): only the new source's group trains a branch.

Every process the test starts is stopped by its PID (process group) at the end.
Deselect with `-m "not e2e"`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from merit_core.store.manifest import verify_manifest
from tests.helpers import write_jsonl_sources

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
SOURCES = ["alpha", "beta", "gamma", "delta"]
TRIGGER_WAIT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Procs:
    """Processes started by the test, each in its own process group, stopped by PID."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.started: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, cmd: list[str], env: dict) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "w")
        p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.started.append((name, p))
        return p

    def stop_all(self) -> None:
        for _name, p in reversed(self.started):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)  # the group of the process we started
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait(timeout=10)

    def tail(self, name: str, n: int = 60) -> str:
        path = self.logs / f"{name}.log"
        return "\n".join(path.read_text().splitlines()[-n:]) if path.exists() else ""


def _run(cmd: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, (f"{' '.join(cmd)} failed ({res.returncode}):\n"
                                 f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        assert proc.poll() is None, "prefect server exited early"
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"prefect server at {url} not healthy after {timeout} s")


def _write_config(tmp: Path, model_dir: Path) -> Path:
    specs = write_jsonl_sources(tmp / "data", SOURCES, n=24)
    raw = {
        # branch_execution=deployment comes from merit/full's `overrides`; run.rerun is the default
        # `auto`, with the structure check set wide open so that the triggered run is incremental
        "run": {"name": "e2e", "resplit_angle_deg": 90.0},
        "model": {"source": str(model_dir)},
        "data": {"sources": specs, "max_length": 64, "heldout_min": 4, "heldout_fraction": 0.2},
        "conflict": {"calibration_size": 8, "sketch": "countsketch", "sketch_dim": 256, "batch_size": 8},
        "split": {"r": 1},
        "train": {"learning_rate": 1e-3, "batch_size": 8, "max_steps": 2, "save_steps": 100, "logging_steps": 1,
                  "threads": 1},
        "eval": {"batch_size": 8, "max_examples_per_source": 4, "max_new_tokens": 2},
        "store": {"uri": str(tmp / "store")},
        "baselines": {"joint": False, "random_split": False},
    }
    path = tmp / "merit.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _prefect_file_for_test(tmp: Path) -> Path:
    """prefect.yaml as shipped, except that the trigger's run starts at once (the
    shipped 60 s `schedule_after` debounce would only make the test wait)."""
    doc = yaml.safe_load((REPO / "prefect.yaml").read_text())
    full = next(d for d in doc["deployments"] if d["name"] == "full")
    (trigger,) = full["triggers"]
    assert trigger["expect"] == ["merit.data_source.added"] and trigger["schedule_after"] > 0
    trigger["schedule_after"] = 0
    path = tmp / "prefect.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _sketches(store: Path) -> list[Path]:
    return sorted((store / "sketches").rglob("*.npy"))


def test_server_worker_deployments_and_trigger(tmp_path, tiny_model_dir):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterType,
        DeploymentFilter,
        DeploymentFilterName,
        FlowFilter,
        FlowFilterName,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.settings import PREFECT_API_URL, temporary_settings

    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    home = tmp_path / "prefect-home"
    home.mkdir()
    logs = tmp_path / "logs"
    logs.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_API_URL=url,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_UI_ENABLED="false",
        PREFECT_WORKER_QUERY_SECONDS="2",
        PREFECT_CLI_WRAP_LINES="false",
        MERIT_CACHE_DIR=str(tmp_path / "cache"),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        PATH=f"{Path(PY).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    config = _write_config(tmp_path, tiny_model_dir)
    store = tmp_path / "store"
    procs = Procs(logs)
    timings: dict[str, float] = {}
    try:
        t0 = time.monotonic()
        server = procs.start("server", [PY, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                        "--port", str(port), "--no-ui", "--analytics-off"], env)
        _wait_healthy(url, server)
        timings["server start"] = time.monotonic() - t0

        t0 = time.monotonic()
        _run(["bash", "deployments/create-pools.sh", "--gpu"], env)  # GPU pools: templates accepted
        procs.start("worker", [PY, "-m", "prefect", "worker", "start", "--pool", "merit-process",
                               "--type", "process", "--name", "e2e-worker"], env)
        _run([PY, "-m", "prefect", "--no-prompt", "deploy", "--prefect-file", str(_prefect_file_for_test(tmp_path)),
              "--name", "full", "--name", "process"], env)
        timings["pools + worker + deploy"] = time.monotonic() - t0
        with temporary_settings(updates={PREFECT_API_URL: url}), get_client(sync_client=True) as client:
            # the trigger's automation has prefect.yaml's name and description
            (automation,) = client.read_automations_by_name("merit/full on a new data source")
            assert "merit.data_source.added" in automation.description and automation.enabled
            # create-pools.sh's default pool limits
            assert client.read_work_pool("merit-process").concurrency_limit == 4
            assert client.read_work_pool("merit-docker-gpu").concurrency_limit == 8

        # 1. merit/full from the CLI, like CI would.
        t0 = time.monotonic()
        res = subprocess.run([PY, "-m", "prefect", "deployment", "run", "merit/full",
                              "--params", json.dumps({"config_path": str(config)}),
                              "--watch", "--watch-interval", "2", "--watch-timeout", "300"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=330)
        timings["merit/full run"] = time.monotonic() - t0
        assert res.returncode == 0 and "Completed" in res.stdout, (
            f"merit/full did not complete:\n{res.stdout[-3000:]}\n{res.stderr[-2000:]}\n"
            f"--- worker log ---\n{procs.tail('worker', 120)}")

        with temporary_settings(updates={PREFECT_API_URL: url}), get_client(sync_client=True) as client:
            full_filter = DeploymentFilter(name=DeploymentFilterName(any_=["full"]))
            (parent,) = client.read_flow_runs(deployment_filter=full_filter)
            assert parent.state.is_completed()
            assert parent.empirical_policy.retries == 1  # merit/full's flow-level retry
            branch_runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["merit-branch"])))
            assert len(branch_runs) == 2, [r.name for r in branch_runs]
            (process_dep,) = client.read_deployments(  # merit-branch/process (merit-gradients/process shares the name)
                flow_filter=FlowFilter(name=FlowFilterName(any_=["merit-branch"])),
                deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["process"])))
            for r in branch_runs:
                assert r.state.is_completed(), (r.name, r.state)
                assert r.deployment_id == process_dep.id and r.id != parent.id
                assert r.parent_task_run_id is not None  # linked as a subflow of the parent
                assert client.read_task_run(r.parent_task_run_id).flow_run_id == parent.id
            assert sorted(r.parameters["index"] for r in branch_runs) == [0, 1]
            # what the UI shows of each branch: its training progress in its logs (sent by the
            # worker's flow-run process), its table artifact, and where its wall time went
            (report_json,) = list(store.glob("runs/*/report/report.json"))
            report = json.loads(report_json.read_text())
            for r in branch_runs:
                ref = report["branches"]["merit"][r.parameters["index"]]
                logs_ = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[r.id])))
                progress = [e.message for e in logs_ if e.name == "merit_core.train.progress"]
                assert [m.split(" (")[0] for m in progress] == ["step 1/2", "step 2/2", "training done 2/2"], progress
                assert f"loss {ref['train_loss']:.4f}" in progress[-1]
                arts = client.read_artifacts(artifact_filter=ArtifactFilter(
                    flow_run_id=ArtifactFilterFlowRunId(any_=[r.id]), type=ArtifactFilterType(any_=["table"])))
                rows = {row["field"]: row["value"] for row in json.loads(arts[0].data)}
                assert rows["checkpoint"] == ref["uri"] and rows["optimizer steps"] == 2
                t, (created, start, end) = ref["timing"], (x.timestamp() for x in (r.created, r.start_time, r.end_time))
                assert t["queued_s"] == pytest.approx(start - created, abs=1e-3)  # worker poll + process start
                assert t["wall_s"] == pytest.approx(end - created, abs=1e-3)
                assert t["startup_s"] == pytest.approx(ref["started_at"] - start, abs=1e-3)
                assert t["train_s"] == ref["wall_s"] and t["overhead_s"] == pytest.approx(t["wall_s"] - t["train_s"])
                timings[f"branch {r.parameters['index']} queued"] = t["queued_s"]
            walls = sum(b["timing"]["wall_s"] for b in report["branches"]["merit"])
            assert f"the 2 branch flow runs took {walls:.1f} s of wall time" in report_json.with_name("report.md").read_text()

        (merged,) = list(store.glob("runs/*/merit/merged/manifest.json"))
        verify_manifest(merged.parent)
        branch_dirs = sorted(store.glob("runs/*/merit/branches/*/manifest.json"))
        assert len(branch_dirs) == 2
        assert len(_sketches(store)) == len(SOURCES)

        # 2. A new data source arrives: `merit sources add` emits merit.data_source.added.
        (new_spec,) = write_jsonl_sources(tmp_path / "new-data", ["epsilon"], n=24)
        t0 = time.monotonic()
        res = _run([PY, "-m", "merit_cli.main", "sources", "add", str(config), "--name", "epsilon",
                    "--kind", "jsonl", "--path", new_spec["path"]], env)
        assert "emitted merit.data_source.added" in res.stdout, res.stdout + res.stderr
        with temporary_settings(updates={PREFECT_API_URL: url}), get_client(sync_client=True) as client:
            triggered = None
            while time.monotonic() - t0 < TRIGGER_WAIT_S:
                runs = client.read_flow_runs(deployment_filter=full_filter, sort=FlowRunSort.EXPECTED_START_TIME_DESC)
                others = [r for r in runs if r.id != parent.id]
                if others and others[0].state is not None and others[0].state.is_final():
                    triggered = others[0]
                    break
                time.sleep(2)
            timings["triggered run"] = time.monotonic() - t0
            assert triggered is not None, (f"no triggered merit/full run finished in {TRIGGER_WAIT_S} s\n"
                                           f"--- worker log ---\n{procs.tail('worker', 120)}")
            assert triggered.state.is_completed(), (triggered.state, procs.tail("worker", 120))
            assert triggered.parameters["config_path"] == str(config.resolve())
            logs_ = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[triggered.id])))
            messages = [entry.message for entry in logs_]
            assert any("source gradients: 1 computed, 4 reused from cache" in m for m in messages), messages[-30:]
            # incremental: the new source's group retrains, the other branch is the first run's
            branch_runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["merit-branch"])))
            assert len(branch_runs) == 3, [r.name for r in branch_runs]
        (new_report,) = [p for p in store.glob("runs/*/report/report.json") if p != report_json]
        rerun = json.loads(new_report.read_text())["rerun"]
        assert rerun["mode"] == "incremental" and rerun["added"] == ["epsilon"], rerun
        assert rerun["previous_run"] == report["run_id"]
        assert sorted(r["action"] for r in rerun["branches"]) == ["retrained", "reused"], rerun["branches"]
        assert "## Incremental run" in new_report.with_name("report.md").read_text()
        assert len(_sketches(store)) == len(SOURCES) + 1
        assert len(list(store.glob("runs/*/merit/merged/manifest.json"))) == 2
    finally:
        procs.stop_all()
        print("\ne2e timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    for name, p in procs.started:
        assert p.poll() is not None, f"{name} (pid {p.pid}) still running"
