"""Calibration gradients, sketches and the conflict matrix (merit_core.conflict).

The reference ("exact") gradients are computed here with plain autograd on the mean
response-token loss of HF's own ``labels=`` loss, independently of source_gradient.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from merit_core.batching import batches, collate
from merit_core.config import ConflictConfig
from merit_core.conflict import (
    CountSketch,
    FullSketch,
    StrideSketch,
    conflict_matrix,
    make_sketcher,
    source_gradient,
    trainable_parameters,
)
from merit_core.data.types import IGNORE_INDEX, TokenizedExample

try:  # tests/ as a package (tests/__init__.py) or as a rootdir of plain modules
    from tests.conftest import build_tiny_llama
except ImportError:  # pragma: no cover
    from conftest import build_tiny_llama

VOCAB = 400
PAD = 2  # build_tiny_llama: pad = eos = 2
SHARED = [5, 6, 7]  # a response prefix every source shares ("The answer is")

# (cluster, noise): sources of one cluster reuse its prototype sequences with a fraction
# `noise` of tokens replaced at random -> cosines spread from ~0 to ~0.75.
SOURCE_SPEC = [(0, 0.1), (0, 0.3), (0, 0.5), (1, 0.1), (1, 0.3), (2, 0.2), (3, 1.0)]


def _prototypes(cluster: int, n: int = 6) -> list[tuple[list[int], list[int]]]:
    g = np.random.default_rng(1000 + cluster)
    return [
        (g.integers(3, VOCAB, size=int(g.integers(6, 12))).tolist(), g.integers(3, VOCAB, size=int(g.integers(4, 9))).tolist())
        for _ in range(n)
    ]


def make_source(cluster: int, seed: int, noise: float, n: int = 12) -> list[TokenizedExample]:
    """n synthetic examples: prompt ids (masked) then shared prefix + response + eos."""
    protos = _prototypes(cluster)
    g = np.random.default_rng(seed)
    out = []
    for k in range(n):
        prompt, response = protos[k % len(protos)]
        ids = prompt + SHARED + response + [PAD]
        ids = [int(g.integers(3, VOCAB)) if (j < len(ids) - 1 and g.random() < noise) else t for j, t in enumerate(ids)]
        pl = len(prompt)
        out.append(TokenizedExample(ids, [IGNORE_INDEX] * pl + ids[pl:], pl, source=f"s{seed}"))
    return out


def exact_gradient(model, examples, params=None) -> list[torch.Tensor]:
    """Mean response-token CE gradient in one padded batch, via HF's labels= loss."""
    params = params if params is not None else [p for _, p in model.named_parameters()]
    loss = model(**collate(examples, PAD)).loss  # mean over labels != -100 after the shift
    return list(torch.autograd.grad(loss, params, allow_unused=True))


def flat(grads) -> np.ndarray:
    return np.concatenate([g.detach().reshape(-1).double().numpy() for g in grads])


@pytest.fixture(scope="module")
def setup():
    model = build_tiny_llama(VOCAB, hidden=64)
    names = [n for n, _ in model.named_parameters()]
    sources = [make_source(c, i, noise) for i, (c, noise) in enumerate(SOURCE_SPEC)]
    grads = [exact_gradient(model, s) for s in sources]
    full = np.stack([flat(g) for g in grads])
    return {"model": model, "names": names, "sources": sources, "grads": grads, "full": full}


def offdiag(c: np.ndarray) -> np.ndarray:
    return c[np.triu_indices(c.shape[0], 1)]


# --------------------------------------------------------------------------- gradients


def test_full_sketch_equals_autograd_gradient(setup):
    model = setup["model"]
    for i, src in enumerate(setup["sources"]):
        # batch size 5 over 12 examples: 3 uneven batches -> token-weighted mean across batches
        g = source_gradient(model, batches(src, 5, PAD), trainable="all", sketcher=FullSketch())
        assert g.dtype == np.float32 and g.shape == setup["full"][i].shape
        ref = setup["full"][i]
        np.testing.assert_allclose(g, ref, rtol=1e-3, atol=1e-5 * np.abs(ref).max())
    g_default = source_gradient(model, batches(setup["sources"][0], 4, PAD))  # sketcher None = full
    np.testing.assert_allclose(g_default, setup["full"][0], rtol=1e-3, atol=1e-5 * np.abs(setup["full"][0]).max())


def test_countsketch_8192_reproduces_full_cosines(setup):
    c_full = conflict_matrix(setup["full"])
    spread = offdiag(c_full)
    assert spread.max() - spread.min() > 0.5 and spread.std() > 0.1  # a meaningful test
    sk = CountSketch(dim=8192, seed=0)
    sketches = np.stack([sk.sketch(zip(setup["names"], g)) for g in setup["grads"]])
    err = np.abs(conflict_matrix(sketches) - c_full).max()
    print(f"\ncountsketch dim 8192: max abs cosine error {err:.4f} over {len(spread)} pairs")
    assert err <= 0.03
    # the pipeline path gives the same sketch as sketching the exact gradient
    via_model = source_gradient(setup["model"], batches(setup["sources"][3], 5, PAD), sketcher=sk)
    np.testing.assert_allclose(via_model, sketches[3], rtol=1e-3, atol=1e-4 * np.abs(sketches[3]).max())


def test_stride5_pearson_against_full(setup):
    c_full = conflict_matrix(setup["full"])
    sk = StrideSketch(5)
    sketches = np.stack([sk.sketch(zip(setup["names"], g)) for g in setup["grads"]])
    assert sketches.shape[1] == -(-setup["full"].shape[1] // 5)
    pearson = np.corrcoef(offdiag(conflict_matrix(sketches)), offdiag(c_full))[0, 1]
    print(f"\nstride 5: Pearson {pearson:.4f} on off-diagonal cosines")
    assert pearson >= 0.98
    via_model = source_gradient(setup["model"], batches(setup["sources"][1], 5, PAD), sketcher=sk)
    np.testing.assert_allclose(via_model, sketches[1], rtol=1e-3, atol=1e-5 * np.abs(sketches[1]).max())


def test_countsketch_error_shrinks_with_dim(setup):
    c_full = conflict_matrix(setup["full"])

    def rms(dim):
        errs = []
        for seed in range(4):
            sk = CountSketch(dim=dim, seed=seed)
            s = np.stack([sk.sketch(zip(setup["names"], g)) for g in setup["grads"]])
            errs.append(offdiag(conflict_matrix(s) - c_full))
        return float(np.sqrt(np.mean(np.square(errs))))

    small, large = rms(256), rms(8192)
    print(f"\nrms cosine error: dim 256 {small:.4f}, dim 8192 {large:.4f}")
    assert large < small / 2.5  # ~1/sqrt(dim): expected ratio ≈ 5.7


def test_source_gradient_leaves_model_unchanged(setup):
    model = copy.deepcopy(setup["model"])
    model.train()
    model.model.layers[0].mlp.eval()  # mixed modes must come back as they were
    frozen = model.model.layers[1].self_attn.q_proj.weight
    frozen.requires_grad_(False)
    model.model.norm.weight.grad = torch.ones_like(model.model.norm.weight)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}

    g = source_gradient(model, batches(setup["sources"][0], 6, PAD), trainable="all")

    # "all" = requires_grad parameters only: the frozen one is not in the vector
    n_all = sum(p.numel() for p in model.parameters())
    assert g.shape == (n_all - frozen.numel(),)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert all(p.grad is None for p in model.parameters())


def test_source_gradient_trainable_subset(setup):
    model = setup["model"]
    src = setup["sources"][2]
    for pattern in (["model.layers.1.*"], ["re:layers\\.1\\."]):
        chosen = trainable_parameters(model, pattern)
        assert chosen and all(".layers.1." in n for n, _ in chosen)
        g = source_gradient(model, batches(src, 5, PAD), trainable=pattern)
        ref = flat(exact_gradient(model, src, [p for _, p in chosen]))
        assert g.shape == ref.shape == (sum(p.numel() for _, p in chosen),)
        np.testing.assert_allclose(g, ref, rtol=1e-3, atol=1e-5 * np.abs(ref).max())
    assert all(p.requires_grad for p in model.parameters())


def test_source_gradient_bf16_accumulates_in_float32(setup):
    model = copy.deepcopy(setup["model"]).to(torch.bfloat16)
    src = setup["sources"][0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = source_gradient(model, batches(src, 5, PAD))
    assert g.dtype == np.float32
    # independent: float64 sum over batches of (bf16 mean-loss gradient × tokens) / tokens
    params = [p for _, p in model.named_parameters()]
    total, count = None, 0
    for b in batches(src, 5, PAD):
        out = model(**b)
        n = int((b["labels"][:, 1:] != IGNORE_INDEX).sum())
        part = flat(torch.autograd.grad(out.loss, params)) * n  # HF loss = batch mean, float32 CE
        total = part if total is None else total + part
        count += n
    ref = total / count
    # same maths, different loss code path in bf16: agreement at bf16 resolution
    assert np.dot(g, ref) / (np.linalg.norm(g) * np.linalg.norm(ref)) > 0.999
    # and close to the float32 model's exact gradient
    f32 = setup["full"][0]
    assert np.dot(g, f32) / (np.linalg.norm(g) * np.linalg.norm(f32)) > 0.98
    # float32 accumulation: the result is not confined to bf16-representable values
    as_bf16 = torch.from_numpy(g).to(torch.bfloat16).float().numpy()
    assert np.mean(as_bf16 != g) > 0.5
    for k, v in model.state_dict().items():
        assert v.dtype == torch.bfloat16 and torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())


def test_source_gradient_without_response_tokens_raises(setup):
    ex = [TokenizedExample([4, 5, 6, 7], [IGNORE_INDEX] * 4, 4)]
    with pytest.raises(ValueError, match="no response token"):
        source_gradient(setup["model"], batches(ex, 1, PAD))


# --------------------------------------------------------------------------- trainable


class _ToyVLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.vision_tower = torch.nn.Linear(3, 3)
        self.multi_modal_projector = torch.nn.Linear(3, 3)
        self.visual = torch.nn.Linear(3, 3)
        self.language_model = torch.nn.Module()
        self.language_model.embed = torch.nn.Embedding(5, 3)
        self.language_model.layer = torch.nn.Linear(3, 3)
        self.lm_head = torch.nn.Linear(3, 5, bias=False)
        self.lm_head.weight = self.language_model.embed.weight  # tied


def test_trainable_parameters_modes():
    m = _ToyVLM()
    all_names = [n for n, _ in trainable_parameters(m, "all")]
    assert all_names == [n for n, _ in m.named_parameters()]
    assert "lm_head.weight" not in all_names  # tied: once, under its first name
    assert [n for n, _ in trainable_parameters(m, "lm")] == [
        "language_model.embed.weight",
        "language_model.layer.weight",
        "language_model.layer.bias",
    ]
    assert [n for n, _ in trainable_parameters(m, ["*.bias"])] == [
        "vision_tower.bias",
        "multi_modal_projector.bias",
        "visual.bias",
        "language_model.layer.bias",
    ]
    assert [n for n, _ in trainable_parameters(m, ["re:^visual"])] == ["visual.weight", "visual.bias"]
    m.language_model.layer.weight.requires_grad_(False)
    assert "language_model.layer.weight" not in [n for n, _ in trainable_parameters(m, "lm")]
    # explicit patterns select frozen parameters too
    assert [n for n, _ in trainable_parameters(m, ["language_model.layer.weight"])] == ["language_model.layer.weight"]


def test_trainable_parameters_errors():
    m = _ToyVLM()
    with pytest.raises(ValueError, match=r"\['decoder\.\*'\] selects no parameter"):
        trainable_parameters(m, ["decoder.*"])
    with pytest.raises(ValueError, match="'all', 'lm' or a list"):
        trainable_parameters(m, "everything")
    with pytest.raises(ValueError, match="empty list"):
        trainable_parameters(m, [])
    for p in m.vision_tower.parameters():
        p.requires_grad_(False)
    for p in m.language_model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="'lm' selects no parameter"):
        trainable_parameters(m, "lm")


# --------------------------------------------------------------------------- sketches


def _splitmix_reference(seed: int, i: int, dim: int) -> tuple[int, int]:
    """Pure-Python splitmix64 (the documented CountSketch hash): bucket, sign."""
    mask = (1 << 64) - 1

    def mix(z):
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    z = mix((mix(seed & mask) + (i + 1) * 0x9E3779B97F4A7C15) & mask)
    return z % dim, (1 if z >> 63 == 0 else -1)


@pytest.mark.parametrize("dim,seed", [(64, 0), (100, 7), (8192, -3)])
def test_countsketch_matches_reference_hash(dim, seed):
    g = torch.Generator().manual_seed(1)
    parts = [torch.randn(3, 5, generator=g), torch.randn(7, generator=g), torch.randn(2, 2, 2, generator=g)]
    x = torch.cat([p.reshape(-1) for p in parts]).double()
    ref = np.zeros(dim)
    for i, v in enumerate(x.tolist()):
        b, s = _splitmix_reference(seed, i, dim)
        ref[b] += s * v
    got = CountSketch(dim=dim, seed=seed).sketch([(f"p{k}", p) for k, p in enumerate(parts)])
    assert got.dtype == np.float32 and got.shape == (dim,)
    np.testing.assert_allclose(got, ref.astype(np.float32), rtol=1e-6, atol=1e-6)


def test_sketches_carry_offset_across_parameters():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1003, generator=g)
    pieces = [("a", x[:7].reshape(7, 1)), ("b", x[7:500]), ("c", x[500:].reshape(1, -1))]
    for sk in (CountSketch(128, 3), StrideSketch(5), StrideSketch(3), FullSketch()):
        np.testing.assert_allclose(sk.sketch(pieces), sk.sketch([("all", x)]), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(StrideSketch(5).sketch(pieces), x.numpy()[::5])
    np.testing.assert_array_equal(FullSketch().sketch(pieces), x.numpy())


def test_sketch_determinism_and_order():
    g = torch.Generator().manual_seed(3)
    named = [("w1", torch.randn(40, 30, generator=g)), ("w2", torch.randn(50, generator=g))]
    a = CountSketch(256, seed=11).sketch(named)
    b = CountSketch(256, seed=11).sketch([(n, t.clone()) for n, t in named])
    assert np.array_equal(a, b)  # same seed: bit-identical
    assert not np.allclose(a, CountSketch(256, seed=12).sketch(named))  # another seed: another sketch
    # the parameter order is part of the sketch's definition (documented)
    assert not np.allclose(a, CountSketch(256, seed=11).sketch(named[::-1]))
    assert not np.allclose(StrideSketch(5).sketch(named), StrideSketch(5).sketch(named[::-1]))
    # linear
    doubled = CountSketch(256, seed=11).sketch([(n, 2 * t) for n, t in named])
    np.testing.assert_allclose(doubled, 2 * a, rtol=1e-6)


def test_settings_and_factory():
    assert CountSketch(1024, 5).settings() == {"kind": "countsketch", "dim": 1024, "seed": 5, "hash": "splitmix64-v1"}
    assert StrideSketch(4).settings() == {"kind": "stride", "stride": 4}
    assert FullSketch().settings() == {"kind": "full"}
    sk = make_sketcher(ConflictConfig())
    assert isinstance(sk, CountSketch) and (sk.dim, sk.seed) == (8192, 0)
    sk = make_sketcher(ConflictConfig(sketch="stride", stride=7))
    assert isinstance(sk, StrideSketch) and sk.stride == 7
    assert isinstance(make_sketcher(ConflictConfig(sketch="full")), FullSketch)
    with pytest.raises(ValueError, match="stride must be"):
        StrideSketch(0)
    with pytest.raises(ValueError, match="dim must be"):
        CountSketch(0)


# --------------------------------------------------------------------------- matrix


def test_conflict_matrix_cosine_and_gram():
    rng = np.random.default_rng(0)
    g = rng.normal(size=(6, 50)).astype(np.float32)
    c = conflict_matrix(g)
    ref = np.array(
        [[float(np.dot(a, b) / np.sqrt(np.dot(a, a) * np.dot(b, b))) for b in g.astype(np.float64)] for a in g.astype(np.float64)]
    )
    assert c.dtype == np.float64 and c.shape == (6, 6)
    np.testing.assert_allclose(c, ref, atol=1e-12)
    assert np.array_equal(c, c.T) and np.all(np.diag(c) == 1.0)
    gram = conflict_matrix(g, kind="gram")
    g64 = g.astype(np.float64)
    np.testing.assert_allclose(gram, np.einsum("id,jd->ij", g64, g64), rtol=1e-12)
    assert np.array_equal(gram, gram.T)
    np.testing.assert_allclose(conflict_matrix(4.0 * g), c, atol=1e-12)  # scale-free (exact power of 2)


def test_conflict_matrix_errors():
    g = np.ones((3, 4))
    with pytest.raises(ValueError, match="2-D"):
        conflict_matrix(np.ones(4))
    with pytest.raises(ValueError, match="2-D"):
        conflict_matrix(np.ones((2, 3, 4)))
    with pytest.raises(ValueError, match="T ≥ 1 rows"):
        conflict_matrix(np.ones((0, 4)))
    bad = g.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="row 2 contains NaN or Inf"):
        conflict_matrix(bad)
    bad = g.copy()
    bad[1, 0] = np.inf
    with pytest.raises(ValueError, match="row 1 contains NaN or Inf"):
        conflict_matrix(bad, kind="gram")
    zero = g.copy()
    zero[1] = 0
    with pytest.raises(ValueError, match="row 1 has zero norm"):
        conflict_matrix(zero)
    assert conflict_matrix(zero, kind="gram")[1, 1] == 0.0  # gram allows it
    with pytest.raises(ValueError, match="kind must be"):
        conflict_matrix(g, kind="pearson")


@pytest.mark.parametrize("dim", [512, 1000])
def test_countsketch_torch_hash_is_bit_identical_to_numpy(dim):
    """The GPU sketch's hash (torch int64, run here on the CPU) equals the numpy uint64 hash."""
    from merit_core.conflict import CountSketch

    s = CountSketch(dim=dim, seed=12345)
    for start, n in [(0, 5000), (2**31 - 7, 3000), (123_456_789_012, 2000)]:
        b_np, s_np = s.hash(np.arange(start, start + n, dtype=np.uint64))
        b_t, s_t = s.hash_torch(start, n, "cpu")
        assert np.array_equal(b_t.numpy(), b_np) and np.array_equal(s_t.numpy(), s_np)
