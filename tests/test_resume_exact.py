"""Branch resume is bit-exact at any step (issue 15, point 3): with ``group_by_length``
on, killed after epoch 1, the resumed branch ends with exactly the weights of an
uninterrupted run, and its reported train loss is the whole run's."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from merit_core.config import TrainConfig
from merit_core.train import train_branch
from tests.helpers import synthetic_examples, tokenize_all


@pytest.fixture()
def examples(tiny_tokenizer):
    ex = []
    for i, name in enumerate(["a", "b"]):
        ex += tokenize_all(tiny_tokenizer, synthetic_examples(name, 12, i), name)
    assert len({len(e.input_ids) for e in ex}) > 1, "group_by_length needs examples of different lengths"
    return ex


@pytest.mark.parametrize("resume_step", [4, 10, 14])  # epoch 1, mid epoch 2, mid epoch 3 (6 steps per epoch)
def test_resume_is_bit_exact_in_any_epoch_with_group_by_length(tiny_model_dir, examples, tmp_path, resume_step):
    cfg = TrainConfig(learning_rate=1e-3, batch_size=4, epochs=3, save_steps=2, logging_steps=3,
                      group_by_length=True, seed=7)
    kept = tmp_path / "kept"  # the Trainer keeps only the last 2 checkpoints: copy each as it is written
    full = train_branch(tiny_model_dir, examples, tmp_path / "full", cfg, checkpoint_dir=tmp_path / "ck-full",
                        on_checkpoint=lambda p: shutil.copytree(p, kept / p.name))
    assert full.steps == 18
    # A branch killed after checkpoint-<resume_step> leaves that checkpoint only.
    (tmp_path / "ck").mkdir()
    name = f"checkpoint-{resume_step}"
    shutil.copytree(kept / name, tmp_path / "ck" / name)
    resumed = train_branch(tiny_model_dir, examples, tmp_path / "resumed", cfg, checkpoint_dir=tmp_path / "ck")
    assert resumed.resumed_from_step == resume_step and resumed.steps == full.steps
    a, b = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(str(tmp_path / "resumed" / "model.safetensors"))
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differing, f"resumed weights differ from the uninterrupted run's in {differing}"
    # the loss reported covers all 18 steps, not only the 18 - resume_step resumed ones
    assert resumed.train_loss == pytest.approx(full.train_loss, rel=1e-6)  # float32 vs float64 partial sums
