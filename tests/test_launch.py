"""One branch on several processes: torch's elastic launcher (gloo DDP on CPU here,
NCCL/DeepSpeed on GPUs) started by merit_core.train.launch, through the branch stage and
its store."""

from __future__ import annotations

import contextvars
import logging
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from merit_core.pipeline.base import prepare_base
from merit_core.pipeline.branches import CheckpointUpload, train_branch
from merit_core.pipeline.mixture import load_split, resolve_mixture
from merit_core.refs import TrainStats, write_examples
from merit_core.store import open_store
from merit_core.train import (
    TrainError,
    TrainSetupError,
    resolve_nproc,
    run_distributed_branch,
    trained_token_count,
)
from tests.test_flow import SOURCES, tiny_config


@pytest.fixture()
def prepared(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("MERIT_CACHE_DIR", str(tmp_path / "cache"))
    cfg = tiny_config(tmp_path, tiny_model_dir, train={"batch_size": 4, "save_steps": 3})
    store = open_store(cfg.store)
    base = prepare_base(cfg, store)
    mixture = resolve_mixture(cfg, store, base)
    return cfg, base, mixture


def test_branch_on_two_processes_matches_one_process(prepared):
    cfg, base, mixture = prepared
    one = train_branch(cfg, open_store(cfg.store), base, mixture, SOURCES[:2], run_id="r1", label="merit", index=0)
    cfg2 = cfg.model_copy(update={"train": cfg.train.model_copy(update={"nproc_per_node": 2})})
    two = train_branch(cfg2, open_store(cfg2.store), base, mixture, SOURCES[:2], run_id="r2", label="merit", index=0)
    assert (one.processes, two.processes) == (1, 2)
    # same global batch -> the same steps and N_k whatever the process count
    assert two.steps == one.steps and two.trained_tokens == one.trained_tokens and two.examples == one.examples
    n_train = sum(mixture.get(s).train for s in SOURCES[:2])
    assert one.steps == -(-n_train // 4)
    store = open_store(cfg.store)
    assert store.is_complete(two.key)
    assert store.list_complete(two.key + "-checkpoints") == []  # uploaded while training, removed at commit
    w1 = load_file(str(store.fetch_dir(one.key) / "model.safetensors"))
    w2 = load_file(str(store.fetch_dir(two.key) / "model.safetensors"))
    w0 = load_file(str(store.fetch_dir(base.key) / "model.safetensors"))
    # DDP averages per-rank mean losses, one process the mean over the batch: close, not equal
    d1 = torch.cat([(w1[k] - w0[k]).flatten() for k in w0])
    d2 = torch.cat([(w2[k] - w0[k]).flatten() for k in w0])
    assert d2.norm() > 0
    assert torch.nn.functional.cosine_similarity(d1, d2, dim=0) > 0.8


def test_rank0_uploads_checkpoints_to_the_store(prepared, tmp_path, caplog):
    cfg, base, mixture = prepared
    store = open_store(cfg.store)
    examples = []
    for name in SOURCES[:2]:
        examples += load_split(store, mixture.get(name), "train")
    write_examples(tmp_path / "ex.jsonl", examples)
    caller = contextvars.ContextVar("caller")
    caller.set("the test's context")
    seen = []  # (progress, the caller's context variable as the hook saw it)
    with caplog.at_level(logging.INFO, logger="merit_core.train.progress"):
        res = run_distributed_branch(store.fetch_dir(base.key), tmp_path / "ex.jsonl", tmp_path / "out", cfg.train,
                                     nproc=2, checkpoint_dir=tmp_path / "ck",
                                     on_checkpoint=CheckpointUpload(store, "runs/x/ck"),
                                     on_progress=lambda p: seen.append((p, caller.get(None))))
    assert isinstance(res, TrainStats)
    # rank 0's Trainer logs reach the parent: logged here and hooked in the caller's context
    assert [p.step for p, _ in seen] == [*range(1, res.steps + 1), res.steps] and seen[-1][0].final
    assert {ctx for _, ctx in seen} == {"the test's context"}
    assert seen[-1][0].loss == pytest.approx(res.train_loss)
    assert all(p.samples_per_s == pytest.approx(4 * p.steps_per_s) for p, _ in seen if p.steps_per_s)
    logged = [r.getMessage() for r in caplog.records if r.name == "merit_core.train.progress"]
    assert logged == [p.line() for p, _ in seen]
    assert res.processes == 2 and res.steps == -(-len(examples) // 4) >= 3
    assert res.examples == len(examples)
    assert res.trained_tokens == sum(sum(t != -100 for t in e.labels) for e in examples)
    assert res.trained_tokens == trained_token_count(examples, cfg.train)
    complete = store.list_complete("runs/x/ck")
    assert complete and all("checkpoint-" in k for k in complete)
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_failing_rank_raises_with_its_root_cause(prepared, tmp_path):
    cfg, _, _ = prepared
    with pytest.raises(TrainError, match=r"exitcode\s*:\s*[1-9](.|\n)*none\.jsonl") as err:
        run_distributed_branch(tmp_path / "does-not-exist", tmp_path / "none.jsonl", tmp_path / "out", cfg.train,
                               nproc=2, checkpoint_dir=tmp_path / "ck")
    assert err.type is TrainError
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["no examples", "batch not divisible"])
def test_setup_error_in_the_ranks_reaches_the_parent_as_setup_error(prepared, tmp_path, case):
    cfg, base, mixture = prepared
    store = open_store(cfg.store)
    examples = [] if case == "no examples" else load_split(store, mixture.get(SOURCES[0]), "train")
    write_examples(tmp_path / "ex.jsonl", examples)
    train = cfg.train.model_copy(update={"batch_size": 3})  # not divisible by the 2 processes
    expected = "no training examples" if case == "no examples" else "batch_size=3 is not divisible by the 2"
    with pytest.raises(TrainSetupError, match=expected):
        run_distributed_branch(store.fetch_dir(base.key), tmp_path / "ex.jsonl", tmp_path / "out", train,
                               nproc=2, checkpoint_dir=tmp_path / "ck")
    assert not (tmp_path / "out").exists()


def test_launcher_imports_no_pipeline_module():
    code = ("import sys, merit_core.train.launch\n"
            "bad = sorted(m for m in sys.modules if m == 'merit_core.pipeline' or m.startswith('merit_core.pipeline.'))\n"
            "print(bad); sys.exit(1 if bad else 0)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_resolve_nproc():
    assert resolve_nproc(3) == 3
    expected = torch.cuda.device_count() if torch.cuda.is_available() else 1
    assert resolve_nproc("auto") == max(1, expected)
