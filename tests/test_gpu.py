"""GPU-only paths (marker ``gpu``): CUDA bf16 branch training, DeepSpeed ZeRO-2/3 on one
GPU through torchrun with the saved 16-bit weights checked against DeepSpeed's own fp32
reconstruction of the ZeRO checkpoint, a merge of ZeRO-trained branches, and CUDA
evaluation against CPU evaluation.

On a machine without CUDA (or without DeepSpeed) these tests skip with the reason. They
run on a lent GPU through bench/gpu/run.sh (bench/gpu/README.md).
"""

from __future__ import annotations

import importlib.util
import json

import numpy
import pytest
import torch
from safetensors.torch import load_file

from merit_core.config import MeritConfig, TrainConfig
from merit_core.evaluate import evaluate_model
from merit_core.refs import write_examples
from merit_core.train import train_branch
from tests.conftest import build_tiny_llama
from tests.helpers import synthetic_examples, tokenize_all

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA GPU: these run on a lent GPU machine (bench/gpu/README.md)"),
]
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="needs DeepSpeed (pip install deepspeed; bench/gpu carries a wheel)")


@pytest.fixture()
def examples(tiny_tokenizer):
    ex = []
    for i, name in enumerate(["a", "b"]):
        ex += tokenize_all(tiny_tokenizer, synthetic_examples(name, 12, i), name)
    return ex


def _weights(d):
    return load_file(str(d / "model.safetensors"))


def _update_cosine(base, a, b) -> float:
    da = torch.cat([(a[k].float() - base[k].float()).flatten() for k in base])
    db = torch.cat([(b[k].float() - base[k].float()).flatten() for k in base])
    return float(da @ db / (da.norm() * db.norm()))


def test_bf16_branch_training_on_cuda(tiny_model_dir, examples, tmp_path):
    cfg = TrainConfig(learning_rate=1e-3, batch_size=4, epochs=1, save_steps=100, logging_steps=1, bf16=True)
    torch.cuda.reset_peak_memory_stats()
    gpu = train_branch(tiny_model_dir, examples, tmp_path / "gpu", cfg, checkpoint_dir=tmp_path / "c1")
    assert torch.cuda.max_memory_allocated() > 0, "training did not run on the GPU"
    # the same branch in float32 on the same GPU: the reference for the bf16 update
    fp32 = train_branch(tiny_model_dir, examples, tmp_path / "fp32", cfg.model_copy(update={"bf16": False}),
                        checkpoint_dir=tmp_path / "c2")
    assert gpu.packed and gpu.real_token_fraction == 1.0
    assert (gpu.steps, gpu.trained_tokens) == (fp32.steps, fp32.trained_tokens) and gpu.steps == 6
    base, wg, wf = _weights(tiny_model_dir), _weights(tmp_path / "gpu"), _weights(tmp_path / "fp32")
    assert all(t.dtype == torch.float32 for t in wg.values()), "bf16 autocast keeps float32 master weights"
    assert any(not torch.equal(wg[k], wf[k]) for k in wg), "bf16 autocast changed nothing: was it on?"
    assert _update_cosine(base, wg, wf) > 0.9
    assert abs(gpu.train_loss - fp32.train_loss) < 0.05 * abs(fp32.train_loss)


def _zero_branch(stage: int, tiny_model_dir, examples, tmp_path, name: str):
    """Train one branch with DeepSpeed ZeRO-<stage> on 1 GPU through torch's elastic
    launcher (the product's launcher); return (stats, output dir, last checkpoint dir)."""
    from merit_core.train import run_distributed_branch

    cfg = MeritConfig.model_validate({"train": {
        "learning_rate": 1e-3, "batch_size": 4, "epochs": 1, "save_steps": 3, "logging_steps": 1, "bf16": True,
        "deepspeed": f"deployments/ds_zero{stage}.json"}})
    work = tmp_path / name
    work.mkdir(parents=True)
    write_examples(work / "examples.jsonl", examples)
    out, ck = work / "out", work / "ck"
    res = run_distributed_branch(tiny_model_dir, work / "examples.jsonl", out, cfg.train, nproc=1,
                                 checkpoint_dir=ck, dtype="float32")
    return res, out, ck / f"checkpoint-{res.steps}"


def _check_against_zero_checkpoint(out, ckpt, base):
    """Saved 16-bit weights: full shapes (not ZeRO-3's empty placeholders), equal to the
    bf16 rounding of DeepSpeed's fp32 reconstruction of the ZeRO checkpoint."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    saved = _weights(out)
    ref = get_fp32_state_dict_from_zero_checkpoint(str(ckpt))
    assert set(saved) <= set(base) and saved
    for k, t in saved.items():
        assert t.shape == base[k].shape and t.numel() > 0, f"{k}: saved {tuple(t.shape)}, base {tuple(base[k].shape)}"
        r = ref[k].to(t.dtype)
        # the 16-bit weights are the rounding of the fp32 master weights (≤ 1 step of the 16-bit type)
        torch.testing.assert_close(t.float(), r.float(), rtol=2 ** -7, atol=1e-6,
                                   msg=f"{k} differs from the gathered ZeRO weights")
    assert any(not torch.equal(saved[k].float(), base[k].float().to(saved[k].dtype).float()) for k in saved)
    return saved


@needs_deepspeed
def test_deepspeed_zero2_and_zero3_save_gathered_weights_and_merge(tiny_model_dir, tiny_tokenizer, tmp_path):
    from merit_core.merge import merge_checkpoints

    ex_a = tokenize_all(tiny_tokenizer, synthetic_examples("a", 24, 0), "a")
    ex_b = tokenize_all(tiny_tokenizer, synthetic_examples("b", 24, 1), "b")
    base = _weights(tiny_model_dir)
    res2, out2, ck2 = _zero_branch(2, tiny_model_dir, ex_a, tmp_path, "zero2")
    res3, out3, ck3 = _zero_branch(3, tiny_model_dir, ex_b, tmp_path, "zero3")
    assert (res2.steps, res3.steps) == (6, 6) and res2.packed and res3.packed
    w2 = _check_against_zero_checkpoint(out2, ck2, base)
    w3 = _check_against_zero_checkpoint(out3, ck3, base)

    # Merge of the two ZeRO-trained branches = Σ w_k θ_k / Σ w_k (float64 reference).
    n = [float(res2.trained_tokens), float(res3.trained_tokens)]
    merged = merge_checkpoints([out2, out3], n, tmp_path / "merged")
    got = load_file(str(merged / "model.safetensors"))
    for k in w2:
        want = (n[0] * w2[k].double() + n[1] * w3[k].double()) / sum(n)
        assert got[k].dtype == w2[k].dtype
        assert (got[k].double() - want).abs().max() <= 2 ** -7 * want.abs().max() + 1e-12, k
    assert json.loads((merged / "manifest.json").read_text())


def test_countsketch_on_cuda_matches_cpu():
    from merit_core.conflict import CountSketch

    torch.manual_seed(0)
    grads = [("a", torch.randn(3_000_017)), ("b", torch.randn(17, 1000))]
    s = CountSketch(dim=16384, seed=7)
    cpu = s.sketch(grads)
    gpu = s.sketch([(n, g.cuda()) for n, g in grads])
    assert numpy.allclose(gpu, cpu, rtol=1e-6, atol=1e-9)


def test_cuda_evaluation_matches_cpu(tiny_tokenizer, examples):
    model = build_tiny_llama(len(tiny_tokenizer), hidden=64)
    heldout = {"a": examples[:12], "b": examples[12:]}
    kw = dict(batch_size=5, max_new_tokens=4, generate=True, multiple_choice=True)
    cpu = evaluate_model(model, tiny_tokenizer, heldout, **kw)
    gpu = evaluate_model(model.cuda(), tiny_tokenizer, heldout, **kw)
    gpu_bf16 = evaluate_model(model, tiny_tokenizer, heldout, bf16=True, **kw)
    for rc, rg, rb in zip(cpu.rows, gpu.rows, gpu_bf16.rows):
        assert rg.loss == pytest.approx(rc.loss, rel=1e-4)
        assert abs(rg.exact_match - rc.exact_match) <= 1 / rc.n  # a near-tie may flip one greedy answer
        assert rb.loss == pytest.approx(rc.loss, rel=2e-2)
