"""What a Prefect user sees of a run (issue 14), read back from a real Prefect server
(prefect_test_harness): the branch flow runs' logs carry the training progress, each
branch run has its table and a progress bar, the parent has progress bars of its long
stages, the report artifact's figures are viewable, links and the rounded summary, and
the report says where the branches' wall time went. Values are checked against the
flow runs' own timestamps, the store's files and numbers derived here."""

from __future__ import annotations

import asyncio
import base64
import json
import re
from pathlib import Path

import pytest
from prefect.testing.utilities import prefect_test_harness

from merit_core.train import planned_steps
from tests.test_flow import SOURCES, tiny_config


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def _api(call):
    """``await call(client)`` on a fresh client of the harness's server, after every
    queued log line was sent."""
    from prefect.client.orchestration import get_client
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all()

    async def go():
        async with get_client() as client:
            return await call(client)

    return asyncio.run(go())


def _children(parent_id) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    runs = _api(lambda c: c.read_flow_runs(
        flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_id]))))
    return sorted(runs, key=lambda r: r.parameters["index"])


def _artifacts(flow_run_id, kind: str) -> list:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterType

    return _api(lambda c: c.read_artifacts(artifact_filter=ArtifactFilter(
        flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]), type=ArtifactFilterType(any_=[kind]))))


def _progress_lines(flow_run_id) -> list[str]:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    logs = _api(lambda c: c.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))))
    return [entry.message for entry in logs if entry.name == "merit_core.train.progress"]


def _check_branch_run(child, ref: dict, mixture: dict, cfg, ask_lead_s: float) -> None:
    """The branch flow run's logs, table and progress artifacts against its BranchRef."""
    n_train = sum(s["train"] for s in mixture["sources"] if s["name"] in child.parameters["sources"])
    steps = planned_steps(n_train, cfg.train)
    assert ref["steps"] == steps and ref["examples"] == n_train
    lines = _progress_lines(child.id)
    logged = [int(m.group(1)) for line in lines if (m := re.match(r"step (\d+)/(\d+) ", line))]
    assert logged == list(range(1, steps + 1)), lines  # logging_steps=1: one line per optimizer step
    assert all(re.search(r"loss \d+\.\d{4}, lr \d\.\d\de-\d\d, .*steps/s \(.* samples/s\)", x) for x in lines[1:-1])
    assert lines[-1].startswith(f"training done {steps}/{steps} (100%): loss {ref['train_loss']:.4f}")

    (table,) = _artifacts(child.id, "table")
    rows = {r["field"]: r["value"] for r in json.loads(table.data)}
    assert rows["sources"] == ", ".join(sorted(child.parameters["sources"]))
    assert (rows["examples"], rows["optimizer steps"], rows["trained tokens N_k"]) == (
        n_train, steps, ref["trained_tokens"])
    assert rows["final train loss"] == pytest.approx(ref["train_loss"], rel=1e-3)
    assert rows["checkpoint"] == ref["uri"] and Path(ref["uri"].removeprefix("file://"), "manifest.json").is_file()
    (bar,) = _artifacts(child.id, "progress")
    assert float(bar.data) == 100.0
    assert bar.description == f"training merit-branch-{ref['index']}: done, step {steps}/{steps}, loss {ref['train_loss']:.4f}"

    # timing: the flow run's own timestamps around the training run of the BranchRef;
    # queued counts from when the parent asked, at most ``ask_lead_s`` before the run existed
    t = ref["timing"]
    created, start, end = (x.timestamp() for x in (child.created, child.start_time, child.end_time))
    assert t["wall_s"] - t["queued_s"] == pytest.approx(end - start, abs=1e-3)
    assert 0 <= t["queued_s"] - (start - created) < ask_lead_s
    assert t["startup_s"] == pytest.approx(ref["started_at"] - start, abs=1e-3)
    assert t["train_s"] == ref["wall_s"] > 0
    assert t["commit_s"] == pytest.approx(end - ref["started_at"] - ref["wall_s"], abs=1e-3)
    assert t["overhead_s"] == pytest.approx(t["wall_s"] - t["train_s"], abs=1e-6)
    assert not t["reused"]


def test_local_run_in_the_ui(harness, tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("MERIT_CACHE_DIR", str(tmp_path / "cache"))
    from flows.merit import merit

    cfg = tiny_config(tmp_path, tiny_model_dir, baselines={"joint": False, "random_split": False})
    state = merit(config=cfg, return_state=True)
    report = state.result()
    parent = state.state_details.flow_run_id
    children = _children(parent)
    assert [c.parameters["index"] for c in children] == [0, 1]
    for child, ref in zip(children, report["branches"]["merit"]):
        _check_branch_run(child, ref, report["mixture"], cfg, ask_lead_s=1.0)

    bars = {a.description: float(a.data) for a in _artifacts(parent, "progress")}
    assert bars == {"source gradients: 4 of 4": 100.0, "merit: branches trained: 2 of 2": 100.0,
                    "evaluate (held-out): 2 of 2": 100.0}

    # the report: figures embedded as data: URIs, byte for byte the PNGs in the store
    report_dir = tmp_path / "store" / "runs" / report["run_id"] / "report"
    md = (report_dir / "report.md").read_text()
    assert "![conflict matrix](conflict_matrix.png)" in md  # the file beside the PNGs keeps relative paths
    (art,) = [a for a in _artifacts(parent, "markdown") if a.key == "merit-report"]
    images = dict(re.findall(r"!\[([^\]]*)\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", art.data))
    assert set(images) == {"conflict matrix", "PCA"}
    assert base64.b64decode(images["conflict matrix"]) == (report_dir / "conflict_matrix.png").read_bytes()
    assert base64.b64decode(images["PCA"]) == (report_dir / "pca_groups.png").read_bytes()

    (summary,) = [a for a in _artifacts(parent, "table") if a.key == "merit-summary"]
    rows = {r["model"]: r for r in json.loads(summary.data)}
    for model, table in report["metrics"].items():
        loss = table["mean"]["loss"]
        assert rows[model]["loss"] == float(f"{loss:.4g}") and len(repr(rows[model]["loss"])) <= 7

    links = {a.key: a.data for a in _artifacts(parent, "markdown") + _artifacts(parent, "link")}
    model_uri = report["models"]["merit"]["uri"]
    assert model_uri.startswith("file://") and f"({model_uri})" in links["merit-model"]
    assert f"({report['report_uri']}/report.md)" in links["merit-report-file"]

    # the fan-out overhead, summed over the branches by hand
    walls = [b["timing"]["wall_s"] for b in report["branches"]["merit"]]
    trains = [b["wall_s"] for b in report["branches"]["merit"]]
    assert (f"Fan-out overhead: the 2 branch flow runs took {sum(walls):.1f} s of wall time (summed), "
            f"{sum(trains):.1f} s of it training; {sum(walls) - sum(trains):.1f} s "
            f"({(sum(walls) - sum(trains)) / sum(walls):.0%}) went to queueing, start-up and commit.") in md
    assert report["fanout"]["overhead_s"] == pytest.approx(sum(walls) - sum(trains))


def test_process_pool_branches_log_to_their_runs(harness, tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("MERIT_CACHE_DIR", str(tmp_path / "cache"))
    from flows.merit import merit

    cfg = tiny_config(tmp_path, tiny_model_dir, run={"branch_execution": "processes", "max_parallel_branches": 2},
                      baselines={"joint": False, "random_split": False})
    state = merit(config=cfg, return_state=True)
    report = state.result()
    children = _children(state.state_details.flow_run_id)
    assert len(children) == 2
    stage = next(t["seconds"] for t in report["timings"] if t["stage"] == "train MERIT branches")
    for child, ref in zip(children, report["branches"]["merit"]):
        # the process pool's start (spawn, imports) is queueing: it happens before the run exists
        _check_branch_run(child, ref, report["mixture"], cfg, ask_lead_s=stage)
        assert ref["timing"]["wall_s"] <= stage
    bars = {a.description: float(a.data) for a in _artifacts(state.state_details.flow_run_id, "progress")}
    assert bars["merit: branches trained: 2 of 2"] == 100.0
