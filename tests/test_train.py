"""Branch training on the tiny Llama: token counts, resume equivalence, DeepSpeed errors."""

from __future__ import annotations

import logging
import shutil
import statistics

import pytest
import torch
from safetensors.torch import load_file

from merit_core.config import TrainConfig
from merit_core.train import TrainError, newest_checkpoint, train_branch, trained_token_count
from tests.helpers import synthetic_examples, tokenize_all


@pytest.fixture()
def examples(tiny_tokenizer):
    ex = []
    for i, name in enumerate(["a", "b"]):
        ex += tokenize_all(tiny_tokenizer, synthetic_examples(name, 12, i), name)
    return ex


def _weights(d):
    return load_file(str(d / "model.safetensors"))


def test_branch_trains_and_counts_tokens(tiny_model_dir, examples, tmp_path):
    cfg = TrainConfig(learning_rate=1e-3, batch_size=4, epochs=1, save_steps=100, logging_steps=1)
    res = train_branch(tiny_model_dir, examples, tmp_path / "out", cfg, checkpoint_dir=tmp_path / "ck")
    expected_tokens = sum(sum(1 for t in e.labels if t != -100) for e in examples)
    assert res.trained_tokens == expected_tokens == trained_token_count(examples, cfg)
    assert res.steps == 6  # 24 examples / batch 4, one epoch
    base = _weights(tiny_model_dir)
    new = _weights(tmp_path / "out")
    assert set(base) == set(new)
    assert any(not torch.equal(base[k], new[k]) for k in base), "training changed no weight"
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def test_training_progress_reaches_the_logger_and_the_hook(tiny_model_dir, examples, tmp_path, caplog):
    cfg = TrainConfig(learning_rate=1e-3, batch_size=4, epochs=1, save_steps=100, logging_steps=1,
                      lr_scheduler="linear", warmup_ratio=0)
    seen = []

    def hook(p):
        seen.append(p)
        if p.step == 3:
            raise ConnectionError("the API is away")  # a failing hook must not stop training

    with caplog.at_level(logging.INFO, logger="merit_core.train.progress"):
        res = train_branch(tiny_model_dir, examples, tmp_path / "out", cfg, checkpoint_dir=tmp_path / "ck",
                           on_progress=hook)
    steps, final = [p for p in seen if not p.final], seen[-1]
    assert res.steps == 6 and [p.step for p in steps] == [1, 2, 3, 4, 5, 6] and {p.max_steps for p in seen} == {6}
    for p in steps:  # linear decay from 1e-3 to 0 over 6 steps: step s used 1e-3 * (6 - (s - 1)) / 6
        assert p.learning_rate == pytest.approx(1e-3 * (7 - p.step) / 6, abs=1e-12)
        assert p.loss > 0 and p.grad_norm > 0 and p.fraction == p.step / 6
    assert all(p.samples_per_s == pytest.approx(4 * p.steps_per_s) for p in steps if p.steps_per_s is not None)
    assert sum(p.steps_per_s is not None for p in steps) >= 5
    # the closing log carries the run's mean loss, the mean of the per-step losses
    assert final.final and final.step == 6 and final.loss == pytest.approx(res.train_loss)
    assert final.steps_per_s == pytest.approx(6 / final.elapsed_s, rel=0.05)  # the whole run's rate
    assert statistics.mean(p.loss for p in steps) == pytest.approx(res.train_loss, abs=1e-3)
    logged = [r.getMessage() for r in caplog.records if r.name == "merit_core.train.progress"]
    assert [m for m in logged if not m.startswith("training progress hook")] == [p.line() for p in seen]
    assert any("training progress hook" in m and "failed" in m for m in logged)
    assert logged[2].startswith("step 3/6 (50%): loss ") and ", lr 6.67e-04, grad norm " in logged[2]


def test_resume_after_interruption_matches_uninterrupted(tiny_model_dir, examples, tmp_path):
    cfg = TrainConfig(learning_rate=1e-3, batch_size=4, epochs=1, save_steps=2, logging_steps=1)
    full = train_branch(tiny_model_dir, examples, tmp_path / "full", cfg, checkpoint_dir=tmp_path / "ck-full")
    # An interrupted run leaves only the checkpoints written before it died: keep
    # checkpoint-4 of the full run alone in a fresh checkpoint dir and resume from it.
    (tmp_path / "ck").mkdir()
    shutil.copytree(tmp_path / "ck-full" / "checkpoint-4", tmp_path / "ck" / "checkpoint-4")
    assert newest_checkpoint(tmp_path / "ck").name == "checkpoint-4"
    resumed = train_branch(tiny_model_dir, examples, tmp_path / "resumed", cfg, checkpoint_dir=tmp_path / "ck")
    assert resumed.resumed_from_step == 4
    assert resumed.steps == full.steps
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "resumed")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_deepspeed_without_cuda_fails_clearly(tiny_model_dir, examples, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the no-CUDA error path is not reachable")
    cfg = TrainConfig(deepspeed="deployments/ds_zero2.json")
    with pytest.raises(TrainError, match="needs CUDA"):
        train_branch(tiny_model_dir, examples, tmp_path / "o", cfg)


def test_empty_branch_refused(tiny_model_dir, tmp_path):
    with pytest.raises(TrainError, match="no training examples"):
        train_branch(tiny_model_dir, [], tmp_path / "o", TrainConfig())
