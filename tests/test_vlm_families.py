"""A second vision-language family (issue 16): a tiny random LLaVA (CLIP vision tower +
MLP projector + Llama) through gradients, two branches, the token-weighted merge and
held-out evaluation, with its vision tower and projector frozen bit for bit."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from merit_core.config import DataConfig, SourceSpec, TrainConfig
from merit_core.conflict.gradient import _is_vision, source_gradient
from merit_core.data import resolve_mixture
from merit_core.evaluate import evaluate_dir
from merit_core.merge import merge_checkpoints
from merit_core.train import train_branch
from tests.vlm_helpers import tiny_llava_dir


def _weights(d):
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_llava_gradients_branches_merge_and_evaluation(tmp_path, tiny_tokenizer, monkeypatch):
    monkeypatch.setenv("MERIT_CACHE_DIR", str(tmp_path / "cache"))
    from transformers import AutoModelForImageTextToText

    from merit_core.batching import batches
    from merit_core.vlm import load_processor

    base = tiny_llava_dir(tmp_path / "llava", tiny_tokenizer)
    processor = load_processor(base)
    assert type(processor).__name__ == "LlavaProcessor"
    specs = [SourceSpec(name=t, kind="synthetic_images", task=t, max_examples=24)
             for t in ("name_colour", "count_shapes")]
    mixture = resolve_mixture(DataConfig(sources=specs, max_length=96, heldout_min=6), processor.tokenizer,
                              calibration_size=8, processor=processor)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert all(sum(t == image_id for t in e.input_ids) == 4 for e in mixture.train_examples())

    # calibration gradient over the language model only: the vision part gets none
    model = AutoModelForImageTextToText.from_pretrained(base).eval()
    calib = mixture.sources["name_colour"].calibration
    g_lm = source_gradient(model, batches(calib, 8, processor.tokenizer.pad_token_id), trainable="lm")
    g_all = source_gradient(model, batches(calib, 8, processor.tokenizer.pad_token_id), trainable="all")
    n_lm = sum(p.numel() for n, p in model.named_parameters() if not _is_vision(n))
    assert g_lm.shape == (n_lm,) and g_all.shape[0] > n_lm and float(abs(g_lm).sum()) > 0

    cfg = TrainConfig(learning_rate=1e-2, batch_size=6, epochs=1, save_steps=100, logging_steps=1, warmup_ratio=0)
    branches, tokens = [], []
    for name in mixture.names:
        out = tmp_path / f"branch-{name}"
        stats = train_branch(base, mixture.sources[name].train, out, cfg, trainable="lm")
        assert stats.frozen_parameters == sum(p.numel() for n, p in model.named_parameters() if _is_vision(n))
        assert not stats.packed and stats.steps == 3
        branches.append(out)
        tokens.append(stats.trained_tokens)
    merged = tmp_path / "merged"
    merge_checkpoints(branches, tokens, merged, method="token_weighted")

    theta0 = _weights(base)
    frozen = [n for n in theta0 if _is_vision(n)]
    assert any("vision_tower" in n for n in frozen) and any("multi_modal_projector" in n for n in frozen)
    for d in [*branches, merged]:
        w = _weights(d)
        assert all(torch.equal(w[n], theta0[n]) for n in frozen), d
        assert any(not torch.equal(w[n], theta0[n]) for n in theta0 if n not in frozen), d
    # token-weighted merge of a trained tensor: w_k = N_k / ΣN
    name = next(n for n in theta0 if n not in frozen and theta0[n].dim() == 2)
    expect = sum(t / sum(tokens) * _weights(b)[name] for t, b in zip(tokens, branches))
    assert torch.allclose(_weights(merged)[name], expect, atol=1e-6)

    # the merged model loads with from_pretrained and its processor, and evaluates
    assert type(AutoModelForImageTextToText.from_pretrained(merged)).__name__ == "LlavaForConditionalGeneration"
    assert type(load_processor(merged)).__name__ == "LlavaProcessor"
    heldout = {n: mixture.sources[n].heldout for n in mixture.names}
    table = evaluate_dir(merged, heldout, batch_size=4, max_new_tokens=3, device="cpu")
    for row in table.rows:
        assert row.n == 6 and row.loss is not None and row.loss > 0 and row.exact_match is not None
    # held-out loss equals a direct forward pass with the image inputs
    from merit_core.batching import mean_response_loss

    m = AutoModelForImageTextToText.from_pretrained(merged).eval()
    direct = mean_response_loss(m, heldout["name_colour"], processor.tokenizer.pad_token_id, batch_size=6)
    assert table.rows[0].loss == pytest.approx(direct, rel=1e-5)
