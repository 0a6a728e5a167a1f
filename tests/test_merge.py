"""merit_core.merge: streaming merge of HF safetensors directories (spec step 5).

Every expected value is computed independently here: full state dicts loaded with
safetensors.torch.load_file and combined in float64.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import build_tiny_llama
from merit_core.store.manifest import is_complete, verify_manifest
from merit_core.merge import MERGE_METHODS, MergeError, merge_checkpoints, register
from merit_core.merge import dare, ties
from merit_core.merge.io import Checkpoint
from merit_core.merge.registry import HyperParam

TOKENS = [100, 250, 50, 600]


# ---------------------------------------------------------------- helpers


def save_model(model, tokenizer, path: Path, *, sharded: bool = False, dtype=None) -> Path:
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(path, max_shard_size="50KB" if sharded else "2GB")
    tokenizer.save_pretrained(path)
    return path


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors dir (single file or shards), loaded eagerly."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def rewrite(path: Path, fn) -> None:
    """Apply ``fn(name, tensor) -> tensor | None`` to every tensor of a dir (None drops)."""
    for f in sorted(Path(path).glob("*.safetensors")):
        sd = load_file(f)
        new = {}
        for n, t in sd.items():
            r = fn(n, t)
            if r is not None:
                new[n] = r.contiguous()
        save_file(new, f, metadata={"format": "pt"})
    idx = Path(path) / "model.safetensors.index.json"
    if idx.is_file():
        data = json.loads(idx.read_text())
        present = {n: f.name for f in Path(path).glob("*.safetensors") for n in load_file(f)}
        data["weight_map"] = present
        idx.write_text(json.dumps(data))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def no_output(out: Path) -> bool:
    """Nothing committed at ``out`` and no temporary sibling left behind."""
    leftovers = [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    return not is_complete(out) and not out.exists() and not leftovers


@pytest.fixture()
def make_inputs(tmp_path, tiny_tokenizer):
    """make_inputs(k, sharded=False, dtype=None, seed0=1) -> list of saved branch dirs."""

    def make(k: int, sharded: bool = False, dtype=None, seed0: int = 1, tag: str = "b") -> list[Path]:
        return [
            save_model(build_tiny_llama(len(tiny_tokenizer), seed=seed0 + i), tiny_tokenizer,
                       tmp_path / f"{tag}{i}", sharded=sharded, dtype=dtype)
            for i in range(k)
        ]

    return make


@pytest.fixture()
def base_dir(tmp_path, tiny_tokenizer):
    return save_model(build_tiny_llama(len(tiny_tokenizer), seed=0), tiny_tokenizer, tmp_path / "base")


# ---------------------------------------------------------------- token-weighted maths


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_token_weighted_equals_float64_reference(make_inputs, tmp_path, k, sharded):
    inputs = make_inputs(k, sharded=sharded)
    out = merge_checkpoints(inputs, TOKENS[:k], tmp_path / "merged", max_shard_size="50KB" if sharded else "2GB")
    merged = load_dir(out)
    sds = [load_dir(p) for p in inputs]
    w = torch.tensor(TOKENS[:k], dtype=torch.float64)
    w = w / w.sum()
    assert set(merged) == set(sds[0])
    for name, t in merged.items():
        assert t.dtype == torch.float32
        ref = sum(wk * sd[name].double() for wk, sd in zip(w, sds))
        assert rel_err(t, ref) <= 1e-6, name
        if k == 1:
            assert torch.equal(t, sds[0][name]), name  # bitwise
    assert (out / "model.safetensors.index.json").is_file() == sharded
    assert len(list(out.glob("*.safetensors"))) > 1 if sharded else len(list(out.glob("*.safetensors"))) == 1
    verify_manifest(out)


def test_k1_bitwise_exact_including_signed_zero_and_bf16(make_inputs, tmp_path):
    (inp,) = make_inputs(1, dtype=torch.bfloat16)
    rewrite(inp, lambda n, t: torch.where(t.abs() < 1e-3, torch.tensor(-0.0, dtype=t.dtype), t))
    out = merge_checkpoints([inp], [7], tmp_path / "merged")
    a, b = load_dir(out), load_dir(inp)
    assert a.keys() == b.keys()
    for n in a:
        assert a[n].dtype == torch.bfloat16
        assert torch.equal(a[n].view(torch.int16), b[n].view(torch.int16)), n


def test_bf16_inputs_write_bf16(make_inputs, tmp_path):
    inputs = make_inputs(4, dtype=torch.bfloat16, sharded=True)
    out = merge_checkpoints(inputs, TOKENS, tmp_path / "merged", max_shard_size="50KB")
    merged = load_dir(out)
    sds = [load_dir(p) for p in inputs]
    w = torch.tensor(TOKENS, dtype=torch.float64) / sum(TOKENS)
    for name, t in merged.items():
        assert t.dtype == torch.bfloat16
        ref = sum(wk * sd[name].double() for wk, sd in zip(w, sds))
        # one bf16 rounding of an (almost) exact result: |err| <= 2^-8 |ref|
        assert bool(((t.double() - ref).abs() <= 2.0**-8 * ref.abs() + 1e-30).all()), name
        # (every element is the correctly rounded float64 mean: tests/test_merge_exact.py)
        assert (t == ref.to(torch.bfloat16)).double().mean() > 0.99, name


# ---------------------------------------------------------------- output directory


def test_output_is_hf_loadable_with_config_tokenizer_and_manifest(make_inputs, tmp_path, tiny_tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    inputs = make_inputs(3, sharded=True)
    out = merge_checkpoints(inputs, TOKENS[:3], tmp_path / "merged", max_shard_size="50KB",
                            metadata={"run_id": "r1"})
    names = {p.name for p in out.iterdir()}
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "chat_template.jinja", "model.safetensors.index.json", "manifest.json"):
        assert f in names, f
    manifest = verify_manifest(out)
    assert set(manifest["files"]) == names - {"manifest.json"}
    meta = manifest["metadata"]
    assert meta["run_id"] == "r1"
    assert meta["merge"]["method"] == "token_weighted"
    assert meta["merge"]["inputs"] == ["b0", "b1", "b2"]
    assert meta["merge"]["weights"] == pytest.approx([t / 400 for t in TOKENS[:3]])
    assert str(tmp_path) not in json.dumps(meta)  # no absolute paths

    model = AutoModelForCausalLM.from_pretrained(out)
    merged = load_dir(out)
    sd = model.state_dict()
    for n, t in merged.items():
        assert torch.equal(sd[n], t), n
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    assert AutoTokenizer.from_pretrained(out).chat_template == tiny_tokenizer.chat_template


def test_existing_output_is_replaced_and_output_cannot_be_an_input(make_inputs, tmp_path):
    inputs = make_inputs(2)
    out = tmp_path / "merged"
    merge_checkpoints(inputs, [1, 1], out)
    (out / "stale.txt").write_text("old")
    merge_checkpoints(inputs, [1, 3], out)
    assert not (out / "stale.txt").exists()
    verify_manifest(out)
    with pytest.raises(MergeError, match="also an input"):
        merge_checkpoints(inputs, [1, 1], inputs[0])


# ---------------------------------------------------------------- other operators


def test_uniform_ignores_token_counts(make_inputs, tmp_path):
    inputs = make_inputs(3)
    out = merge_checkpoints(inputs, [1, 2, 1000], tmp_path / "merged", method="uniform")
    sds = [load_dir(p) for p in inputs]
    for n, t in load_dir(out).items():
        assert rel_err(t, sum(sd[n].double() for sd in sds) / 3) <= 1e-6, n


def test_task_arithmetic_with_scale(make_inputs, base_dir, tmp_path):
    inputs = make_inputs(3)
    out = merge_checkpoints(inputs, TOKENS[:3], tmp_path / "merged", method="task_arithmetic",
                            base=base_dir, scale=0.7)
    sds, b = [load_dir(p) for p in inputs], load_dir(base_dir)
    w = torch.tensor(TOKENS[:3], dtype=torch.float64) / 400
    for n, t in load_dir(out).items():
        ref = b[n].double() + 0.7 * sum(wk * (sd[n].double() - b[n].double()) for wk, sd in zip(w, sds))
        assert rel_err(t, ref) <= 1e-6, n
    assert verify_manifest(out)["metadata"]["merge"]["scale"] == 0.7


def test_ties_sign_election_hand_made():
    base = torch.zeros(6)
    d1 = torch.tensor([3.0, -1.0, 2.0, 0.5, -0.2, 0.0])
    d2 = torch.tensor([-2.0, -4.0, 1.0, 0.1, 0.3, 0.0])
    d3 = torch.tensor([-2.5, 1.0, -1.0, 0.2, 0.0, 0.0])
    w = torch.tensor([1 / 3, 1 / 3, 1 / 3])
    out = ties.merge_tensor([d1, d2, d3], w, base, density=1.0, scale=1.0)
    # entry 0: mass 3-2-2.5 = -1.5 -> negative wins, mean(-2, -2.5) = -2.25
    # entry 1: mass -1-4+1 -> negative, mean(-1, -4) = -2.5
    # entry 2: mass 2+1-1 -> positive, mean(2, 1) = 1.5
    # entry 3: all positive -> mean(0.5, 0.1, 0.2) = 0.8/3
    # entry 4: mass -0.2+0.3 -> positive, only d2 agrees -> 0.3
    # entry 5: nothing -> stays at base
    expected = torch.tensor([-2.25, -2.5, 1.5, 0.8 / 3, 0.3, 0.0])
    assert torch.allclose(out, expected, atol=1e-6)
    # trimming: density 0.5 keeps the 3 largest |δ| of each task vector
    assert torch.equal(ties.trim(d1, 0.5), torch.tensor([3.0, -1.0, 2.0, 0.0, 0.0, 0.0]))
    # scale and base
    assert torch.allclose(ties.merge_tensor([d1 + 1, d2 + 1, d3 + 1], w, base + 1, density=1.0, scale=2.0),
                          1 + 2 * expected, atol=1e-6)


def _ties_reference(deltas: list[torch.Tensor], w: torch.Tensor, density: float) -> torch.Tensor:
    """TIES in float64 by sorting (independent of the operator's topk/where)."""
    trimmed = []
    for d in deltas:
        flat = d.reshape(-1)
        k = math.ceil(density * flat.numel())
        thresh = flat.abs().sort(descending=True).values[k - 1]
        trimmed.append(torch.where(flat.abs() >= thresh, flat, torch.zeros_like(flat)))
    mass = sum(wk * t for wk, t in zip(w, trimmed))
    num = torch.zeros_like(mass)
    den = torch.zeros_like(mass)
    for wk, t in zip(w, trimmed):
        agree = (t != 0) & ((t > 0) == (mass > 0)) & (mass != 0)
        num += torch.where(agree, wk * t, 0.0)
        den += torch.where(agree, wk, 0.0)
    return torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 0.0).reshape(deltas[0].shape)


def test_ties_matches_independent_reference(make_inputs, base_dir, tmp_path):
    inputs = make_inputs(3)
    out = merge_checkpoints(inputs, TOKENS[:3], tmp_path / "merged", method="ties", base=base_dir,
                            density=0.3, scale=1.5)
    sds, b = [load_dir(p) for p in inputs], load_dir(base_dir)
    w = torch.tensor(TOKENS[:3], dtype=torch.float64) / 400
    merged = load_dir(out)
    for n in ("model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight", "model.norm.weight"):
        deltas = [sd[n].double() - b[n].double() for sd in sds]
        ref = b[n].double() + 1.5 * _ties_reference(deltas, w, 0.3)
        assert rel_err(merged[n], ref) <= 1e-6, n


def test_dare_seeded_reproducible_and_unbiased(make_inputs, base_dir, tmp_path):
    inputs = make_inputs(2)
    kw = dict(method="dare", base=base_dir, density=0.5)
    a = load_dir(merge_checkpoints(inputs, [1, 3], tmp_path / "m1", seed=3, **kw))
    b = load_dir(merge_checkpoints(inputs, [1, 3], tmp_path / "m2", seed=3, **kw))
    c = load_dir(merge_checkpoints(inputs, [1, 3], tmp_path / "m3", seed=4, **kw))
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)
    # density 1 is plain task arithmetic
    d1 = load_dir(merge_checkpoints(inputs, [1, 3], tmp_path / "m4", method="dare", base=base_dir, density=1.0))
    ta = load_dir(merge_checkpoints(inputs, [1, 3], tmp_path / "m5", method="task_arithmetic", base=base_dir))
    assert all(torch.allclose(d1[n], ta[n], atol=1e-7) for n in ta)

    # operator level: kept fraction ≈ density, kept entries rescaled by 1/density, unbiased
    base = torch.zeros(200_000)
    delta = torch.linspace(-1, 1, 200_000)
    one = dare.merge_tensor([delta], torch.tensor([1.0]), base, name="x", density=0.3, seed=0)
    kept = one != 0
    assert abs(kept.double().mean().item() - 0.3) < 0.01
    assert torch.allclose(one[kept], delta[kept] / 0.3)
    mean = sum(dare.merge_tensor([delta], torch.tensor([1.0]), base, name="x", density=0.3, seed=s)
               for s in range(200)) / 200
    assert (mean - delta).abs().mean() < 0.05
    # the mask depends on the tensor name, not on the visiting order
    other = dare.merge_tensor([delta], torch.tensor([1.0]), base, name="y", density=0.3, seed=0)
    assert not torch.equal(one, other)


def test_register_adds_an_operator(make_inputs, tmp_path):
    @register("first_only")
    def first_only(tensors, weights, base=None, **kw):
        return tensors[0].clone()

    try:
        inputs = make_inputs(2)
        out = merge_checkpoints(inputs, None, tmp_path / "merged", method="first_only")
        a, b = load_dir(out), load_dir(inputs[0])
        assert all(torch.equal(a[n], b[n]) for n in a)
    finally:
        MERGE_METHODS.pop("first_only")


def test_builtin_operators_declare_base_weights_and_hyperparameters():
    declared = {name: (m.needs_base, m.weights, [hp.name for hp in m.hyperparams]) for name, m in MERGE_METHODS.items()}
    assert declared == {
        "token_weighted": (False, "tokens", []),
        "uniform": (False, "uniform", []),
        "task_arithmetic": (True, "given", ["scale"]),
        "ties": (True, "given", ["scale", "density"]),
        "dare": (True, "given", ["scale", "density", "seed"]),
    }
    from merit_core.config import MergeConfig

    assert MergeConfig().model_dump() == {"method": "token_weighted", "scale": 1.0, "density": 0.2, "seed": 0,
                                          "max_shard_size": "2GB"}


GAMMA = HyperParam("gamma", float, 0.5, "fraction of the first task vector kept", ge=0, le=1)


def test_registered_operator_is_reachable_from_config(make_inputs, base_dir, tmp_path):
    from merit_core.config import ConfigError, load_config

    @register("first_task_vector", needs_base=True, hyperparams=(GAMMA,))
    def first_task_vector(tensors, weights, base=None, *, gamma, **kw):
        return base + gamma * (tensors[0] - base)

    try:
        cfg = load_config(overrides=["merge.method=first_task_vector", "merge.gamma=0.25"])
        assert cfg.merge.method == "first_task_vector" and cfg.merge.gamma == 0.25
        inputs = make_inputs(2)
        out = merge_checkpoints(inputs, [1, 3], tmp_path / "merged", base=base_dir, **cfg.merge.model_dump())
        first, b = load_dir(inputs[0]), load_dir(base_dir)
        for n, t in load_dir(out).items():
            assert rel_err(t, b[n].double() + 0.25 * (first[n].double() - b[n].double())) <= 1e-6, n
        record = verify_manifest(out)["metadata"]["merge"]
        assert record["method"] == "first_task_vector" and record["gamma"] == 0.25
        assert record["scale"] is None and record["density"] is None
        with pytest.raises(ConfigError, match=r"merge\.gamma.*gamma must be ≥ 0 and ≤ 1, got 2"):
            load_config(overrides=["merge.method=first_task_vector", "merge.gamma=2"])
        with pytest.raises(MergeError, match="needs base"):
            merge_checkpoints(inputs, [1, 3], tmp_path / "other", method="first_task_vector")
    finally:
        MERGE_METHODS.pop("first_task_vector")
    with pytest.raises(ConfigError, match="unknown merge method 'first_task_vector'"):
        load_config(overrides=["merge.method=first_task_vector"])


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("merge.method=nope", r"merge\.method: .*unknown merge method 'nope'; registered: dare, task_arithmetic, "
                              r"ties, token_weighted, uniform"),
        ("merge.density=1.5", r"merge\.density: Input should be less than or equal to 1"),
        ("merge.density=0", r"merge\.density: Input should be greater than 0"),
        ("merge.scale=-1", r"merge\.scale: Input should be greater than 0"),
        ("merge.scale=.inf", r"merge\.scale: Input should be a finite number"),
        ("merge.seed=1.5", r"merge\.seed: Input should be a valid integer"),
        ("merge.densty=0.3", r"merge\.densty: unknown merge hyper-parameter 'densty'; .*scale, density, seed"),
    ],
)
def test_config_refuses_unknown_method_and_bad_hyperparameters(override, pattern):
    from merit_core.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=pattern):
        load_config(overrides=[override])


@pytest.mark.parametrize(
    "kw, pattern",
    [
        ({"density": 0}, r"density must be > 0 and ≤ 1, got 0"),
        ({"scale": float("inf")}, r"scale must be a finite number, got inf"),
        ({"seed": 0.5}, r"seed must be an integer, got 0.5"),
        ({"density": "0.3"}, r"density must be a float"),
        ({"gamma": 0.1}, r"unknown merge hyper-parameter 'gamma'"),
    ],
)
def test_merge_refuses_bad_hyperparameters(make_inputs, tmp_path, kw, pattern):
    inputs = make_inputs(2)
    out = tmp_path / "merged"
    with pytest.raises(MergeError, match=pattern):
        merge_checkpoints(inputs, [1, 1], out, **kw)
    assert no_output(out)


def test_register_refuses_conflicting_declarations():
    noop = lambda tensors, weights, base=None, **kw: tensors[0]  # noqa: E731
    with pytest.raises(ValueError, match="'density' is declared differently by operator 'ties'"):
        register("x", hyperparams=(HyperParam("density", float, 0.5, "other default", gt=0, le=1),))(noop)
    with pytest.raises(ValueError, match="reserved"):
        register("x", hyperparams=(HyperParam("base", float, 0.5, "clashes with the base argument"),))(noop)
    with pytest.raises(ValueError, match="weights must be one of"):
        register("x", weights="tokens_please")(noop)
    assert "x" not in MERGE_METHODS


# ---------------------------------------------------------------- checks before writing


def test_tied_lm_head_stored_in_one_input_only_is_fine(make_inputs, tmp_path):
    inputs = make_inputs(2)
    sd = load_file(inputs[1] / "model.safetensors")
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    save_file(sd, inputs[1] / "model.safetensors", metadata={"format": "pt"})
    assert "lm_head.weight" in Checkpoint(inputs[1]).tensors
    out = merge_checkpoints(inputs, [1, 1], tmp_path / "merged")
    assert "lm_head.weight" not in load_dir(out)
    verify_manifest(out)


CULPRIT = "model.layers.1.mlp.up_proj.weight"


def _poke(t: torch.Tensor, value: float) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[7] = value
    return t


@pytest.mark.parametrize(
    "case, edit, pattern",
    [
        ("missing", lambda n, t: None if n == CULPRIT else t, "missing"),
        ("shape", lambda n, t: t[:-1] if n == CULPRIT else t, "shape"),
        ("dtype", lambda n, t: t.half() if n == CULPRIT else t, "dtype"),
        ("nan", lambda n, t: _poke(t, float("nan")) if n == CULPRIT else t, "NaN"),
        ("inf", lambda n, t: _poke(t, float("-inf")) if n == CULPRIT else t, "Inf"),
    ],
)
@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_tensor_mismatch_raises_naming_tensor_and_input(make_inputs, tmp_path, case, edit, pattern, sharded):
    inputs = make_inputs(3, sharded=sharded)
    rewrite(inputs[2], edit)
    out = tmp_path / "merged"
    with pytest.raises(MergeError, match=pattern) as e:
        merge_checkpoints(inputs, TOKENS[:3], out, max_shard_size="50KB")
    assert CULPRIT in str(e.value) and str(inputs[2]) in str(e.value)
    assert no_output(out)


def test_vocab_size_mismatch(make_inputs, tmp_path):
    inputs = make_inputs(2)
    cfg = json.loads((inputs[1] / "config.json").read_text())
    cfg["vocab_size"] = 401
    (inputs[1] / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "merged"
    with pytest.raises(MergeError, match="vocab_size") as e:
        merge_checkpoints(inputs, [1, 1], out)
    assert str(inputs[1]) in str(e.value)
    assert no_output(out)


def test_nan_in_base_is_refused(make_inputs, base_dir, tmp_path):
    inputs = make_inputs(2)
    rewrite(base_dir, lambda n, t: torch.full_like(t, float("nan")) if n == "model.norm.weight" else t)
    out = tmp_path / "merged"
    with pytest.raises(MergeError, match="NaN") as e:
        merge_checkpoints(inputs, [1, 1], out, method="ties", base=base_dir)
    assert "model.norm.weight" in str(e.value) and str(base_dir) in str(e.value)
    assert no_output(out)


@pytest.mark.parametrize(
    "weights, method, base, pattern",
    [
        ([1, 2, 3], "token_weighted", None, "3 weights for 2 inputs"),
        ([1, 0], "token_weighted", None, "positive"),
        ([1, -5], "token_weighted", None, "positive"),
        ([1, float("nan")], "token_weighted", None, "positive"),
        ([1, float("inf")], "token_weighted", None, "positive"),
        (None, "token_weighted", None, "token count"),
        ([1, 1], "task_arithmetic", None, "needs base"),
        ([1, 1], "ties", None, "needs base"),
        ([1, 1], "dare", None, "needs base"),
        ([1, 1], "nope", None, "unknown merge method"),
    ],
)
def test_bad_arguments(make_inputs, tmp_path, weights, method, base, pattern):
    inputs = make_inputs(2)
    out = tmp_path / "merged"
    with pytest.raises(MergeError, match=pattern):
        merge_checkpoints(inputs, weights, out, method=method, base=base)
    assert no_output(out)


def test_input_without_weights_or_not_a_dir(make_inputs, tmp_path):
    inputs = make_inputs(1)
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "merged"
    with pytest.raises(MergeError, match="no safetensors weights"):
        merge_checkpoints([inputs[0], empty], [1, 1], out)
    with pytest.raises(MergeError, match="not a directory"):
        merge_checkpoints([inputs[0], tmp_path / "nowhere"], [1, 1], out)
    assert no_output(out)


def test_merge_config_fields_pass_through(make_inputs, tmp_path):
    from merit_core.config import MergeConfig

    inputs = make_inputs(2)
    out = merge_checkpoints(inputs, [2, 6], tmp_path / "merged", **MergeConfig(max_shard_size="50KB").model_dump())
    assert verify_manifest(out)["metadata"]["merge"]["weights"] == [0.25, 0.75]


def test_huge_finite_values_are_not_mistaken_for_inf(make_inputs, tmp_path):
    # the fast NaN/Inf check sums a tensor; a sum that overflows must fall back, not fail
    inputs = make_inputs(2)
    for p in inputs:
        rewrite(p, lambda n, t: torch.full_like(t, 3e38) if n == "model.norm.weight" else t)
    out = merge_checkpoints(inputs, [1, 1], tmp_path / "merged", method="uniform")
    assert torch.all(load_dir(out)["model.norm.weight"] == torch.tensor(3e38))
