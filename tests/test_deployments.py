"""Deployment pieces without a server: prefect.yaml, work-pool templates, DeepSpeed
configs, the deployment fan-out's bookkeeping, and `merit sources`.
(The real server + worker run is tests/test_e2e.py.)"""

from __future__ import annotations

import json
from pathlib import Path
from uuid import uuid4

import pytest
import yaml
from typer.testing import CliRunner

from merit_core.config import MeritConfig, load_config
from merit_core.pipeline.layout import branch_key
from merit_core.refs import BranchRef, MixtureRef, ModelRef
from merit_core.store import open_store

REPO = Path(__file__).resolve().parents[1]


def _prefect_yaml() -> dict:
    return yaml.safe_load((REPO / "prefect.yaml").read_text())


def _flow_deployments() -> dict[str, dict]:
    """Every deployment by its full name ``<flow>/<name>`` (the name of the flow object
    at the entrypoint, as `prefect deploy --name flow/name` matches it)."""
    import importlib

    def flow_name(entrypoint: str) -> str:
        path, attr = entrypoint.split(":")
        return getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), attr).name

    return {flow_name(d["entrypoint"]) + "/" + d["name"]: d for d in _prefect_yaml()["deployments"]}


def _deployments() -> dict[str, dict]:
    """The deployments of flows `merit` and `merit-branch` by name (merit-gradients/process
    repeats the name `process`: tests/test_gradients_fanout.py checks it)."""
    return {d["name"]: d for d in _prefect_yaml()["deployments"] if not d["entrypoint"].startswith("flows/gradients.py")}


# --- prefect.yaml -----------------------------------------------------------------------


def test_prefect_yaml_deployments_and_pools():
    deps = _deployments()
    assert set(deps) == {"full", "process", "docker-cpu", "docker-gpu", "k8s-gpu"}
    assert deps["full"]["entrypoint"] == "flows/full.py:merit_full"
    from flows.branches import merit_branch
    from flows.merit import merit

    assert merit.name == "merit" and merit_branch.name == "merit-branch"
    for name, pool in [("process", "merit-process"), ("docker-cpu", "merit-docker-cpu"),
                       ("docker-gpu", "merit-docker-gpu"), ("k8s-gpu", "merit-k8s-gpu")]:
        assert deps[name]["entrypoint"] == "flows/branches.py:merit_branch"
        assert deps[name]["work_pool"]["name"] == pool
    # the default branch deployment of the config is one of them
    assert MeritConfig().run.branch_deployment == "merit-branch/process"


def test_prefect_yaml_lists_every_deployment_by_flow():
    assert set(_flow_deployments()) == {"merit/full", "merit-branch/process", "merit-branch/docker-cpu",
                                        "merit-branch/docker-gpu",
                                        "merit-branch/k8s-gpu", "merit-gradients/process"}


def test_prefect_yaml_steps_reference_their_outputs():
    deps = _deployments()
    for name, dep in deps.items():
        ids = {body["id"] for step in dep.get("build") or [] for body in step.values()}
        text = json.dumps({k: dep.get(k) for k in ("pull", "push", "work_pool")})
        for ref in ["repo-dir", "build-image", "get-commit-hash"]:
            if "{{ " + ref + "." in text:
                assert ref in ids, f"{name} uses {ref} without a build step producing it"
    # process deployments run from the checkout, image deployments from /opt/merit
    for name in ("full", "process"):
        (pull,) = deps[name]["pull"]
        assert pull["prefect.deployments.steps.set_working_directory"]["directory"] == "{{ repo-dir.stdout }}"
        assert not any("prefect_docker" in k for step in deps[name]["build"] for k in step)
    for name in ("docker-gpu", "k8s-gpu"):
        (pull,) = deps[name]["pull"]
        assert pull["prefect.deployments.steps.set_working_directory"]["directory"] == "/opt/merit"
        build = [k for step in deps[name]["build"] for k in step]
        assert "prefect_docker.deployments.steps.build_docker_image" in build
        image_step = next(s for s in deps[name]["build"] if "prefect_docker.deployments.steps.build_docker_image" in s)
        body = image_step["prefect_docker.deployments.steps.build_docker_image"]
        assert body["tag"] == "{{ get-commit-hash.stdout }}" and body["dockerfile"] == "images/Dockerfile.gpu"
        assert deps[name]["work_pool"]["job_variables"]["image"] == "{{ build-image.image }}"
    # the CPU Docker deployment runs the prebuilt image (scripts/build-images.sh) from /opt/merit
    (pull,) = deps["docker-cpu"]["pull"]
    assert pull["prefect.deployments.steps.set_working_directory"]["directory"] == "/opt/merit"
    assert "build" not in deps["docker-cpu"]
    assert (REPO / "images" / "Dockerfile.gpu").is_file() and (REPO / "images" / "Dockerfile.cpu").is_file()


def test_full_deployment_schedule_trigger_and_concurrency():
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

    full = _deployments()["full"]
    assert full["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}
    (schedule,) = full["schedules"]
    assert schedule["active"] is False
    (raw,) = full["triggers"]
    trigger = DeploymentEventTrigger.model_validate(raw)
    # the automation prefect deploy creates is named and described (not "full__automation_1")
    assert trigger.name == "merit/full on a new data source"
    assert "merit.data_source.added" in trigger.description and "merit sources add" in trigger.description
    assert trigger.expect == {"merit.data_source.added"}
    assert trigger.threshold == 1 and trigger.within.total_seconds() > 0  # debounced
    assert trigger.schedule_after.total_seconds() > 0
    assert trigger.parameters == {"config_path": "{{ event.payload.config_path }}"}


def test_full_deployment_retries_once_local_runs_do_not():
    """merit/full's entrypoint is flow `merit` with one flow-level retry after 2 minutes (a
    retry resumes from the store); `merit run` calls the plain flow, without flow retries."""
    from prefect.flows import load_flow_from_entrypoint

    from flows.merit import merit

    deployed = load_flow_from_entrypoint(str(REPO / _deployments()["full"]["entrypoint"]))
    assert deployed.name == "merit" and deployed.fn.__qualname__ == "merit"
    assert deployed.parameters.model_dump() == merit.parameters.model_dump()  # the same form
    assert deployed.retries == 1 and deployed.retry_delay_seconds == 120
    assert merit.retries == 0


def test_full_deployment_default_parameters_are_valid():
    """Quick run and the weekly schedule start configs/quick.yaml (the README's ~8-minute
    main command), branches on merit-branch/process; no config form competes with it."""
    from flows.merit import merit
    from merit_core.config import choose_config

    full = _deployments()["full"]
    params = full["parameters"]
    overrides = ["run.branch_execution=deployment", "run.branch_deployment=merit-branch/process"]
    assert params == {"config_path": "configs/quick.yaml", "overrides": overrides}
    validated = merit.validate_parameters(params)
    assert validated.get("config") is None
    chosen = choose_config(validated.get("config"), REPO / params["config_path"], params["overrides"])
    assert chosen.source == f"{REPO / 'configs/quick.yaml'} + overrides [{', '.join(overrides)}]"
    assert not chosen.form_ignored and chosen.config.run.name == "merit-quick"
    assert chosen.config.run.branch_execution == "deployment"
    assert chosen.config.run.branch_deployment == "merit-branch/process"
    # the UI labels say so: the deployment's description and the schedule's comment
    assert "Quick run (the defaults) runs configs/quick.yaml" in " ".join(full["description"].split())
    text = (REPO / "prefect.yaml").read_text()
    schedule_comment = text[text.index("    schedules:"):text.index('- cron: "0 3 * * 1"')]
    assert "configs/quick.yaml" in schedule_comment
    assert "merit run configs/quick.yaml" in (REPO / "README.md").read_text()


# --- work-pool templates ----------------------------------------------------------------


def _render(template: dict, values: dict) -> dict:
    from prefect.utilities.templating import apply_values

    props = template["variables"]["properties"]
    defaults = {k: v["default"] for k, v in props.items() if "default" in v}
    return apply_values(template["job_configuration"], {**defaults, **values})


def test_docker_gpu_template_requests_gpus():
    t = json.loads((REPO / "deployments" / "docker-gpu.json").read_text())
    assert t["variables"]["properties"]["gpu_count"]["default"] == 1
    job = _render(t, {"image": "registry/merit:abc", "gpu_count": 2})
    (req,) = job["container_create_kwargs"]["device_requests"]
    assert req == {"driver": "nvidia", "count": 2, "capabilities": [["gpu"]]}
    assert job["image"] == "registry/merit:abc"
    from docker.types import DeviceRequest

    assert DeviceRequest(**req)["Count"] == 2  # what docker-py builds from it


def test_docker_cpu_template_defaults_to_the_local_image_on_host_network():
    t = json.loads((REPO / "deployments" / "docker-cpu.json").read_text())
    job = _render(t, {"env": {"OMP_NUM_THREADS": "1"}, "volumes": ["/srv/store:/srv/store"]})
    assert (job["image"], job["network_mode"], job["image_pull_policy"]) == ("merit-cpu:latest", "host", "IfNotPresent")
    assert job["auto_remove"] is True  # finished branch containers leave nothing behind
    assert job["env"] == {"OMP_NUM_THREADS": "1"} and job["volumes"] == ["/srv/store:/srv/store"]
    assert _render(t, {"image": "merit-cpu:abc"})["image"] == "merit-cpu:abc"


def test_k8s_gpu_template_wires_gpu_count_to_limits():
    t = json.loads((REPO / "deployments" / "k8s-gpu.json").read_text())
    job = _render(t, {"image": "registry/merit:abc", "gpu_count": 4})
    pod = job["job_manifest"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert container["image"] == "registry/merit:abc"
    assert any(v.get("emptyDir", {}).get("medium") == "Memory" for v in pod["volumes"])


def test_create_pools_script_names_match_prefect_yaml():
    script = (REPO / "deployments" / "create-pools.sh").read_text()
    for dep in _deployments().values():
        assert dep["work_pool"]["name"] in script


def _fake_prefect(tmp_path: Path) -> Path:
    """A `prefect` stand-in that records its arguments and environment (no server)."""
    exe = tmp_path / "prefect"
    exe.write_text('#!/usr/bin/env bash\necho "ARGS $*" >> "$FAKE_LOG"\n'
                   'env | grep -E "^PREFECT_(UI|SERVER_API)_" | sed "s/^/ENV /" >> "$FAKE_LOG"\n')
    exe.chmod(0o755)
    return exe


def _run_script(tmp_path: Path, script: str, *args: str, **env: str):
    import os
    import subprocess

    log = tmp_path / "calls.log"
    log.unlink(missing_ok=True)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MERIT_"))}
    res = subprocess.run(["bash", str(REPO / script), *args], capture_output=True, text=True, timeout=30, check=False,
                         env={**base, "PREFECT": str(_fake_prefect(tmp_path)), "FAKE_LOG": str(log), **env})
    calls = log.read_text().splitlines() if log.exists() else []
    return res, calls


def test_create_pools_sets_concurrency_limits(tmp_path):
    res, calls = _run_script(tmp_path, "deployments/create-pools.sh", "--gpu")
    assert res.returncode == 0, res.stderr
    args = [c for c in calls if c.startswith("ARGS")]
    assert "ARGS work-pool set-concurrency-limit merit-process 4" in args
    assert "ARGS work-pool set-concurrency-limit merit-docker-gpu 8" in args
    assert "ARGS work-pool set-concurrency-limit merit-k8s-gpu 8" in args
    # each limit is set after the pool's create (which may create it)
    assert args.index("ARGS work-pool set-concurrency-limit merit-process 4") > next(
        i for i, c in enumerate(args) if c.startswith("ARGS work-pool create merit-process"))

    res, calls = _run_script(tmp_path, "deployments/create-pools.sh",
                             MERIT_PROCESS_POOL_LIMIT="6", MERIT_DOCKER_GPU_POOL_LIMIT="none")
    assert res.returncode == 0, res.stderr
    assert "ARGS work-pool set-concurrency-limit merit-process 6" in calls
    assert not any("gpu" in c for c in calls)  # GPU pools only with --gpu

    res, calls = _run_script(tmp_path, "deployments/create-pools.sh", "--docker")
    assert res.returncode == 0, res.stderr
    assert any(c.startswith("ARGS work-pool create merit-docker-cpu --type docker --base-job-template "
                            "deployments/docker-cpu.json") for c in calls)
    assert "ARGS work-pool set-concurrency-limit merit-docker-cpu 2" in calls

    res, calls = _run_script(tmp_path, "deployments/create-pools.sh", "--gpu", MERIT_K8S_GPU_POOL_LIMIT="none")
    assert "ARGS work-pool clear-concurrency-limit merit-k8s-gpu" in calls

    # a process pool of 1 would deadlock: the waiting parent holds the only slot
    for bad in ("1", "four", "-3"):
        res, calls = _run_script(tmp_path, "deployments/create-pools.sh", MERIT_PROCESS_POOL_LIMIT=bad)
        assert res.returncode == 2 and "MERIT_PROCESS_POOL_LIMIT" in res.stderr and calls == []


@pytest.mark.parametrize("args,public", [
    ((), "http://127.0.0.1:4200"),
    (("--port", "4300"), "http://127.0.0.1:4300"),
    (("--host", "10.1.2.3", "--port", "4300"), "http://10.1.2.3:4300"),
    (("--host", "0.0.0.0", "--port", "4300", "--public-url", "https://prefect.example.com/"),
     "https://prefect.example.com"),
])
def test_prefect_server_script_points_the_ui_at_its_api(tmp_path, args, public):
    """The UI calls PREFECT_UI_API_URL; `prefect server start --port/--host` alone leaves it
    at 127.0.0.1:4200 (docs/deployments.md, section 1)."""
    res, calls = _run_script(tmp_path, "scripts/prefect-server.sh", *args, "--", "--no-services")
    assert res.returncode == 0, res.stderr
    host = args[args.index("--host") + 1] if "--host" in args else "127.0.0.1"
    port = args[args.index("--port") + 1] if "--port" in args else "4200"
    assert f"ARGS server start --host {host} --port {port} --no-services" in calls
    assert f"ENV PREFECT_UI_API_URL={public}/api" in calls and f"ENV PREFECT_UI_URL={public}" in calls
    assert f"ENV PREFECT_SERVER_API_HOST={host}" in calls and f"ENV PREFECT_SERVER_API_PORT={port}" in calls
    assert f"export PREFECT_API_URL={public}/api" in res.stdout.splitlines()


def test_prefect_server_script_on_all_interfaces_advertises_a_reachable_address(tmp_path):
    res, calls = _run_script(tmp_path, "scripts/prefect-server.sh", "--host", "0.0.0.0")
    assert res.returncode == 0, res.stderr
    (ui,) = [c for c in calls if c.startswith("ENV PREFECT_UI_API_URL=")]
    assert "0.0.0.0" not in ui and "127.0.0.1" not in ui and ui.endswith(":4200/api")
    res, _ = _run_script(tmp_path, "scripts/prefect-server.sh", "--bogus")
    assert res.returncode == 2 and "unknown argument --bogus" in res.stderr


# --- DeepSpeed ----------------------------------------------------------------------------


@pytest.mark.parametrize("name,stage", [("ds_zero2.json", 2), ("ds_zero3.json", 3)])
def test_deepspeed_configs(name, stage):
    cfg = json.loads((REPO / "deployments" / name).read_text())
    assert cfg["zero_optimization"]["stage"] == stage
    # the Trainer fills batch sizes, accumulation, clipping and precision from TrainConfig
    for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert cfg[k] == "auto"
    assert "optimizer" not in cfg and "scheduler" not in cfg  # same AdamW + schedule as CPU branches
    if stage == 3:  # the saved checkpoint is the gathered full model, loadable by the merge
        assert cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


# --- deployment fan-out -------------------------------------------------------------------


def _flow_run(name: str, state):
    from prefect.client.schemas.objects import FlowRun

    return FlowRun(id=uuid4(), name=name, flow_id=uuid4(), state=state)


def _commit_branch(store, run_id: str, label: str, index: int, sources: list[str]) -> BranchRef:
    key = branch_key(run_id, label, index)
    ckpt = BranchRef(index=index, label=label, key=key, uri=store.uri_for(key), sources=sources,
                            trained_tokens=100 + index, examples=4, steps=1, train_loss=1.0, wall_s=0.1)
    staging = store.staging_dir(key)
    (staging / "model.safetensors").write_bytes(b"x")
    store.commit_dir(key, staging, metadata={"kind": "branch", "branch": ckpt.model_dump()})
    return ckpt


@pytest.fixture()
def fanout_env(tmp_path, monkeypatch):
    """flows.branches' deployment fan-out with the Prefect API replaced by fakes: children
    'run' by writing their branch into the store (or by failing); the store is read by the
    collect task's function, outside a flow run."""
    from prefect.states import Completed, Failed, Scheduled

    from flows import branches as fanout
    from tasks import collect_branches_task

    cfg = MeritConfig.model_validate({"store": {"uri": str(tmp_path / "store")},
                                      "run": {"branch_execution": "deployment"}})
    store = open_store(cfg.store)
    base = ModelRef(key="models/abc", uri="file:///x", sha256="abc")
    mixture = MixtureRef(sources=[])
    calls: list[dict] = []
    outcome: dict[int, str] = {}  # index -> "ok" | "fail" | "nomanifest"
    runs: dict = {}

    def fake_run_deployment(name, parameters, idempotency_key, as_subflow, timeout, tags, flow_run_name):
        json.dumps(parameters)  # what travels to the API must be plain JSON
        assert timeout == 0 and as_subflow
        calls.append(dict(name=name, key=idempotency_key, flow_run_name=flow_run_name, **parameters))
        run = _flow_run(f"child-{parameters['index']}", Scheduled())
        runs[run.id] = parameters
        return run

    def fake_wait(ids, timeout, on_final=None):
        out = {}
        for i in ids:
            p = runs[i]
            how = outcome.get(p["index"], "ok")
            if how == "fail":
                state = Failed(message="Flow run encountered an exception: TrainError: train.deepspeed='x' needs CUDA")
            else:
                if how == "ok":
                    _commit_branch(store, p["run_id"], p["label"], p["index"], p["sources"])
                state = Completed()
            out[i] = _flow_run(f"child-{p['index']}", state).model_copy(update={"id": i})
        return out

    monkeypatch.setattr(fanout, "run_deployment", fake_run_deployment)
    monkeypatch.setattr(fanout, "wait_for_flow_runs", fake_wait)
    monkeypatch.setattr(fanout, "_parent_flow_run_id", lambda: "parent-run")
    monkeypatch.setattr(fanout, "collect_branches_task", collect_branches_task.fn)

    def go(groups):
        return fanout.run_branches_on_deployment(cfg, base, mixture, groups, "run1", "merit")

    return go, calls, outcome


def test_fanout_starts_one_child_per_group_and_reads_the_store(fanout_env):
    go, calls, _ = fanout_env
    out = go([["b", "a"], ["c"]])
    assert [c["key"] for c in calls] == ["parent-run-run1-merit-0", "parent-run-run1-merit-1"]
    assert [c["flow_run_name"] for c in calls] == ["run1-merit-branch-0", "run1-merit-branch-1"]
    assert all(c["name"] == "merit-branch/process" for c in calls)
    assert [c["sources"] for c in calls] == [["b", "a"], ["c"]]
    assert [b.index for b in out] == [0, 1] and [b.trained_tokens for b in out] == [100, 101]
    assert MeritConfig.model_validate(calls[0]["config"]).run.branch_execution == "deployment"


def test_fanout_fails_with_the_childs_error(fanout_env):
    from flows.branches import BranchRunError

    go, _, outcome = fanout_env
    outcome[1] = "fail"
    pattern = r"(?s)1 of 2 branches.*merit/1 \(flow run child-1.*ended Failed.*needs CUDA"
    with pytest.raises(BranchRunError, match=pattern):
        go([["a"], ["b"]])


def test_fanout_refuses_a_completed_child_without_manifest(fanout_env):
    from merit_core.pipeline.branches import BranchStoreError

    go, _, outcome = fanout_env
    outcome[0] = "nomanifest"
    with pytest.raises(BranchStoreError, match="has no manifest"):
        go([["a"], ["b"]])


def test_fanout_reschedules_a_child_failed_in_an_earlier_attempt(monkeypatch):
    from prefect.states import Completed, Failed

    from flows import branches as fanout

    done = _flow_run("old", Completed())
    failed = _flow_run("old", Failed(message="boom"))
    rescheduled = []
    monkeypatch.setattr(fanout, "reschedule", lambda fid, msg: rescheduled.append(fid))
    for run in (done, failed):
        monkeypatch.setattr(fanout, "run_deployment", lambda *a, run=run, **k: run)
        fanout.start_branch("merit-branch/process", {}, "k", [])
    assert rescheduled == [failed.id]


def test_fanout_needs_a_parent_flow_run(tmp_path):
    from flows.branches import BranchRunError, run_branches_on_deployment

    cfg = MeritConfig.model_validate({"store": {"uri": str(tmp_path / "s")}})
    with pytest.raises(BranchRunError, match="needs a Prefect flow run"):
        run_branches_on_deployment(cfg, ModelRef(key="m", uri="u"), MixtureRef(sources=[]), [["a"]], "r",
                                   "merit")


# --- merit sources ----------------------------------------------------------------------


@pytest.fixture()
def config_file(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"prompt": "p", "response": "r"}\n')
    p = tmp_path / "c.yaml"
    p.write_text("# keep me\nrun:\n  name: t  # and me\n"
                 "data:\n  sources:\n    - {name: a, kind: jsonl, path: a.jsonl}\n"
                 "split:\n  r: 0\n")
    return p


def test_sources_add_appends_validates_and_keeps_comments(config_file, tmp_path, monkeypatch):
    from merit_cli import sources
    from merit_cli.main import app

    emitted = []
    monkeypatch.setattr(sources, "emit_source_added", lambda cfg, spec: emitted.append((cfg, spec)) or "ev-1")
    sub = tmp_path / "new"
    sub.mkdir()
    (sub / "b.jsonl").write_text('{"prompt": "p", "response": "r"}\n')
    res = CliRunner().invoke(app, ["sources", "add", str(config_file), "--name", "b", "--kind", "jsonl",
                                   "--path", str(sub / "b.jsonl"), "--max-examples", "5"])
    assert res.exit_code == 0, res.output
    assert "emitted merit.data_source.added for merit.source.b" in res.output
    text = config_file.read_text()
    assert "# keep me" in text and "# and me" in text
    cfg = load_config(config_file)
    assert [s.name for s in cfg.data.sources] == ["a", "b"]
    assert cfg.data.sources[1].path == str(sub / "b.jsonl") and cfg.data.sources[1].max_examples == 5
    assert "path: new/b.jsonl" in text  # relative to the config file, so both can move together
    assert emitted == [(config_file, {"name": "b", "kind": "jsonl", "path": "new/b.jsonl", "max_examples": 5})]


@pytest.mark.parametrize("args,message", [
    (["--name", "a", "--kind", "jsonl", "--path", "a.jsonl"], "already registered"),
    (["--name", "x", "--kind", "jsonl", "--path", "missing.jsonl"], "does not exist"),
    (["--name", "x", "--kind", "bigbench"], "needs field 'task'"),
    (["--name", "x", "--kind", "csv", "--path", "a.jsonl"], "kind"),
])
def test_sources_add_refuses(config_file, args, message, monkeypatch):
    from merit_cli import sources
    from merit_cli.main import app

    monkeypatch.setattr(sources, "emit_source_added", lambda *a: pytest.fail("must not emit"))
    before = config_file.read_text()
    res = CliRunner().invoke(app, ["sources", "add", str(config_file), *args])
    assert res.exit_code == 2 and message in res.output, res.output
    assert config_file.read_text() == before


def test_sources_add_without_api_url_registers_but_does_not_emit(config_file, tmp_path):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from merit_cli.main import app

    (tmp_path / "b.jsonl").write_text('{"prompt": "p", "response": "r"}\n')
    with temporary_settings(updates={PREFECT_API_URL: None}):
        res = CliRunner().invoke(app, ["sources", "add", str(config_file), "--name", "b", "--kind", "jsonl",
                                       "--path", str(tmp_path / "b.jsonl")])
    assert res.exit_code == 0 and "no event emitted" in res.output
    assert [s.name for s in load_config(config_file).data.sources] == ["a", "b"]


def test_fanout_keys_differ_between_runs_of_one_parent():
    """A study trains label 'joint' once per seed under one parent flow run: each seed's
    branches must be new children, not the previous seed's."""
    from flows.branches import idempotency_key

    keys = {idempotency_key("parent", run, label, k)
            for run in ("study-s0", "study-s1") for label in ("joint", "merit") for k in (0, 1)}
    assert len(keys) == 8
