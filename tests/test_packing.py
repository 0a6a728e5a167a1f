"""Padding-free packed batches (train.packing): each example attends only to itself,
and the loss and gradients equal those of padded batches of the same examples."""

from __future__ import annotations

import random

import pytest
import torch
from safetensors.torch import load_file
from transformers import DataCollatorForSeq2Seq

from merit_core.batching import PackedCollator, pack_rows, packing_supported, padded_real_token_fraction
from merit_core.config import ConfigError, TrainConfig, load_config
from merit_core.train import train_branch
from tests.conftest import build_tiny_llama
from tests.helpers import synthetic_examples, tokenize_all


def _features(examples):
    return [{"input_ids": e.input_ids, "labels": e.labels, "attention_mask": [1] * len(e.input_ids)}
            for e in examples]


@pytest.fixture()
def examples(tiny_tokenizer):
    ex = []
    for i, name in enumerate(["a", "b", "c"]):
        ex += tokenize_all(tiny_tokenizer, synthetic_examples(name, 8, i), name)
    return ex


@pytest.mark.parametrize("seed", range(5))
def test_pack_rows_places_every_example_once_within_capacity(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 50) for _ in range(rng.randint(1, 40))]
    rows = pack_rows(lengths, 64)
    flat = sorted(i for row in rows for i in row)
    assert flat == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    # first-fit decreasing: no two rows could be merged into one
    loads = sorted(sum(lengths[i] for i in row) for row in rows)
    assert len(loads) < 2 or loads[0] + loads[1] > 64


def test_pack_rows_refuses_an_example_longer_than_a_row():
    with pytest.raises(ValueError, match=r"example 1 has 70 tokens.*train.pack_tokens"):
        pack_rows([10, 70], 64)


def test_packed_examples_attend_only_to_themselves(tiny_tokenizer, examples):
    model = build_tiny_llama(len(tiny_tokenizer), hidden=64)
    model.config.use_cache = False
    batch_ex = examples[:7]
    collator = PackedCollator(tiny_tokenizer.pad_token_id, pack_tokens=10_000)
    batch = collator(_features(batch_ex))
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        off = 0
        # the collator packs longest first; recover each example's span by its tokens
        order = pack_rows([len(e.input_ids) for e in batch_ex], 10_000)[0]
        for i in order:
            ids = torch.tensor(batch_ex[i].input_ids)
            span = batch["input_ids"][0, off:off + len(ids)]
            assert torch.equal(span, ids)
            solo = model(input_ids=ids[None]).logits[0]
            # a second example that could see the first would differ by O(0.1-1) here
            assert (packed[off:off + len(ids)] - solo).abs().max() < 1e-5
            off += len(ids)
    assert collator.real_token_fraction == 1.0


def test_packed_loss_and_gradients_equal_padded(tiny_tokenizer, examples):
    """Same 12 examples, one step: padded batch (attention mask) vs two packed rows."""
    model = build_tiny_llama(len(tiny_tokenizer), hidden=64)
    model.config.use_cache = False
    feats = _features(examples[:12])
    padded = DataCollatorForSeq2Seq(tiny_tokenizer, padding=True, label_pad_token_id=-100)(feats)
    cap = max(len(f["input_ids"]) for f in feats) * 3
    collator = PackedCollator(tiny_tokenizer.pad_token_id, pack_tokens=cap)
    packed = collator(feats)
    assert packed["input_ids"].shape[0] >= 2, "the test should exercise several rows with row padding"

    def loss_and_grads(batch):
        model.zero_grad()
        out = model(**{k: v for k, v in batch.items()})
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    # Independent reference: the mean next-token CE over all response tokens, computed
    # example by example on the unpadded sequences.
    with torch.no_grad():
        total, count = 0.0, 0
        for f in feats:
            ids = torch.tensor(f["input_ids"])[None]
            labels = torch.tensor(f["labels"])
            logits = model(input_ids=ids).logits[0, :-1]
            tgt = labels[1:]
            keep = tgt != -100
            total += torch.nn.functional.cross_entropy(logits[keep], tgt[keep], reduction="sum").item()
            count += int(keep.sum())
    l_pad, g_pad = loss_and_grads(padded)
    l_pack, g_pack = loss_and_grads(packed)
    assert abs(l_pad.item() - total / count) < 1e-5
    assert abs(l_pack.item() - total / count) < 1e-5
    for n in g_pad:
        torch.testing.assert_close(g_pack[n], g_pad[n], rtol=1e-4, atol=1e-6, msg=f"gradient of {n}")
    real = sum(len(f["input_ids"]) for f in feats)
    assert collator.real_token_fraction == real / packed["input_ids"].numel()
    assert padded_real_token_fraction([[len(f["input_ids"]) for f in feats]]) == real / padded["input_ids"].numel()


class _AlwaysMasked(torch.nn.Module):
    """A causal LM that always attends over the whole row (ignores packing)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, input_ids, position_ids=None, use_cache=False, **kw):
        return self.inner(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False)


def test_packing_supported_detects_models_that_mix_examples(tiny_tokenizer):
    model = build_tiny_llama(len(tiny_tokenizer), hidden=64)
    assert packing_supported(model) is True
    assert packing_supported(_AlwaysMasked(model)) is False
    model.train()
    packing_supported(model)
    assert model.training, "the probe must restore the training mode"


def _weights(d):
    return load_file(str(d / "model.safetensors"))


def test_branch_trained_packed_equals_padded(tiny_model_dir, examples, tmp_path):
    """Through the Trainer: same steps, N_k and (to float rounding) weights, less padding."""
    cfg = TrainConfig(learning_rate=1e-3, batch_size=6, epochs=1, save_steps=100, logging_steps=1)
    packed = train_branch(tiny_model_dir, examples, tmp_path / "packed", cfg, checkpoint_dir=tmp_path / "c1")
    padded = train_branch(tiny_model_dir, examples, tmp_path / "padded", cfg.model_copy(update={"packing": False}),
                          checkpoint_dir=tmp_path / "c2")
    assert packed.packed and not padded.packed
    assert (packed.steps, packed.trained_tokens, packed.examples) == (padded.steps, padded.trained_tokens,
                                                                      padded.examples)
    assert packed.real_token_fraction == 1.0  # 6 short examples fit one row of 4096
    assert padded.real_token_fraction < 0.95
    assert abs(packed.train_loss - padded.train_loss) < 1e-4
    a, b = _weights(tmp_path / "packed"), _weights(tmp_path / "padded")
    base = _weights(tiny_model_dir)
    for k in a:
        moved = (b[k] - base[k]).abs().max()
        assert (a[k] - b[k]).abs().max() <= 1e-3 * max(float(moved), 1e-6) + 1e-6, k
    # the saved model keeps its KV cache setting for generation
    import json

    assert json.loads((tmp_path / "packed" / "config.json").read_text()).get("use_cache", True) is True


def test_pack_tokens_below_max_length_refused(tmp_path):
    with pytest.raises(ConfigError, match="train.pack_tokens=100 is smaller than data.max_length=512"):
        load_config(None, ["data.max_length=512", "train.pack_tokens=100"])
    load_config(None, ["data.max_length=512", "train.pack_tokens=100", "train.packing=false"])
