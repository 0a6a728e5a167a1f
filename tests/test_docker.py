"""The Docker tier: `merit/full` with every branch in its own container on a Docker work
pool (prefect-docker), against a real Prefect server and a moto S3 server, both on
127.0.0.1 (containers use host networking; nothing addresses the docker0 bridge).

- the merged weights of a run with branches in containers equal (sha256) those of the
  same config with in-process branches;
- a branch container killed mid-training (`docker kill`) crashes its flow run, the parent
  retries, and the rescheduled branch resumes from its newest checkpoint in S3;
- a branch deployment whose image cannot start fails the parent with an error naming the
  image.

Needs a Docker engine (`docker info`), prefect-docker, and builds (cached) the CPU worker
image with scripts/build-images.sh; skipped with the reason otherwise. Run it alone with
`python -m pytest -q -rs -m docker tests/test_docker.py` (docs/deployments.md, "Docker").
S3 credentials reach the containers through a Prefect AwsCredentials block; none are
in the image, the config or the pool.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import boto3
import pytest
import yaml

from tests.conftest import build_tiny_llama
from tests.helpers import write_jsonl_sources
from tests.test_e2e import Procs, _free_port, _wait_healthy

pytestmark = pytest.mark.docker

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
IMAGE = os.environ.get("MERIT_DOCKER_IMAGE", "merit-cpu:latest")
MISSING_IMAGE = "merit-cpu:no-such-tag"
SOURCES = ["alpha", "beta", "gamma", "delta"]
BLOCK = "merit-docker-s3"
KEY_ID, SECRET = "AKIAMERITDOCKER00001", "merit-docker-secret-never-baked"


def _docker_unavailable() -> str | None:
    if shutil.which("docker") is None:
        return "no docker CLI on PATH (bash scripts/docker-engine.sh; docs/deployments.md, section 9)"
    res = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True,
                         timeout=30, check=False)
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["no output"])[-1]
        return f"no Docker engine answers `docker info` ({last}); start one: bash scripts/docker-engine.sh (docs/deployments.md, section 9)"
    if importlib.util.find_spec("prefect_docker") is None:
        return "prefect-docker is not installed (pip install -e '.[docker]')"
    return None


def _sh(cmd: list[str], env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert res.returncode == 0, f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


@pytest.fixture(scope="module")
def image() -> str:
    """The CPU worker image with this checkout's code: built (layer cache: seconds when
    only code changed) by scripts/build-images.sh, unless MERIT_DOCKER_IMAGE names one."""
    reason = _docker_unavailable()
    if reason:
        print(f"\nSKIPPED docker tier: {reason}")
        pytest.skip(reason)
    if "MERIT_DOCKER_IMAGE" not in os.environ:
        t0 = time.monotonic()
        res = _sh(["bash", "scripts/build-images.sh"])
        print(f"\nimage build (cached layers): {time.monotonic() - t0:.1f} s; "
              + " ".join(line for line in res.stdout.splitlines() if line.startswith("build: merit-cpu")))
    return IMAGE


def _save_block(url: str) -> None:
    """A Prefect block of type aws-credentials (the fields prefect-aws's AwsCredentials has
    and tasks.credentials reads without it), saved on the test server."""
    from prefect.blocks.core import Block
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from pydantic import SecretStr

    class AwsCredentials(Block):
        _block_type_name = "AWS Credentials"
        _block_type_slug = "aws-credentials"
        aws_access_key_id: str | None = None
        aws_secret_access_key: SecretStr | None = None
        region_name: str | None = None

    with temporary_settings(updates={PREFECT_API_URL: url}):
        AwsCredentials(aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET, region_name="us-east-1").save(
            BLOCK, overwrite=True)


def _prefect_file(tmp: Path) -> Path:
    """prefect.yaml as shipped, plus two test deployments: merit/full-fast-retry (the same
    flow, retried after 5 s, tests/fast_retry_flow.py) and merit-branch/docker-missing-image
    (merit-branch/docker-cpu with an image that does not exist)."""
    doc = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deps = doc["deployments"]
    full = next(d for d in deps if d["name"] == "full")
    fast = {k: v for k, v in full.items() if k not in ("triggers", "schedules", "concurrency_limit")}
    fast.update(name="full-fast-retry", entrypoint="tests/fast_retry_flow.py:merit_full_fast_retry")
    docker = next(d for d in deps if d["name"] == "docker-cpu")
    missing = {**docker, "name": "docker-missing-image",
               "work_pool": {**docker["work_pool"], "job_variables": {"image": MISSING_IMAGE}}}
    deps += [fast, missing]
    path = tmp / "prefect.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


class Stack:
    """Server, S3, pools, workers and deployments, started once for the module."""

    def __init__(self, tmp: Path, endpoint: str):
        self.tmp, self.endpoint = tmp, endpoint
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        (tmp / "logs").mkdir(exist_ok=True)
        self.procs = Procs(tmp / "logs")
        self.timings: dict[str, float] = {}
        self.bucket = f"merit-{uuid.uuid4().hex[:10]}"
        self.s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                               aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET)
        self.s3.create_bucket(Bucket=self.bucket)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_"))}
        env.update(
            PREFECT_HOME=str(tmp / "prefect-home"), PREFECT_API_URL=self.url,
            PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_SERVER_UI_ENABLED="false",
            PREFECT_WORKER_QUERY_SECONDS="2", PREFECT_CLI_WRAP_LINES="false",
            MERIT_CACHE_DIR=str(tmp / "cache"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
            AWS_EC2_METADATA_DISABLED="true", AWS_SHARED_CREDENTIALS_FILE=str(tmp / "no-aws-credentials"),
            PATH=f"{Path(PY).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        )
        self.env = env

    def start(self) -> None:
        (self.tmp / "prefect-home").mkdir(exist_ok=True)
        t0 = time.monotonic()
        server = self.procs.start("server", [PY, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                             "--port", str(self.port), "--no-ui", "--analytics-off"], self.env)
        _wait_healthy(self.url, server)
        self.timings["server start"] = time.monotonic() - t0
        t0 = time.monotonic()
        _save_block(self.url)
        _sh(["bash", "deployments/create-pools.sh", "--docker"], self.env)
        self.procs.start("worker", [PY, "-m", "prefect", "worker", "start", "--pool", "merit-process",
                                    "--type", "process", "--name", "parent-worker"], self.env)
        self.procs.start("docker-worker", [PY, "-m", "prefect", "worker", "start", "--pool", "merit-docker-cpu",
                                           "--type", "docker", "--name", "docker-worker"], self.env)
        _sh([PY, "-m", "prefect", "--no-prompt", "deploy", "--prefect-file", str(_prefect_file(self.tmp)),
             "--name", "full", "--name", "full-fast-retry", "--name", "docker-cpu",
             "--name", "docker-missing-image"], self.env)
        self.timings["pools + workers + deploy"] = time.monotonic() - t0

    def config(self, name: str, model_dir: Path, steps: int, save_steps: int) -> Path:
        specs = write_jsonl_sources(self.tmp / "data", SOURCES, n=24)
        raw = {
            "run": {"name": name, "branch_timeout_s": 600},
            "model": {"source": str(model_dir)},
            "data": {"sources": specs, "max_length": 64, "heldout_min": 4, "heldout_fraction": 0.2},
            "conflict": {"calibration_size": 8, "sketch": "countsketch", "sketch_dim": 256, "batch_size": 8},
            "split": {"r": 1},
            "train": {"learning_rate": 1e-3, "batch_size": 4, "max_steps": steps, "save_steps": save_steps,
                      "logging_steps": 1, "threads": 1},
            "eval": {"batch_size": 8, "max_examples_per_source": 4, "max_new_tokens": 2},
            "store": {"uri": f"s3://{self.bucket}/merit", "endpoint_url": self.endpoint, "region": "us-east-1",
                      "addressing_style": "path", "credentials_block": BLOCK},
            "baselines": {"joint": False, "random_split": False},
        }
        path = self.tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return path

    def run_full(self, deployment: str, config: Path, overrides: list[str], timeout: float = 540):
        """Start a flow run of ``deployment`` and wait until it is final; return it."""
        from prefect.client.orchestration import get_client
        from prefect.deployments import run_deployment
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: self.url}):
            run = run_deployment(deployment, parameters={"config_path": str(config), "overrides": overrides},
                                 timeout=0)
            t0 = time.monotonic()
            with get_client(sync_client=True) as client:
                while time.monotonic() - t0 < timeout:
                    run = client.read_flow_run(run.id)
                    if run.state is not None and run.state.is_final():
                        return run
                    time.sleep(1)
        raise AssertionError(f"{deployment} run {run.id} not final after {timeout} s: {run.state}\n"
                             f"--- parent worker ---\n{self.procs.tail('worker', 80)}\n"
                             f"--- docker worker ---\n{self.procs.tail('docker-worker', 80)}")

    def keys(self, prefix: str) -> list[str]:
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [o["Key"] for p in pages for o in p.get("Contents", [])]

    def json(self, key: str) -> dict:
        return json.loads(self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read())

    def run_id(self, flow_run) -> str:
        (key,) = [k for k in self.keys("merit/runs/") if k.endswith("/report/report.json")
                  and str(flow_run.id)[:8] in k]
        return key.split("/")[2]

    def merged_sha(self, run_id: str) -> str:
        """sha256 of the merged model.safetensors, hashed here from the S3 object's bytes
        and checked against the merged directory's manifest."""
        key = f"merit/runs/{run_id}/merit/merged"
        data = self.s3.get_object(Bucket=self.bucket, Key=f"{key}/model.safetensors")["Body"].read()
        sha = hashlib.sha256(data).hexdigest()
        assert self.json(f"{key}/manifest.json")["files"]["model.safetensors"]["sha256"] == sha
        return sha

    def branch_runs(self, run_id: str) -> list:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import FlowFilter, FlowFilterName
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: self.url}), get_client(sync_client=True) as client:
            runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["merit-branch"])))
        return sorted((r for r in runs if r.parameters.get("run_id") == run_id), key=lambda r: r.parameters["index"])

    def logs(self) -> str:
        return (f"--- parent worker ---\n{self.procs.tail('worker', 80)}\n"
                f"--- docker worker ---\n{self.procs.tail('docker-worker', 120)}")


@pytest.fixture(scope="module")
def stack(image, tmp_path_factory, s3_endpoint, tiny_tokenizer):
    tmp = tmp_path_factory.mktemp("docker-tier")
    model_dir = tmp / "tiny-base"
    build_tiny_llama(len(tiny_tokenizer)).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    s = Stack(tmp, s3_endpoint)
    s.model_dir = model_dir
    try:
        s.start()
        yield s
    finally:
        s.procs.stop_all()
        # branch containers the worker left running (a failed test): ours by their run names
        names = subprocess.run(["docker", "ps", "--format", "{{.ID}} {{.Names}}"], capture_output=True, text=True,
                               check=False).stdout.splitlines()
        for line in names:
            cid, name = line.split(maxsplit=1)
            if name.startswith(("docker-", "docker-kill-", "docker-missing-")) and "-merit-branch-" in name:
                subprocess.run(["docker", "kill", cid], capture_output=True, check=False)
        print("\ndocker tier timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in s.timings.items()))
    for name, p in s.procs.started:
        assert p.poll() is not None, f"{name} (pid {p.pid}) still running"


def test_branches_in_containers_merge_to_the_in_process_weights(stack):
    config = stack.config("docker", stack.model_dir, steps=4, save_steps=100)
    # reference: the same config, branches in the parent's process (merit/full on the process pool)
    t0 = time.monotonic()
    ref = stack.run_full("merit/full", config, ["run.branch_execution=local"])
    stack.timings["in-process run"] = time.monotonic() - t0
    assert ref.state.is_completed(), (ref.state, stack.logs())
    # every branch in its own container of merit-branch/docker-cpu
    t0 = time.monotonic()
    run = stack.run_full("merit/full", config, ["run.branch_execution=deployment", "run.rerun=full",
                                                "run.branch_deployment=merit-branch/docker-cpu"])
    stack.timings["docker run (e2e)"] = time.monotonic() - t0
    assert run.state.is_completed(), (run.state, stack.logs())

    ref_id, run_id = stack.run_id(ref), stack.run_id(run)
    assert stack.merged_sha(run_id) == stack.merged_sha(ref_id)
    branches = stack.branch_runs(run_id)
    assert [r.parameters["index"] for r in branches] == [0, 1]
    report = stack.json(f"merit/runs/{run_id}/report/report.json")
    for r, ref_branch in zip(branches, report["branches"]["merit"]):
        assert r.state.is_completed() and r.work_pool_name == "merit-docker-cpu", (r.name, r.state)
        t = ref_branch["timing"]
        stack.timings[f"branch {r.parameters['index']} queued (container start)"] = t["queued_s"]
        stack.timings[f"branch {r.parameters['index']} start-up in container"] = t["startup_s"]
        stack.timings[f"branch {r.parameters['index']} wall"] = t["wall_s"]
    # credentials: in the block only, never in the image, the config or the pool
    history = _sh(["docker", "history", "--no-trunc", IMAGE]).stdout
    inspect = _sh(["docker", "image", "inspect", IMAGE]).stdout
    assert SECRET not in history + inspect and KEY_ID not in history + inspect
    assert SECRET not in config.read_text()


def test_killed_branch_container_is_retried_and_resumes_from_its_checkpoint(stack):
    config = stack.config("docker-kill", stack.model_dir, steps=60, save_steps=2)
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: stack.url}):
        parent = run_deployment("merit/full-fast-retry", timeout=0, parameters={
            "config_path": str(config),
            "overrides": ["run.branch_execution=deployment", "run.rerun=full", "run.branch_deployment=merit-branch/docker-cpu"]})
    prefix = f"merit/runs/docker-kill-{str(parent.id)[:8]}/merit/branches/0-checkpoints/"
    # wait until branch 0 has a checkpoint in S3, then kill its container
    t0, killed = time.monotonic(), None
    while time.monotonic() - t0 < 300 and killed is None:
        if any(k.endswith("/manifest.json") for k in stack.keys(prefix)):
            names = _sh(["docker", "ps", "--format", "{{.ID}} {{.Names}}"]).stdout.splitlines()
            target = [n.split()[0] for n in names if n.endswith("-merit-branch-0") and "docker-kill-" in n]
            if target:
                _sh(["docker", "kill", target[0]])
                killed = target[0]
                stack.timings["kill after"] = time.monotonic() - t0
                break
        time.sleep(0.2)
    assert killed, f"branch 0 never had a checkpoint while its container ran\n{stack.logs()}"
    with temporary_settings(updates={PREFECT_API_URL: stack.url}), get_client(sync_client=True) as client:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 540:
            parent = client.read_flow_run(parent.id)
            if parent.state.is_final():
                break
            time.sleep(1)
    assert parent.state.is_completed(), (parent.state, stack.logs())
    assert parent.run_count == 2  # the crash failed the first attempt; the flow retry finished it
    run_id = stack.run_id(parent)
    b0, _b1 = stack.branch_runs(run_id)
    assert b0.run_count == 2 and b0.state.is_completed()  # rescheduled after the crash, in a new container
    report = stack.json(f"merit/runs/{run_id}/report/report.json")
    resumed = report["branches"]["merit"][0]["resumed_from_step"]
    assert resumed >= 2 and resumed % 2 == 0, report["branches"]["merit"][0]
    assert report["branches"]["merit"][0]["steps"] == 60
    assert not stack.keys(prefix)  # checkpoints deleted once θ_0 was committed
    stack.timings["kill: resumed from step"] = resumed


def test_unstartable_image_fails_the_parent_naming_the_image(stack):
    config = stack.config("docker-missing", stack.model_dir, steps=2, save_steps=100)
    t0 = time.monotonic()
    run = stack.run_full("merit/full-fast-retry", config, [
        "run.branch_execution=deployment", "run.rerun=full", "run.branch_deployment=merit-branch/docker-missing-image"])
    stack.timings["missing image: parent failed after"] = time.monotonic() - t0
    assert run.state.is_failed(), (run.state, stack.logs())
    message = run.state.message or ""
    print(f"\nparent's error: {message}")
    assert f"image {MISSING_IMAGE}" in message and "merit-docker-cpu" in message, message
    assert "branch merit/0" in message and "Crashed" in message, message
