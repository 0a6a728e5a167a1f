"""merit_core.diagnostics against direct float64 computations on full state dicts."""

from __future__ import annotations

import json
import math

import pytest
import torch

from merit_core.batching import mean_response_loss
from merit_core.data.format import prompt_ids, response_ids
from merit_core.data.types import IGNORE_INDEX, Example, TokenizedExample
from merit_core.diagnostics import (
    contraction,
    displacement_norms,
    lmc_barrier,
    merge_gain,
    noise_flatness,
)
from merit_core.merge.io import Checkpoint
from tests.conftest import build_tiny_llama

PAD = 2


def perturbed(vocab: int, seed: int, scale: float, tie: bool = True):
    """The base tiny Llama (seed 0) plus Gaussian noise of std `scale` on every parameter."""
    model = build_tiny_llama(vocab, seed=0)
    if not tie:
        model = _untied(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model


def _untied(model):
    from transformers import LlamaForCausalLM

    cfg = model.config
    cfg.tie_word_embeddings = False
    untied = LlamaForCausalLM(cfg)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    untied.load_state_dict(sd)
    return untied.eval()


def flat_params(model, skip_tied: bool = True) -> torch.Tensor:
    """All stored tensors of the state dict as one float64 vector (tied lm_head once)."""
    sd = model.state_dict()
    tied = model.config.tie_word_embeddings
    keep = [k for k in sd if not (skip_tied and tied and k == "lm_head.weight")]
    return torch.cat([sd[k].double().flatten() for k in keep])


@pytest.fixture()
def vocab(tiny_tokenizer):
    return len(tiny_tokenizer)


@pytest.fixture()
def examples(tiny_tokenizer):
    pairs = [("What is the capital of France?", "Paris"), ("Add 2 and 3.", "The answer is 5."), ("Say yes", "yes no")]
    out = []
    for p, r in pairs:
        e = Example(p, r)
        pi, ri = prompt_ids(tiny_tokenizer, e), response_ids(tiny_tokenizer, r)
        out.append(TokenizedExample(pi + ri, [IGNORE_INDEX] * len(pi) + ri, len(pi), "s", e))
    return out


@pytest.fixture()
def checkpoints(tmp_path, vocab):
    """base, 3 branches (one of them sharded), their models."""
    base = build_tiny_llama(vocab, seed=0)
    branches = [perturbed(vocab, seed=s, scale=0.01 * s) for s in (1, 2, 3)]
    dirs = {"base": tmp_path / "base"}
    base.save_pretrained(dirs["base"])
    for i, m in enumerate(branches):
        d = tmp_path / f"b{i}"
        m.save_pretrained(d, max_shard_size="40KB" if i == 1 else "5GB")
        dirs[f"b{i}"] = d
    assert (dirs["b1"] / "model.safetensors.index.json").is_file()
    assert "lm_head.weight" not in Checkpoint(dirs["base"]).names  # tied: not stored
    return base, branches, dirs


def test_displacement_norms_match_state_dicts(checkpoints):
    base, branches, dirs = checkpoints
    norms = displacement_norms(dirs["base"], {f"b{i}": dirs[f"b{i}"] for i in range(3)})
    theta0 = flat_params(base)
    for i, m in enumerate(branches):
        expected = float(torch.linalg.vector_norm(flat_params(m) - theta0))
        assert norms[f"b{i}"] == pytest.approx(expected, rel=1e-12)
    assert displacement_norms(dirs["base"], {"self": dirs["base"]}) == {"self": 0.0}


def test_block_streaming_equals_whole_tensors(checkpoints, monkeypatch):
    base, branches, dirs = checkpoints
    whole = displacement_norms(dirs["base"], {"b": dirs["b0"]})
    import merit_core.merge.io as io

    monkeypatch.setattr(io, "BLOCK_ELEMENTS", 7)  # many row blocks per tensor
    reader = Checkpoint(dirs["b1"])  # sharded
    for name in reader.names:
        parts = list(reader.blocks(name))
        assert all(p.dtype == torch.float64 for p in parts)
        assert torch.equal(torch.cat(parts), reader.read(name).to(torch.float64))
    assert len(list(reader.blocks("model.embed_tokens.weight"))) == reader.shape("model.embed_tokens.weight")[0]
    blocks = displacement_norms(dirs["base"], {"b": dirs["b0"]})
    assert blocks["b"] == pytest.approx(whole["b"], rel=1e-12)


@pytest.mark.parametrize("weights", [[1, 1, 1], [10, 30, 60]])
def test_contraction_identity_and_terms(checkpoints, tmp_path, weights):
    base, branches, dirs = checkpoints
    w = torch.tensor(weights, dtype=torch.float64)
    w = w / w.sum()
    theta0 = flat_params(base)
    deltas = [flat_params(m) - theta0 for m in branches]
    mean = sum(wi * d for wi, d in zip(w, deltas))
    # the merged checkpoint written in float32, as the merge would
    merged = build_tiny_llama(base.config.vocab_size, seed=0)
    with torch.no_grad():
        sds = [m.state_dict() for m in branches]
        for k, p in merged.state_dict().items():
            p.copy_(sum(float(wi) * sd[k].double() for wi, sd in zip(w, sds)).float())
    merged.save_pretrained(tmp_path / "merged")
    joint = perturbed(base.config.vocab_size, seed=9, scale=0.05)
    joint.save_pretrained(tmp_path / "joint")

    out = contraction(
        dirs["base"],
        [dirs[f"b{i}"] for i in range(3)],
        weights,
        merged_dir=tmp_path / "merged",
        joint_dir=tmp_path / "joint",
    )
    branch_sq = [float(d @ d) for d in deltas]
    weighted = sum(float(wi) * s for wi, s in zip(w, branch_sq))
    var = sum(float(wi) * float((d - mean) @ (d - mean)) for wi, d in zip(w, deltas))
    assert out["weights"] == pytest.approx(w.tolist(), rel=1e-15)
    assert out["branch_sq_norms"] == pytest.approx(branch_sq, rel=1e-12)
    assert out["weighted_sq_norm"] == pytest.approx(weighted, rel=1e-12)
    assert out["mean_sq_norm"] == pytest.approx(float(mean @ mean), rel=1e-12)
    assert out["variance"] == pytest.approx(var, rel=1e-12)
    assert out["identity_rel_error"] < 1e-9
    assert out["mean_sq_norm"] + out["variance"] == pytest.approx(out["weighted_sq_norm"], rel=1e-9)
    assert out["contraction_ratio"] <= 1.0
    assert out["skipped"] == []  # lm_head not stored at all in the tied checkpoints
    # merged checkpoint: equal to δ̄ up to float32 rounding of the written weights
    assert out["merged_sq_norm"] == pytest.approx(float(mean @ mean), rel=1e-5)
    assert out["merged_residual_sq"] < 1e-10 * out["mean_sq_norm"] + 1e-12
    joint_norm = float(torch.linalg.vector_norm(flat_params(joint) - theta0))
    assert out["joint_norm"] == pytest.approx(joint_norm, rel=1e-12)
    assert out["joint_over_merged"] == pytest.approx(joint_norm / math.sqrt(out["merged_sq_norm"]), rel=1e-12)


def test_contraction_mapping_inputs_and_errors(checkpoints, tmp_path):
    base, branches, dirs = checkpoints
    by_name = {f"b{i}": dirs[f"b{i}"] for i in range(3)}
    a = contraction(dirs["base"], by_name, {"b0": 2, "b1": 1, "b2": 1})
    b = contraction(dirs["base"], list(by_name.values()), [0.5, 0.25, 0.25])
    assert a["branches"] == ["b0", "b1", "b2"]
    assert a["variance"] == pytest.approx(b["variance"], rel=1e-12)
    with pytest.raises(ValueError, match="expected 3"):
        contraction(dirs["base"], list(by_name.values()), [1, 1])
    with pytest.raises(ValueError, match="≥ 0"):
        contraction(dirs["base"], list(by_name.values()), [1, -1, 1])
    with pytest.raises(ValueError, match="no weight"):
        contraction(dirs["base"], by_name, {"b0": 1})
    with pytest.raises(ValueError, match="no branch"):
        contraction(dirs["base"], [], [])
    # a different architecture: shape mismatch names the tensor
    other = build_tiny_llama(base.config.vocab_size, seed=0, hidden=64)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="different shapes"):
        displacement_norms(dirs["base"], {"other": tmp_path / "other"})
    with pytest.raises(FileNotFoundError):
        displacement_norms(dirs["base"], {"x": tmp_path})


def test_untied_lm_head_is_counted(tmp_path, vocab):
    base = _untied(build_tiny_llama(vocab, seed=0))
    branch = perturbed(vocab, seed=4, scale=0.02, tie=False)
    base.save_pretrained(tmp_path / "base")
    branch.save_pretrained(tmp_path / "branch")
    assert "lm_head.weight" in Checkpoint(tmp_path / "base").names
    expected = float(torch.linalg.vector_norm(flat_params(branch) - flat_params(base)))
    assert displacement_norms(tmp_path / "base", {"b": tmp_path / "branch"})["b"] == pytest.approx(expected, rel=1e-12)
    assert json.loads((tmp_path / "branch" / "config.json").read_text())["tie_word_embeddings"] is False
    out = contraction(tmp_path / "base", [tmp_path / "branch"], [1])
    assert out["skipped"] == [] and out["mean_sq_norm"] == pytest.approx(expected**2, rel=1e-12)


def test_lm_head_stored_in_only_one_dir_is_skipped(tmp_path, vocab):
    """A tied base (no lm_head stored) against a checkpoint that stores lm_head: the output
    embedding is left out (it would count the embedding twice) and reported."""
    base = build_tiny_llama(vocab, seed=0)
    base.save_pretrained(tmp_path / "base")
    branch = perturbed(vocab, seed=4, scale=0.02, tie=False)
    branch.save_pretrained(tmp_path / "branch")
    out = contraction(tmp_path / "base", [tmp_path / "branch"], [1])
    assert out["skipped"] == ["lm_head.weight"]
    sd0, sd1 = base.state_dict(), branch.state_dict()
    expected = sum(float(((sd1[k].double() - sd0[k].double()) ** 2).sum()) for k in sd0 if k != "lm_head.weight")
    assert out["mean_sq_norm"] == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------- loss landscape


def test_lmc_barrier_endpoints_midpoint_and_restore(vocab, examples, tmp_path):
    model = build_tiny_llama(vocab, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    a = perturbed(vocab, seed=5, scale=0.05)
    b = perturbed(vocab, seed=6, scale=0.05)
    out = lmc_barrier(model, a.state_dict(), b.state_dict(), examples, PAD, points=5, batch_size=2)
    assert out["alphas"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert out["losses"][0] == pytest.approx(mean_response_loss(a, examples, PAD), rel=1e-6)
    assert out["losses"][-1] == pytest.approx(mean_response_loss(b, examples, PAD), rel=1e-6)
    assert out["excess"][0] == 0.0 and out["excess"][-1] == 0.0
    assert out["barrier"] == max(out["excess"]) >= 0.0
    # the midpoint equals a fresh model loaded with (θ_a + θ_b) / 2
    mid = build_tiny_llama(vocab, seed=0)
    with torch.no_grad():
        for k, p in mid.state_dict().items():
            p.copy_((a.state_dict()[k] + b.state_dict()[k]) / 2)
    assert out["losses"][2] == pytest.approx(mean_response_loss(mid, examples, PAD), rel=1e-6)
    mid_excess = out["losses"][2] - (out["loss_a"] + out["loss_b"]) / 2
    assert out["excess"][2] == pytest.approx(mid_excess, abs=1e-12)
    # the caller's model is unchanged
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # a known L(θ_b) skips that pass and gives the same path (the end point is used as given)
    known = lmc_barrier(model, a.state_dict(), b.state_dict(), examples, PAD, points=5, batch_size=2,
                        loss_b=out["loss_b"])
    assert known == out
    shifted = lmc_barrier(model, a.state_dict(), b.state_dict(), examples, PAD, points=5, batch_size=2,
                          loss_b=out["loss_b"] + 1.0)
    assert shifted["losses"][:-1] == out["losses"][:-1] and shifted["loss_b"] == out["loss_b"] + 1.0


def test_lmc_barrier_identical_endpoints_and_dirs(vocab, examples, tmp_path):
    a = perturbed(vocab, seed=7, scale=0.05)
    a.save_pretrained(tmp_path / "a")  # tied lm_head not stored: matched through its alias
    model = build_tiny_llama(vocab, seed=0)
    out = lmc_barrier(model, tmp_path / "a", a.state_dict(), examples, PAD)
    assert len(out["alphas"]) == 21 and len(out["losses"]) == 21
    assert out["barrier"] == pytest.approx(0.0, abs=1e-6)
    assert max(out["losses"]) - min(out["losses"]) < 1e-6
    with pytest.raises(ValueError, match="points"):
        lmc_barrier(model, a.state_dict(), a.state_dict(), examples, PAD, points=1)
    partial = {k: v for k, v in a.state_dict().items() if "layers.0.mlp" not in k}
    with pytest.raises(ValueError, match="missing from state_b"):
        lmc_barrier(model, a.state_dict(), partial, examples, PAD)


def test_noise_flatness_zero_sigma_seeded_and_restored(vocab, examples):
    model = build_tiny_llama(vocab, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = noise_flatness(model, examples, PAD, sigmas=(0.0, 0.05, 0.5), seed=3, batch_size=2)
    assert out["base_loss"] == pytest.approx(mean_response_loss(model, examples, PAD), rel=1e-7)
    assert out["increase"][0] == 0.0 and out["losses"][0] == out["base_loss"]
    assert out["sigmas"] == [0.0, 0.05, 0.5] and out["relative"] is True
    again = noise_flatness(model, examples, PAD, sigmas=(0.0, 0.05, 0.5), seed=3, batch_size=2)
    assert again == out
    given = noise_flatness(model, examples, PAD, sigmas=(0.0, 0.05, 0.5), seed=3, batch_size=2,
                           base_loss=out["base_loss"])
    assert given == out  # a known base loss skips that pass only
    other = noise_flatness(model, examples, PAD, sigmas=(0.5,), seed=4)
    assert other["losses"][0] != out["losses"][2]
    absolute = noise_flatness(model, examples, PAD, sigmas=(0.5,), seed=3, relative=False)
    assert absolute["losses"][0] != out["losses"][2]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    two = noise_flatness(model, examples, PAD, sigmas=(0.5,), seed=3, draws=2)
    seed4 = noise_flatness(model, examples, PAD, sigmas=(0.5,), seed=4)
    # draw d uses seed + d; rel 1e-6 because the batch sizes differ
    assert two["losses"][0] == pytest.approx((out["losses"][2] + seed4["losses"][0]) / 2, rel=1e-6)
    with pytest.raises(ValueError):
        noise_flatness(model, examples, PAD, sigmas=(-0.1,))


def test_noise_flatness_relative_scale(vocab, examples):
    """Relative σ uses each tensor's RMS: scaling a tensor by c and σ_abs by c agree."""
    model = build_tiny_llama(vocab, seed=0)
    rel = noise_flatness(model, examples, PAD, sigmas=(0.2,), seed=1)
    # rebuild the same perturbation by hand in absolute units
    gen = torch.Generator().manual_seed(1)
    noisy = build_tiny_llama(vocab, seed=0)
    with torch.no_grad():
        for p in noisy.parameters():
            rms = float(p.pow(2).mean().sqrt())
            p.add_(0.2 * rms * torch.randn(p.shape, generator=gen))
    assert rel["losses"][0] == pytest.approx(mean_response_loss(noisy, examples, PAD), rel=1e-6)


def test_merge_gain():
    assert merge_gain([1.0, 2.0], [1, 1], 1.25) == pytest.approx(0.25)
    assert merge_gain([1.0, 2.0, 4.0], [10, 30, 60], 3.0) == pytest.approx(0.1 * 1 + 0.3 * 2 + 0.6 * 4 - 3.0)
    assert merge_gain([1.5], [7], 1.5) == 0.0
    with pytest.raises(ValueError):
        merge_gain([1.0, 2.0], [1], 1.0)
    with pytest.raises(ValueError):
        merge_gain([1.0], [0], 1.0)
    with pytest.raises(ValueError):
        merge_gain([], [], 1.0)
