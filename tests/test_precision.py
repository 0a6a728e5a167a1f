"""bf16 mixed precision (merit_core.precision) in the calibration gradients, evaluation
and training: autocast is really on, the results stay close to float32, weights stay
float32, and a device without bf16 falls back to float32 with a warning."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from merit_core import precision
from merit_core.batching import batches
from merit_core.config import TrainConfig
from merit_core.conflict import FullSketch, conflict_matrix, source_gradient
from merit_core.evaluate import evaluate_model
from merit_core.train import train_branch
from tests.conftest import build_tiny_llama
from tests.helpers import synthetic_examples, tokenize_all
from tests.test_conflict import PAD, SOURCE_SPEC, VOCAB, exact_gradient, flat, make_source, offdiag


def test_bf16_calibration_gradients_keep_the_conflict_matrix():
    model = build_tiny_llama(VOCAB, hidden=64)
    sources = [make_source(c, i, noise) for i, (c, noise) in enumerate(SOURCE_SPEC)]
    exact = np.stack([flat(exact_gradient(model, s)) for s in sources])  # float32 autograd, independent
    fp32 = np.stack([source_gradient(model, batches(s, 5, PAD), sketcher=FullSketch()) for s in sources])
    bf16 = np.stack([source_gradient(model, batches(s, 5, PAD), sketcher=FullSketch(), bf16=True) for s in sources])
    assert bf16.dtype == np.float32
    # autocast really ran: the bf16 gradients differ from float32 ones ...
    assert np.abs(bf16 - fp32).max() > 1e-5
    # ... but the conflict matrix (what the split uses) barely moves.
    c_exact, c_bf16 = conflict_matrix(exact), conflict_matrix(bf16)
    assert np.abs(offdiag(c_bf16) - offdiag(c_exact)).max() < 0.05
    assert np.corrcoef(offdiag(c_bf16), offdiag(c_exact))[0, 1] > 0.99
    assert all(p.dtype == torch.float32 and p.grad is None for p in model.parameters())


def test_bf16_evaluation_runs_matmuls_in_bf16(tiny_model, tiny_tokenizer):
    heldout = {"a": tokenize_all(tiny_tokenizer, synthetic_examples("a", 6, 0), "a")}
    seen: list[torch.dtype] = []
    linear = next(m for m in tiny_model.modules() if isinstance(m, torch.nn.Linear))
    handle = linear.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    try:
        fp32 = evaluate_model(tiny_model, tiny_tokenizer, heldout, batch_size=3, generate=False)
        assert set(seen) == {torch.float32}
        seen.clear()
        bf16 = evaluate_model(tiny_model, tiny_tokenizer, heldout, batch_size=3, generate=True,
                              max_new_tokens=3, bf16=True)
        assert set(seen) == {torch.bfloat16}
    finally:
        handle.remove()
    assert bf16.row("a").loss == pytest.approx(fp32.row("a").loss, rel=0.02)
    assert bf16.row("a").loss != fp32.row("a").loss
    assert all(p.dtype == torch.float32 for p in tiny_model.parameters())
    # outside the call, autocast is off again
    assert linear(torch.zeros(1, linear.in_features)).dtype == torch.float32


def test_resolve_bf16_falls_back_with_a_warning(monkeypatch, caplog):
    assert precision.resolve_bf16(False, "cpu", "train.bf16") is False
    monkeypatch.setattr(precision, "bf16_supported", lambda device="cpu": False)
    with caplog.at_level(logging.WARNING, logger="merit_core.precision"):
        assert precision.resolve_bf16(True, "cpu", "eval.bf16") is False
    assert "eval.bf16" in caplog.text and "float32" in caplog.text
    monkeypatch.setattr(precision, "bf16_supported", lambda device="cpu": True)
    assert precision.resolve_bf16(True, "cpu", "eval.bf16") is True


def test_bf16_supported_answers_for_cpu():
    assert isinstance(precision.bf16_supported("cpu"), bool)
    assert precision.bf16_supported("meta") is False


@pytest.mark.skipif(not precision.bf16_supported("cpu"),
                    reason="this CPU has no native bf16 (AVX512-BF16/AMX), so train.bf16 falls back to float32")
def test_bf16_training_on_cpu_keeps_float32_weights(tiny_model_dir, tiny_tokenizer, tmp_path):
    examples = tokenize_all(tiny_tokenizer, synthetic_examples("a", 8, 0), "a")
    out = {}
    for bf16 in (False, True):
        cfg = TrainConfig(learning_rate=1e-3, batch_size=4, epochs=1, save_steps=100, bf16=bf16)
        res = train_branch(tiny_model_dir, examples, tmp_path / f"out-{bf16}", cfg,
                           checkpoint_dir=tmp_path / f"ck-{bf16}", resume=False)
        assert res.steps == 2
        out[bf16] = load_file(str(tmp_path / f"out-{bf16}" / "model.safetensors"))
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    assert {v.dtype for v in out[True].values()} == {torch.float32}
    # mixed precision changed the arithmetic, yet both runs moved the weights alike
    assert any(not torch.equal(out[True][k], out[False][k]) for k in base)
    for k in base:
        d32, d16 = out[False][k] - base[k], out[True][k] - base[k]
        if d32.norm() > 0:
            cos = torch.nn.functional.cosine_similarity(d32.flatten(), d16.flatten(), dim=0)
            assert cos > 0.9, k
