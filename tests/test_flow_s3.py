"""The pipeline with an S3 store (moto server on 127.0.0.1): a branch killed after a
checkpoint resumes from the store on a fresh worker and ends with the same weights as an
uninterrupted run; the whole `merit` flow runs against S3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid

import boto3
import pytest
import torch
from safetensors.torch import load_file

from merit_core.config import MeritConfig
from merit_core.pipeline.base import prepare_base
from merit_core.pipeline.branches import train_branch
from merit_core.pipeline.layout import SPLIT_STATE_INDEX_KEY, branch_key
from merit_core.pipeline.mixture import resolve_mixture
from merit_core.store import open_store
from tests.helpers import write_jsonl_sources

SOURCES = ["alpha", "beta", "gamma", "delta"]


@pytest.fixture(scope="module")
def endpoint(s3_endpoint):
    return s3_endpoint


@pytest.fixture()
def s3_config(endpoint, tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAMERITFLOWTEST0001")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "merit-flow-secret-never-logged")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("MERIT_CACHE_DIR", str(tmp_path / "worker-1"))
    bucket = f"merit-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    specs = write_jsonl_sources(tmp_path / "data", SOURCES, n=30)
    return MeritConfig.model_validate({
        "run": {"name": "s3"},
        "model": {"source": str(tiny_model_dir)},
        "data": {"sources": specs, "max_length": 64, "heldout_min": 6, "heldout_fraction": 0.2},
        "conflict": {"calibration_size": 8, "sketch_dim": 512},
        "split": {"r": 1},
        "train": {"learning_rate": 1e-3, "batch_size": 4, "save_steps": 2, "logging_steps": 1},
        "eval": {"batch_size": 8, "max_examples_per_source": 4, "max_new_tokens": 2},
        "baselines": {"joint": False, "random_split": False},
        "store": {"uri": f"s3://{bucket}/merit", "endpoint_url": endpoint, "region": "us-east-1",
                  "addressing_style": "path"},
    })


KILL_SCRIPT = textwrap.dedent("""
    import json, os, signal, sys
    from merit_core.refs import MixtureRef, ModelRef
    from merit_core.config import MeritConfig
    from merit_core.pipeline.branches import train_branch
    from merit_core.store import open_store
    cfg = MeritConfig.model_validate_json(open(sys.argv[1]).read())
    base = ModelRef.model_validate_json(open(sys.argv[2]).read())
    mixture = MixtureRef.model_validate_json(open(sys.argv[3]).read())
    sources = json.loads(sys.argv[4])
    def die(path):
        if path.name == "checkpoint-2":
            os.kill(os.getpid(), signal.SIGKILL)   # preempted right after the upload
    train_branch(cfg, open_store(cfg.store), base, mixture, sources, "run1", "merit", 0, after_checkpoint=die)
""")


def test_branch_killed_after_checkpoint_resumes_on_new_worker(s3_config, tmp_path, monkeypatch):
    cfg = s3_config
    store = open_store(cfg.store)
    base = prepare_base(cfg, store)
    mixture = resolve_mixture(cfg, store, base)
    sources = ["alpha", "beta"]
    # reference: the same branch, uninterrupted
    full = train_branch(cfg, store, base, mixture, sources, "run1", "reference", 0)
    assert full.steps >= 4

    # worker 1 trains the branch and is SIGKILLed just after checkpoint-2 reached the store
    files = {}
    for name, obj in [("cfg", cfg), ("base", base), ("mixture", mixture)]:
        files[name] = tmp_path / f"{name}.json"
        files[name].write_text(obj.model_dump_json())
    script = tmp_path / "worker.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.run([sys.executable, str(script), str(files["cfg"]), str(files["base"]),
                           str(files["mixture"]), json.dumps(sources)], env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == -9, proc.stderr[-2000:]
    key = branch_key("run1", "merit", 0)
    assert not store.is_complete(key)
    assert store.list_complete(key + "-checkpoints") == [key + "-checkpoints/checkpoint-2"]

    # worker 2 (empty local cache) runs the same branch: it resumes from checkpoint-2
    monkeypatch.setenv("MERIT_CACHE_DIR", str(tmp_path / "worker-2"))
    resumed = train_branch(cfg, open_store(cfg.store), base, mixture, sources, "run1", "merit", 0)
    assert resumed.resumed_from_step == 2
    assert resumed.steps == full.steps and resumed.trained_tokens == full.trained_tokens
    a = load_file(str(store.fetch_dir(full.key) / "model.safetensors"))
    b = load_file(str(store.fetch_dir(resumed.key) / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    # the training checkpoints are gone once θ_k is committed
    assert store.list_complete(key + "-checkpoints") == []


def test_merit_flow_with_s3_store(s3_config, tmp_path):
    from prefect.testing.utilities import prefect_test_harness

    from flows.merit import merit

    # a fifth source for the incremental rerun (the first four files are rewritten unchanged)
    specs = write_jsonl_sources(tmp_path / "data", [*SOURCES, "epsilon"], n=30)
    grown = s3_config.model_copy(update={
        "data": s3_config.data.model_copy(update={"sources": s3_config.data.sources + [
            type(s3_config.data.sources[0]).model_validate(specs[-1])]}),
        "run": s3_config.run.model_copy(update={"rerun": "incremental"})})
    with prefect_test_harness(server_startup_timeout=120):
        report = merit(config=s3_config)
        second = merit(config=grown)
    store = open_store(s3_config.store)
    assert report["report_uri"].startswith("s3://")
    merged_key = report["models"]["merit"]["key"]
    assert store.is_complete(merged_key)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(store.fetch_dir(merged_key))
    assert sum(p.numel() for p in model.parameters()) > 0
    assert len(report["branches"]["merit"]) == 2
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    assert secret not in json.dumps(report)

    # The rerun found the first run through the store's split-state index on S3 and
    # retrained only the group epsilon joined; the other branch is the first run's, unmoved.
    index = store.get_json(SPLIT_STATE_INDEX_KEY)["states"]
    assert [e["run_id"] for entries in index.values() for e in entries] == [report["run_id"], second["run_id"]]
    rerun = second["rerun"]
    assert rerun["mode"] == "incremental" and rerun["previous_run"] == report["run_id"]
    assert rerun["added"] == ["epsilon"]
    joined = rerun["placed"]["epsilon"]
    rows = {r["index"]: r for r in rerun["branches"]}
    assert rows[joined]["action"] == "retrained" and rows[joined]["from_run"] == second["run_id"]
    old = {b["index"]: b for b in report["branches"]["merit"]}
    new = {b["index"]: b for b in second["branches"]["merit"]}
    kept = 1 - joined
    assert rows[kept]["action"] == "reused" and new[kept]["key"] == old[kept]["key"]
    assert "epsilon" in new[joined]["sources"] and sorted(new[kept]["sources"]) == sorted(old[kept]["sources"])
    assert not store.is_complete(branch_key(second["run_id"], "merit", kept))
