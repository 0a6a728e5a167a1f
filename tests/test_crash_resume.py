"""A `merit run` killed by SIGKILL is continued by the same command (issue 15, point 6):
same run id, finished work kept, the branch resumes from its checkpoint in the store,
work directories cleaned when the run finishes; `--fresh`, `--resume RUN` and `merit gc`.

The SIGKILL test runs the real `merit` command in subprocesses, against the Prefect
server of prefect_test_harness (PREFECT_API_URL), with a local store."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import yaml
from prefect.testing.utilities import prefect_test_harness

from merit_core.config import ConfigError, MeritConfig
from merit_core.pipeline import resume
from merit_core.store import LocalStore
from tests.test_flow import tiny_config


@pytest.fixture(scope="module")
def api_url():
    from prefect.settings import PREFECT_API_URL

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


def _merit(args, env, **kw):
    return subprocess.Popen([sys.executable, "-m", "merit_cli.main", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def test_sigkilled_run_is_continued_by_the_same_command(api_url, tmp_path, tiny_model_dir):
    cfg = tiny_config(tmp_path, tiny_model_dir, train={"epochs": 4, "save_steps": 2, "threads": 1},
                      baselines={"joint": False, "random_split": False}).model_dump(mode="json")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    store, cache = tmp_path / "store", tmp_path / "cache"
    env = {**os.environ, "PREFECT_API_URL": api_url, "MERIT_CACHE_DIR": str(cache)}

    first = _merit(["run", str(path)], env)
    t0 = time.time()
    while not list(store.glob("runs/*/merit/branches/0-checkpoints/checkpoint-*/manifest.json")):
        assert first.poll() is None, f"the run ended before its first checkpoint:\n{first.stdout.read()[-3000:]}"
        assert time.time() - t0 < 240
        time.sleep(0.05)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    (dead,) = resume.read_runs(LocalStore(store))
    assert dead.status == "running" and dead.pid == first.pid and not resume.owner_alive(dead)
    assert (cache / "work" / dead.run_id / "merit" / "0" / "checkpoints").is_dir()  # left behind by the kill

    second = _merit(["run", str(path)], env)
    out, _ = second.communicate(timeout=400)
    assert second.returncode == 0, out[-3000:]
    assert f"resuming run {dead.run_id}" in out
    (record,) = resume.read_runs(LocalStore(store))
    assert record.run_id == dead.run_id and record.status == "finished"
    report = json.loads((store / "runs" / dead.run_id / "report" / "report.json").read_text())
    b0 = report["branches"]["merit"][0]
    assert b0["resumed_from_step"] >= 2 and b0["steps"] == 32  # 2 sources × 32 train examples / 8 per step = 8 steps × 4 epochs
    assert not (cache / "work" / dead.run_id).exists(), "the finished run left its work directories"
    assert not list(store.glob("runs/*/merit/branches/*-checkpoints/*"))

    # the run is finished: the same command now starts a new run; --resume of the finished run is refused
    done = subprocess.run([sys.executable, "-m", "merit_cli.main", "run", str(path), "--resume", dead.run_id],
                          env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2 and f"run {dead.run_id!r} is finished" in done.stderr


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _record(run_id: str, fp: str, status="running", pid=None, host=None) -> resume.RunRecord:
    return resume.RunRecord(run_id=run_id, fingerprint=fp, status=status, host=host or socket.gethostname(),
                            pid=pid or _dead_pid(), started_at=time.time(), updated_at=time.time())


def _cfg(mode: str) -> MeritConfig:
    return MeritConfig.model_validate({"run": {"resume": mode}})


def test_claim_run_modes(tmp_path):
    store = LocalStore(tmp_path / "store", cache_dir=tmp_path / "cache")
    resume._write_runs(store, [
        _record("old-dead", "fp"), _record("alive", "fp", pid=os.getppid()), _record("other-host", "fp", host="elsewhere"),
        _record("other-config", "fp2"), _record("done", "fp", status="finished")])
    assert resume.claim_run(store, _cfg("auto"), "fp", "new-1").run_id == "old-dead"  # the only dead one
    assert resume.claim_run(store, _cfg("auto"), "fp3", "new-2").run_id == "new-2"
    assert resume.claim_run(store, _cfg("never"), "fp", "new-3").run_id == "new-3"
    with pytest.raises(ConfigError, match="is finished"):
        resume.claim_run(store, _cfg("done"), "fp", "x")
    with pytest.raises(ConfigError, match="another config"):
        resume.claim_run(store, _cfg("other-config"), "fp", "x")
    with pytest.raises(ConfigError, match="still owned by process"):
        resume.claim_run(store, _cfg("alive"), "fp", "x")
    with pytest.raises(ConfigError, match="no run 'nope'"):
        resume.claim_run(store, _cfg("nope"), "fp", "x")


def test_gc_removes_dead_runs_checkpoints_and_work_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("MERIT_CACHE_DIR", str(tmp_path / "cache"))
    store = LocalStore(tmp_path / "store", cache_dir=tmp_path / "cache")
    for run_id in ("dead", "live"):
        d = tmp_path / "x" / run_id
        d.mkdir(parents=True)
        (d / "w.bin").write_bytes(b"0" * 10)
        store.commit_dir(f"runs/{run_id}/merit/branches/0-checkpoints/checkpoint-2", d)
        store.commit_dir(f"runs/{run_id}/merit/branches/1", d)
        (resume.work_root(run_id) / "merit" / "0").mkdir(parents=True)
    resume._write_runs(store, [_record("dead", "fp"), _record("live", "fp", pid=os.getppid())])
    gone = resume.collect_garbage(store)
    assert [r.run_id for r in gone] == ["dead"]
    assert store.list_complete("runs/dead") == ["runs/dead/merit/branches/1"]  # finished branch kept
    assert not resume.work_root("dead").exists() and resume.work_root("live").exists()
    assert len(store.list_complete("runs/live")) == 2
    assert {r.run_id: r.status for r in resume.read_runs(store)} == {"dead": "abandoned", "live": "running"}
