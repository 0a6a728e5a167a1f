"""Merge at scale: `merit merge` against the disk floor and mergekit's `linear` merge.

Builds K synthetic random bf16 checkpoints with the tensor names and shapes of a real
architecture (Qwen2.5-3B by default: hidden 2048, intermediate 11008, 36 layers, 16
heads / 2 KV heads, vocabulary 151936, tied embeddings; 2 GB shards like the Hub's),
then, with the page cache dropped before each run, measures in subprocesses:

- disk floor: every input file read once (one thread per checkpoint) while one
  output-sized file is written and fsynced — the IO a merge cannot avoid;
- merit: ``python -m merit_cli.main merge OUT IN... --weights W`` (the `merit merge`
  command of this checkout);
- mergekit: ``mergekit-yaml`` with ``merge_method: linear`` and the same weights
  (installed into --mergekit-venv, created when missing: torch 2.13.0 CPU + mergekit);

each with wall time and peak RSS (``/usr/bin/time -v``). Then it checks exactness: the
fraction of elements equal to bf16(Σ_k w_k θ_k / Σ_k w_k computed in float64), rounded
once to nearest-even by an integer implementation independent of merit's, and whether
merit's tensor bytes equal mergekit's. It prints a table and the command, says how much
disk it needs before it starts (refusing when it is not free), and removes everything
it wrote.

    python bench/merge_scale.py                                 # 3B, K = 4, weights 4:3:2:1
    python bench/merge_scale.py --k 8 --weights 8,7,6,5,4,3,2,1
    python bench/merge_scale.py --shape tiny                    # seconds, for debugging
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GiB = 1 << 30

# name: (hidden, intermediate, layers, heads, kv_heads, vocab, tied)
SHAPES = {
    "tiny": (256, 704, 4, 4, 2, 8192, True),
    "qwen2.5-0.5b": (896, 4864, 24, 14, 2, 151936, True),
    "qwen2.5-3b": (2048, 11008, 36, 16, 2, 151936, True),
    "qwen2.5-7b": (3584, 18944, 28, 28, 4, 152064, False),
}


def tensor_shapes(shape: str) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a Qwen2 causal LM of the given size (HF naming)."""
    h, inter, layers, heads, kv, vocab, tied = SHAPES[shape]
    hd = h // heads
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, h)}
    for i in range(layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (h,)
        out[p + "mlp.down_proj.weight"] = (h, inter)
        out[p + "mlp.gate_proj.weight"] = (inter, h)
        out[p + "mlp.up_proj.weight"] = (inter, h)
        out[p + "post_attention_layernorm.weight"] = (h,)
        for n, rows in (("q_proj", heads * hd), ("k_proj", kv * hd), ("v_proj", kv * hd)):
            out[p + f"self_attn.{n}.weight"] = (rows, h)
            out[p + f"self_attn.{n}.bias"] = (rows,)
        out[p + "self_attn.o_proj.weight"] = (h, heads * hd)
    out["model.norm.weight"] = (h,)
    if not tied:
        out["lm_head.weight"] = (vocab, h)
    return out


def config_json(shape: str) -> dict:
    h, inter, layers, heads, kv, vocab, tied = SHAPES[shape]
    return {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": h,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv, "vocab_size": vocab, "tie_word_embeddings": tied,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "hidden_act": "silu", "torch_dtype": "bfloat16", "bos_token_id": 151643, "eos_token_id": 151643,
    }


def checkpoint_bytes(shape: str) -> int:
    import math

    return sum(2 * math.prod(s) for s in tensor_shapes(shape).values())


# ------------------------------------------------------------------ building inputs

BUILD = textwrap.dedent("""
    import json, sys, torch
    sys.path.insert(0, sys.argv[1])
    from bench.merge_scale import tensor_shapes, config_json
    from merit_core.merge.io import TensorInfo
    from merit_core.merge.shards import ShardWriter
    out, shape, seed = sys.argv[2], sys.argv[3], int(sys.argv[4])
    torch.set_num_threads(1)
    infos = {n: TensorInfo(s, torch.bfloat16, "") for n, s in tensor_shapes(shape).items()}
    w = ShardWriter(out, infos, "2GB")
    g = torch.Generator().manual_seed(seed)
    step = 1 << 24
    for n in w.order:
        total = infos[n].numel
        for s in range(0, total, step):
            w.write(n, (torch.randn(min(step, total - s), generator=g) * 0.02).to(torch.bfloat16))
    w.close()
    open(out + "/config.json", "w").write(json.dumps(config_json(shape), indent=2))
""")


def build_inputs(root: Path, shape: str, k: int) -> list[Path]:
    """K random bf16 checkpoints (seeds 1..K), two built at a time in subprocesses."""
    dirs = [root / f"branch{i}" for i in range(k)]
    procs: list[subprocess.Popen] = []
    for i, d in enumerate(dirs):
        d.mkdir(parents=True)
        procs.append(subprocess.Popen([sys.executable, "-c", BUILD, str(ROOT), str(d), shape, str(i + 1)]))
        if len(procs) == 2 or i == k - 1:
            for p in procs:
                if p.wait() != 0:
                    sys.exit(f"building {d} failed")
            procs = []
    return dirs


# ------------------------------------------------------------------ measuring

FLOOR = textwrap.dedent("""
    import mmap, os, sys, threading
    out, size, write_mode, inputs = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
    CH = 16 << 20
    def read_dir(d):  # through the page cache, released as read (as merit reads the partial pages)
        buf = bytearray(CH)
        for f in sorted(os.listdir(d)):
            if f.endswith(".safetensors"):
                fd = os.open(os.path.join(d, f), os.O_RDONLY)
                pos = 0
                while n := os.preadv(fd, [buf], pos):
                    os.posix_fadvise(fd, pos, n, os.POSIX_FADV_DONTNEED)
                    pos += n
                os.close(fd)
    def write():  # O_DIRECT (as merit writes) or through the page cache; fsync either way
        block = mmap.mmap(-1, CH)
        block.write(os.urandom(CH))
        direct = os.O_DIRECT if write_mode == "direct" else 0
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | direct)
        left = size
        while left > 0:
            left -= os.write(fd, memoryview(block)[:min(CH, -(-left // 4096) * 4096)])
        os.ftruncate(fd, size)
        os.fsync(fd)
        os.close(fd)
    ts = [threading.Thread(target=read_dir, args=(d,)) for d in inputs] + [threading.Thread(target=write)]
    for t in ts: t.start()
    for t in ts: t.join()
""")
FLOORS = {"disk floor (direct write)": "direct", "disk floor (buffered write)": "buffered"}


def drop_caches() -> str:
    """Drop the page cache (needs root); returns "" or why it could not."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return ""
    except OSError as e:
        return f"page cache NOT dropped ({e})"


def timed(cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> dict:
    """Run ``cmd`` under /usr/bin/time -v after dropping the page cache: wall seconds
    (measured here), peak RSS (GB, 1e9 bytes), load average before."""
    note = drop_caches()
    load = os.getloadavg()
    t0 = time.perf_counter()
    res = subprocess.run(["/usr/bin/time", "-v", *cmd], check=False, env=env, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        sys.exit(f"failed ({res.returncode}): {shlex.join(cmd)}\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}")
    kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", res.stderr).group(1))
    return {"wall": wall, "rss_gb": kb * 1024 / 1e9, "load": load, "load_after": os.getloadavg(), "note": note}


def run_merit(inputs: list[Path], weights: list[float], out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "merit_cli.main", "merge", str(out), *map(str, inputs),
           "--weights", ",".join(f"{w:g}" for w in weights)]
    return timed(cmd, env=env, cwd=ROOT)


def ensure_mergekit(venv: Path) -> Path:
    exe = venv / "bin" / "mergekit-yaml"
    if not exe.exists():
        print(f"installing mergekit into {venv} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "pip"), "install", "-q"]
        subprocess.run([*pip, "torch==2.13.0"], check=True)
        subprocess.run([*pip, "mergekit"], check=True)
    return exe


def run_mergekit(exe: Path, inputs: list[Path], weights: list[float], out: Path, workdir: Path) -> dict:
    models = "\n".join(f"  - model: {p}\n    parameters:\n      weight: {w!r}" for p, w in zip(inputs, weights))
    cfg = workdir / "mergekit.yml"
    cfg.write_text(f"merge_method: linear\nparameters:\n  normalize: true\ndtype: bfloat16\nmodels:\n{models}\n")
    return timed([str(exe), str(cfg), str(out), "--no-copy-tokenizer", "--quiet"])


def mergekit_version(venv: Path) -> str:
    res = subprocess.run([str(venv / "bin" / "python"), "-c", ("import importlib.metadata as m;"
                          "print(m.version('mergekit'), m.version('torch'))")], check=False, capture_output=True, text=True)
    return res.stdout.strip()


# ------------------------------------------------------------------ exactness


def reference_bf16(x):
    """float64 -> bfloat16, one rounding to nearest-even, on the integer bits (an
    implementation independent of merit_core.merge.rounding; normal and subnormal
    results; inputs in the bfloat16 range)."""
    import torch

    bits = x.view(torch.int64)
    neg = bits < 0
    mag = bits & 0x7FFFFFFFFFFFFFFF
    e = (mag >> 52) - 1023
    m = (mag & ((1 << 52) - 1)) | (1 << 52)
    q = torch.clamp(e, min=-126) - 7  # exponent of one bfloat16 step at x
    shift = torch.clamp(q - (e - 52), max=62)
    keep = m >> shift
    rem = m & ((1 << shift) - 1)
    half = 1 << (shift - 1)
    keep = keep + ((rem > half) | ((rem == half) & (keep & 1 == 1))).to(torch.int64)
    val = torch.ldexp(keep.to(torch.float64), q.to(torch.float64))
    val = torch.where(mag == 0, 0.0, val)
    return torch.where(neg, -val, val).to(torch.bfloat16)  # exact: val is a bfloat16 value


def compare(inputs: list[Path], weights: list[float], merit: Path, mergekit: Path | None) -> dict:
    """Per element: merit == reference, mergekit == reference, merit bytes == mergekit bytes."""
    import torch
    from safetensors import safe_open

    def weight_map(d: Path) -> dict[str, str]:
        idx = d / "model.safetensors.index.json"
        if idx.is_file():
            return json.loads(idx.read_text())["weight_map"]
        with safe_open(str(d / "model.safetensors"), "pt") as f:
            return dict.fromkeys(f.keys(), "model.safetensors")

    def opener(d: Path):
        wm = weight_map(d)
        return lambda n: safe_open(str(d / wm[n]), "pt")

    ins = [opener(d) for d in inputs]
    mo, ko = opener(merit), (opener(mergekit) if mergekit else None)
    counts = {"n": 0, "merit": 0, "mergekit": 0, "same": 0, "differ_where_mergekit_exact": 0}
    total = sum(weights)
    merged_names = weight_map(merit)
    for name, shape in tensor_shapes(args_shape).items():
        if name not in merged_names:
            continue
        step = max(1, (1 << 22) // (shape[1] if len(shape) > 1 else 1))
        for s in range(0, shape[0], step):
            acc = None
            for w, o in zip(weights, ins):
                with o(name) as f:
                    t = f.get_slice(name)[s:s + step].to(torch.float64) * w
                acc = t if acc is None else acc + t
            ref = reference_bf16((acc / total).contiguous()).view(torch.int16)
            with mo(name) as f:
                a = f.get_slice(name)[s:s + step].view(torch.int16)
            counts["n"] += ref.numel()
            counts["merit"] += int((a == ref).sum())
            if ko:
                with ko(name) as f:
                    b = f.get_slice(name)[s:s + step].view(torch.int16)
                counts["mergekit"] += int((b == ref).sum())
                counts["same"] += int((a == b).sum())
                counts["differ_where_mergekit_exact"] += int(((a != b) & (b == ref)).sum())
    return counts


args_shape = "qwen2.5-3b"  # set by main; used by compare()


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> None:
    global args_shape
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=list(SHAPES), default="qwen2.5-3b")
    ap.add_argument("--k", type=int, default=4, help="number of checkpoints")
    ap.add_argument("--weights", default=None, help="comma-separated token weights (default K:K-1:...:1)")
    ap.add_argument("--workdir", default=None, help="where to build (default: a temp dir next to /tmp), removed")
    ap.add_argument("--mergekit-venv", default="/tmp/mk-venv")
    ap.add_argument("--no-mergekit", action="store_true")
    ap.add_argument("--no-compare", action="store_true", help="skip the exactness check (debugging)")
    ap.add_argument("--markdown", default=None, help="append the results as markdown to this file")
    ap.add_argument("--inputs-dir", default=None,
                    help="build the inputs here and keep them for the next run (debugging; not cleaned up)")
    args = ap.parse_args(argv)
    args_shape = args.shape
    weights = [float(x) for x in args.weights.split(",")] if args.weights else [float(args.k - i) for i in range(args.k)]
    if len(weights) != args.k:
        sys.exit(f"{len(weights)} weights for K = {args.k}")
    size = checkpoint_bytes(args.shape)
    outputs = 1 + (0 if args.no_mergekit else 1)
    keep = Path(args.inputs_dir) if args.inputs_dir else None
    built = keep is not None and all((keep / f"branch{i}" / "config.json").is_file() for i in range(args.k))
    need = ((0 if built else args.k) + outputs) * size + GiB
    where = Path(args.workdir or tempfile.gettempdir())
    free = shutil.disk_usage(where).free
    print(f"{args.shape}: {size / GiB:.2f} GiB per checkpoint; K = {args.k} inputs + {outputs} outputs need "
          f"{need / GiB:.1f} GiB in {where} ({free / GiB:.1f} GiB free)", flush=True)
    if free < need:
        sys.exit("not enough free disk: refusing to start")
    mk = None if args.no_mergekit else ensure_mergekit(Path(args.mergekit_venv))
    root = Path(tempfile.mkdtemp(prefix="merge-scale-", dir=where))
    try:
        rows, counts = measure(args, weights, size, root, mk, keep)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report(args, weights, size, rows, counts, argv)


def measure(args, weights: list[float], size: int, root: Path, mk: Path | None, keep: Path | None):
    t0 = time.perf_counter()
    where = keep or root
    inputs = [where / f"branch{i}" for i in range(args.k)]
    if not all((d / "config.json").is_file() for d in inputs):
        shutil.rmtree(where, ignore_errors=True) if keep else None
        inputs = build_inputs(where, args.shape, args.k)
        print(f"built {args.k} checkpoints in {time.perf_counter() - t0:.0f} s", flush=True)
    rows = {}
    floor_out = root / "floor.bin"
    for name, mode in FLOORS.items():
        rows[name] = timed([sys.executable, "-c", FLOOR, str(floor_out), str(size), mode, *map(str, inputs)])
        floor_out.unlink()
        print(name, rows[name], flush=True)
    rows["merit merge"] = run_merit(inputs, weights, root / "merit-out")
    print("merit", rows["merit merge"], flush=True)
    if mk is not None:
        rows["mergekit linear"] = run_mergekit(mk, inputs, weights, root / "mergekit-out", root)
        print("mergekit", rows["mergekit linear"], flush=True)
    t0 = time.perf_counter()
    if args.no_compare:
        return rows, {"n": 1, "merit": 0, "mergekit": 0, "same": 0}
    counts = compare(inputs, weights, root / "merit-out", None if mk is None else root / "mergekit-out")
    print(f"compared in {time.perf_counter() - t0:.0f} s", flush=True)
    return rows, counts


def report(args, weights, size, rows, counts, argv) -> None:
    n = counts["n"]
    floor = min(rows[f]["wall"] for f in FLOORS)
    lscpu = subprocess.run(["lscpu"], check=False, capture_output=True, text=True).stdout
    cpu = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), "?")
    lines = [
        (f"{datetime.date.today()}, {args.shape}, K = {args.k}, weights {':'.join(f'{w:g}' for w in weights)}, "
        f"bf16, {size / GiB:.2f} GiB per checkpoint; {os.cpu_count()} CPUs ({cpu}), {platform.python_version()}"),
        "",
        "| | wall | × floor | peak RSS | load avg (1 min) before → after | elements = bf16(Σ w θ / Σ w, float64) |",
        "|---|---|---|---|---|---|",
    ]
    exact = {"merit merge": counts["merit"], "mergekit linear": counts["mergekit"]}
    for name, r in rows.items():
        ex = f"{exact[name] / n:.6%} ({n - exact[name]} differ)" if name in exact else "–"
        rss = "–" if name in FLOORS else f"{r['rss_gb']:.2f} GB"
        load = f"{r['load'][0]:.2f} → {r['load_after'][0]:.2f}"
        lines.append(f"| {name} | {r['wall']:.1f} s | {r['wall'] / floor:.2f} | {rss} | {load} | {ex} |")
    if "mergekit linear" in rows:
        lines += ["", (f"merit bytes equal mergekit's: {counts['same']} of {n} elements"
                      f" ({'identical' if counts['same'] == n else 'NOT identical'}); "
                      f"mergekit {mergekit_version(Path(args.mergekit_venv))} (version, torch)"),
                  (f"elements where merit differs from a correctly rounded mergekit value: "
                  f"{counts['differ_where_mergekit_exact']} (every other difference is one where "
                  f"mergekit's value is not the correctly rounded mean)")]
    notes = {r["note"] for r in rows.values() if r["note"]}
    lines += [f"note: {x}" for x in notes] or ["page cache dropped before each run"]
    given = argv if argv is not None else sys.argv[1:]
    lines += ["", "command: `python bench/merge_scale.py " + " ".join(shlex.quote(a) for a in given) + "`"]
    text = "\n".join(lines)
    print("\n" + text)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write("\n" + text + "\n")


if __name__ == "__main__":
    main()
