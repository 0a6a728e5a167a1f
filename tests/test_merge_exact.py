"""Exactness and bounded memory of the streaming merge (issue 19).

- Rounding: merit_core.merge.rounding.round_to against exact rational rounding
  (fractions.Fraction) and against an independent integer implementation.
- Merges of small bf16 and fp16 checkpoints: every element equals the correctly rounded
  float64 reference (Σ_k N_k θ_k / Σ_k N_k, products rounded, summed left to right,
  divided once), for weights that divide evenly and weights that do not.
- Streaming: direct-IO block reads equal the stored bytes; the shards' sha256, computed
  while writing, is what the manifest holds (and the shards are not read back for it);
  a merge's peak memory, measured in a subprocess, stays far below the checkpoint size.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
import textwrap
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from merit_core.merge import merge_checkpoints, stream
from merit_core.merge.io import ALIGN, Checkpoint
from merit_core.merge.rounding import round_to
from merit_core.store.manifest import read_manifest, sha256_file

ROOT = Path(__file__).resolve().parents[1]
FORMATS = {torch.bfloat16: (8, -126), torch.float16: (11, -14)}  # significand bits, min normal exponent


# ---------------------------------------------------------------- references


def exact_round(x: float, dtype: torch.dtype) -> float:
    """x rounded to nearest-even in ``dtype``, decided with exact rationals (on |x|:
    the rounding is symmetric)."""
    bits = torch.tensor([abs(x)], dtype=torch.float64).to(dtype).view(torch.int16).item()
    cands = []
    for d in range(-2, 3):
        v = torch.tensor([bits + d], dtype=torch.int16).view(dtype).double().item()
        if math.isfinite(v) and v >= 0:
            cands.append((abs(Fraction(v) - Fraction(abs(x))), (bits + d) & 1, v))
    return math.copysign(min(cands)[2], x)


def reference_round(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 -> dtype, one rounding to nearest-even on the integer bits (independent of
    merit's float32-to-odd method); inputs in the format's finite range."""
    p, emin = FORMATS[dtype]
    mag = x.view(torch.int64) & 0x7FFFFFFFFFFFFFFF
    e = (mag >> 52) - 1023
    m = (mag & ((1 << 52) - 1)) | (1 << 52)
    q = torch.clamp(e, min=emin) - (p - 1)  # exponent of one step of the format at x
    shift = torch.clamp(q - (e - 52), max=62)
    keep = m >> shift
    rem = m & ((1 << shift) - 1)
    half = 1 << (shift - 1)
    keep = keep + ((rem > half) | ((rem == half) & (keep & 1 == 1))).to(torch.int64)
    val = torch.where(mag == 0, 0.0, torch.ldexp(keep.to(torch.float64), q.to(torch.float64)))
    return torch.where(x.view(torch.int64) < 0, -val, val).to(dtype)  # exact: val is representable


def weighted_reference(tensors: list[torch.Tensor], counts: list[float]) -> torch.Tensor:
    """Σ_k N_k θ_k / Σ_k N_k in float64: products rounded, summed left to right, divided once."""
    acc = tensors[0].double() * counts[0]
    for t, c in zip(tensors[1:], counts[1:]):
        acc = acc + t.double() * c
    total = 0.0
    for c in counts:
        total += c
    return acc / total


def hard_values(n: int, seed: int) -> torch.Tensor:
    """float64 values on both sides of bf16/fp16 midpoints by less than a float32 step,
    exact midpoints, subnormals and signed zeros, plus plain random ones."""
    g = torch.Generator().manual_seed(seed)
    mid = (1 + (2 * torch.randint(0, 128, (n,), generator=g) + 1) / 2**8)  # bf16 midpoints in [1, 2)
    mid16 = (1 + (2 * torch.randint(0, 1024, (n,), generator=g) + 1) / 2**11)  # fp16 midpoints
    tiny = torch.randint(-3, 4, (n,), generator=g).double() * 2.0**-40
    scale = torch.ldexp(torch.ones(n, dtype=torch.float64), torch.randint(-20, 10, (n,), generator=g))
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
    parts = [mid.double() + tiny, mid16.double() + tiny, torch.randn(n, generator=g, dtype=torch.float64)]
    sub = torch.randn(n, generator=g, dtype=torch.float64) * 2.0**-130  # bf16 subnormals
    sub16 = torch.randn(n, generator=g, dtype=torch.float64) * 2.0**-20  # fp16 subnormals
    # bf16 subnormal midpoints plus less than float32's (subnormal) step: only float64 sees it
    sub_mid = (2 * torch.randint(0, 64, (n,), generator=g) + 1).double() * 2.0**-134 + 2.0**-152
    out = torch.cat([p * scale * sign for p in parts] + [sub, sub16, sub_mid * sign, torch.tensor([0.0, -0.0, 1 + 2**-8 + 2**-30])])
    return out[out.abs() < 60000]  # inside float16's finite range


# ---------------------------------------------------------------- rounding


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_round_to_is_correct_rounding(dtype):
    x = hard_values(20_000, seed=1)
    got = round_to(x, dtype)
    ref = reference_round(x, dtype)
    assert torch.equal(got.view(torch.int16), ref.view(torch.int16))
    # the integer reference is itself checked against exact rational rounding
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:3000]
    for i in idx.tolist():
        assert ref[i].item() == exact_round(x[i].item(), dtype), x[i].item()
    # torch's own conversion goes through float32 and rounds twice: the reason round_to exists
    naive = x.to(dtype)
    assert (naive.view(torch.int16) != ref.view(torch.int16)).sum() > 100


def test_round_to_keeps_out_and_float32_paths():
    x = torch.tensor([1 + 2**-8 + 2**-30, -2.5, 0.1], dtype=torch.float64)
    out = torch.empty(3, dtype=torch.bfloat16)
    assert round_to(x, torch.bfloat16, out=out, work=torch.empty(8)) is out
    assert out.tolist() == [1.0078125, -2.5, 0.10009765625]
    assert torch.equal(round_to(x.float(), torch.bfloat16), x.float().to(torch.bfloat16))
    assert torch.equal(round_to(x, torch.float32), x.float())


# ---------------------------------------------------------------- merges


def write_checkpoint(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 8}))
    return path


def random_inputs(k: int, dtype: torch.dtype, seed: int) -> list[dict[str, torch.Tensor]]:
    """K state dicts with magnitudes spread over 2^-20..2^4 (sums with many bits), one
    tensor over 1 MiB (direct-IO reads, several blocks), and planted hard cases."""
    g = torch.Generator().manual_seed(seed)
    sds = []
    for _ in range(k):
        spread = torch.ldexp(torch.ones(700_001), torch.randint(-20, 4, (700_001,), generator=g))
        big = torch.randn(700_001, generator=g) * spread
        sds.append({
            "a.weight": (torch.randn(300, 41, generator=g) * 0.02).to(dtype),
            "big.weight": big.clamp(-60000, 60000).to(dtype),
            "norm.weight": (1 + 0.01 * torch.randn(41, generator=g)).to(dtype),
            "steps": torch.arange(5, dtype=torch.int64),
        })
    return sds


WEIGHTS = [[1, 1, 1], [4, 3, 2, 1], [7, 3], [1e-3, 1], [1e6, 1], [2, 1, 1], [100, 250, 50, 600]]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("weights", WEIGHTS, ids=[":".join(f"{w:g}" for w in ws) for ws in WEIGHTS])
def test_token_weighted_is_correctly_rounded(tmp_path, monkeypatch, dtype, weights):
    monkeypatch.setattr(stream, "READ_BUDGET", 3 << 20)  # several blocks per tensor, odd block ends
    sds = random_inputs(len(weights), dtype, seed=len(weights))
    if weights == [2, 1, 1] and dtype == torch.bfloat16:  # (2·1 + (2 + 2^-6) + 2^-28) / 4 = 1 + 2^-8 + 2^-30
        for sd, v in zip(sds, [1.0, 2 + 2**-6, 2**-28]):  # just above a midpoint: rounds up to 1 + 2^-7
            sd["norm.weight"][0] = v
    inputs = [write_checkpoint(tmp_path / f"b{i}", sd) for i, sd in enumerate(sds)]
    merged = load_file(merge_checkpoints(inputs, weights, tmp_path / "merged") / "model.safetensors")
    naive_differs = 0
    for name, t in merged.items():
        if not t.dtype.is_floating_point:
            assert torch.equal(t, sds[0][name])
            continue
        assert t.dtype == dtype
        exact = weighted_reference([sd[name] for sd in sds], weights)
        ref = reference_round(exact, dtype)
        bad = (t.view(torch.int16) != ref.view(torch.int16)).nonzero()
        assert len(bad) == 0, f"{name}: {len(bad)} of {t.numel()} elements not correctly rounded"
        naive_differs += int((exact.to(dtype).view(torch.int16) != ref.view(torch.int16)).sum())
    if weights == [2, 1, 1] and dtype == torch.bfloat16:
        assert merged["norm.weight"][0].item() == 1.0078125  # torch's .to(bfloat16) gives 1.0
        assert naive_differs > 0


@pytest.mark.parametrize("huge", [[1e308, 1e308], [1e308, 5e307, 1e300], [3e-320, 1e-320]],
                         ids=["1e308x2", "1e308:5e307:1e300", "subnormal"])
def test_extreme_weights_give_the_same_merge_as_their_ratios(tmp_path, huge):
    """Weights that overflow (Σ = inf) or are subnormal: the merge equals the merge with
    the same ratios at ordinary scale, bit for bit (issue 15, point 5: 1e308,1e308 used
    to write an all-zero model)."""
    sds = random_inputs(len(huge), torch.bfloat16, seed=3)
    inputs = [write_checkpoint(tmp_path / f"b{i}", sd) for i, sd in enumerate(sds)]
    big = load_file(merge_checkpoints(inputs, huge, tmp_path / "big") / "model.safetensors")
    # The float64 reference with every weight times 2^-1024 (or 2^+1060 for the subnormal
    # ones): an exact rescaling, which changes no ratio and cannot overflow.
    shift = -1024 if max(huge) > 1 else 1060
    scaled = [math.ldexp(x, shift) for x in huge]
    assert all(math.isfinite(x) and x > 2.0 ** -1000 for x in scaled) and math.isfinite(sum(scaled))
    ratios = [x / max(huge) for x in huge]
    for name, t in big.items():
        if not t.dtype.is_floating_point:
            continue
        xs = [sd[name] for sd in sds]
        want = reference_round(weighted_reference(xs, scaled), torch.bfloat16)
        assert torch.equal(t.view(torch.int16), want.view(torch.int16)), name
        assert t.abs().max() > 0, f"{name} is all zero"
        # and it is the merge of the ratios, up to the last bf16 step at ties
        near = reference_round(weighted_reference(xs, ratios), torch.bfloat16)
        assert (t.view(torch.int16).int() - near.view(torch.int16).int()).abs().max() <= 1, name


def test_cli_merge_with_overflowing_weights_is_not_all_zero(tmp_path):
    from typer.testing import CliRunner

    from merit_cli.main import app

    sds = random_inputs(2, torch.bfloat16, seed=5)
    inputs = [write_checkpoint(tmp_path / f"b{i}", sd) for i, sd in enumerate(sds)]
    for out, w in (("huge", "1e308,1e308"), ("ones", "1,1")):
        r = CliRunner().invoke(app, ["merge", str(tmp_path / out), *map(str, inputs), "--weights", w])
        assert r.exit_code == 0, r.output
    huge = load_file(tmp_path / "huge" / "model.safetensors")
    ones = load_file(tmp_path / "ones" / "model.safetensors")
    for name in huge:  # equal weights at any scale: the same mean, up to one bf16 step at ties
        a, b = huge[name], ones[name]
        if a.dtype.is_floating_point:
            assert (a.view(torch.int16).int() - b.view(torch.int16).int()).abs().max() <= 1, name
        else:
            assert torch.equal(a, b), name
    assert huge["big.weight"].abs().max() > 0
    r = CliRunner().invoke(app, ["merge", str(tmp_path / "neg"), *map(str, inputs), "--weights", "1e308,1e-300"])
    assert r.exit_code == 1 and "negligible" in r.output, r.output
    assert not (tmp_path / "neg").exists()


def test_uniform_and_task_arithmetic_are_correctly_rounded(tmp_path):
    sds = random_inputs(4, torch.bfloat16, seed=7)
    inputs = [write_checkpoint(tmp_path / f"b{i}", sd) for i, sd in enumerate(sds[:3])]
    base = write_checkpoint(tmp_path / "base", sds[3])
    uni = load_file(merge_checkpoints(inputs, None, tmp_path / "u", method="uniform") / "model.safetensors")
    ta = load_file(merge_checkpoints(inputs, [3, 2, 1], tmp_path / "t", method="task_arithmetic", base=base,
                                     scale=0.5) / "model.safetensors")
    for name in ("a.weight", "big.weight"):
        xs, b = [sd[name] for sd in sds[:3]], sds[3][name].double()
        want = reference_round(weighted_reference(xs, [1, 1, 1]), torch.bfloat16)
        assert torch.equal(uni[name].view(torch.int16), want.view(torch.int16)), name
        delta = weighted_reference([x.double() - b for x in xs], [3, 2, 1])
        want = reference_round(delta * 0.5 + b, torch.bfloat16)
        assert torch.equal(ta[name].view(torch.int16), want.view(torch.int16)), name


# ---------------------------------------------------------------- streaming IO


def test_block_reads_with_direct_io_equal_the_stored_bytes(tmp_path):
    g = torch.Generator().manual_seed(3)
    sd = {"odd": torch.randn(5, generator=g).to(torch.bfloat16),  # shifts the next tensor off page alignment
          "big": torch.randn(3_000_001, generator=g).to(torch.bfloat16),
          "f32": torch.randn(1000, 700, generator=g)}
    ckpt = Checkpoint(write_checkpoint(tmp_path / "c", sd))
    assert ckpt.tensors["big"].offset % ALIGN != 0
    buf = torch.empty((2 << 20) * 4 + ALIGN, dtype=torch.uint8)
    with ckpt.open() as r:
        for name, start, count in [("big", 0, 1_000_000), ("big", 999_999, 2_000_002), ("big", 12345, 700_000),
                                   ("f32", 3, 600_001), ("odd", 1, 3)]:
            got = r.read(name, start, count, out=buf)
            assert torch.equal(got, sd[name].reshape(-1)[start:start + count]), (name, start)
        assert torch.equal(r.read("f32"), sd["f32"])


def test_manifest_holds_the_sha256_computed_while_writing(tmp_path, monkeypatch):
    from merit_core.store import manifest

    sds = random_inputs(2, torch.bfloat16, seed=5)
    inputs = [write_checkpoint(tmp_path / f"b{i}", sd) for i, sd in enumerate(sds)]
    hashed = []
    real = manifest.sha256_file
    monkeypatch.setattr(manifest, "sha256_file", lambda p, *a, **kw: hashed.append(Path(p).name) or real(p, *a, **kw))
    out = merge_checkpoints(inputs, [1, 3], tmp_path / "merged", max_shard_size="1MB")
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and not set(shards) & set(hashed)  # the shards were not read back
    files = read_manifest(out)["files"]
    for name in shards:
        assert files[name]["sha256"] == sha256_file(out / name)
        assert files[name]["size"] == (out / name).stat().st_size


PEAK = textwrap.dedent("""
    import json, sys
    import merit_core.merge.stream as stream
    from merit_core.merge import merge_checkpoints

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    stream.READ_BUDGET = 16 << 20
    inputs, out, warm = sys.argv[1:-2], sys.argv[-2], sys.argv[-1]
    # a small merge first: code pages of the kernels used and lazy imports count as the baseline
    merge_checkpoints([warm, warm], [1, 2], out + "-warm-up")
    before = status("VmRSS:")
    merge_checkpoints(inputs, [3] + [1] * (len(inputs) - 1), out)
    print(json.dumps({"before": before, "peak": status("VmHWM:")}))
""")


def big_block(seed: int) -> torch.Tensor:
    return (torch.randn(1 << 22, generator=torch.Generator().manual_seed(seed)) * 0.02).to(torch.bfloat16)


def big_checkpoint(path: Path, elements: int, seed: int) -> Path:
    """A bf16 checkpoint with one tensor of ``elements`` elements (``big_block(seed)``
    repeated), written block by block in safetensors layout."""
    path.mkdir()
    block = big_block(seed)
    header = json.dumps({"__metadata__": {"format": "pt"},
                         "big": {"dtype": "BF16", "shape": [elements], "data_offsets": [0, 2 * elements]}}).encode()
    with open(path / "model.safetensors", "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        f.writelines(block[: min(block.numel(), elements - s)].view(torch.uint8).numpy().tobytes() for s in range(0, elements, block.numel()))
    (path / "config.json").write_text("{}")
    return path


def test_peak_memory_stays_bounded_on_a_much_larger_checkpoint(tmp_path):
    elements = 96 << 20  # one 192 MiB bf16 tensor per input; 3 inputs: 576 MiB read, 192 MiB written
    inputs = [big_checkpoint(tmp_path / f"b{i}", elements, seed=i) for i in range(3)]
    warm = write_checkpoint(tmp_path / "warm", {"big": big_block(0)[:100_000]})
    res = subprocess.run([sys.executable, "-c", PEAK, *map(str, inputs), str(tmp_path / "merged"), str(warm)], check=False, cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads(res.stdout.strip().splitlines()[-1])
    grew = m["peak"] - m["before"]
    print(f"merge peak RSS: {m['peak'] / 2**20:.0f} MiB, grew {grew / 2**20:.0f} MiB over {m['before'] / 2**20:.0f} MiB")
    bound = 64 << 20  # 12 MiB of read buffers, 4 of output blocks, 14 of float64 scratch, 8 of writer staging
    assert grew < bound, f"peak RSS grew by {grew / 2**20:.0f} MiB during the merge"
    assert 3 * 2 * elements > 5 * bound  # the inputs are far larger than what the merge may hold
    merged = Checkpoint(tmp_path / "merged")
    assert merged.tensors["big"].shape == (elements,)
    head = merged.read("big")[:1000]
    want = reference_round(weighted_reference([big_block(i)[:1000] for i in range(3)], [3, 1, 1]), torch.bfloat16)
    assert torch.equal(head.view(torch.int16), want.view(torch.int16))


def test_streamed_shards_equal_safetensors_own_files(tmp_path):
    """Bytes written by the streaming writer load with safetensors and hash like the file."""
    sds = random_inputs(1, torch.float16, seed=11)
    (inp,) = [write_checkpoint(tmp_path / "b0", sds[0])]
    out = merge_checkpoints([inp], [5], tmp_path / "merged", max_shard_size="700KB")
    merged = {}
    for f in sorted(out.glob("*.safetensors")):
        merged.update(load_file(f))
        assert hashlib.sha256(f.read_bytes()).hexdigest() == read_manifest(out)["files"][f.name]["sha256"]
    for name, t in sds[0].items():
        assert torch.equal(merged[name].view(torch.uint8) if t.is_floating_point() else merged[name],
                           t.view(torch.uint8) if t.is_floating_point() else t), name
