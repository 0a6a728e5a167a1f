"""Benchmark merit_core.merge.merge_checkpoints: wall time and peak RSS for K inputs.

Builds K random float32 checkpoints shaped like a small Llama (embeddings, attention and
MLP projections, norms; config.json with the matching LlamaConfig) of about ``--size-mb``
each, in a temporary directory, in a separate process (so their creation does not count
towards this process's peak RSS); then merges them here and prints wall time, peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) and the RSS before the merge.

    python bench/merge_bench.py --size-mb 100 --k 4
    python bench/merge_bench.py --size-mb 400 --k 4 --shard-size 200MB
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import shlex
import sys
import tempfile
import time
from pathlib import Path

HIDDEN, INTER, VOCAB = 512, 1408, 8192


def llama_shapes(size_mb: float) -> tuple[int, dict[str, tuple[int, ...]]]:
    """Tensor names/shapes of a Llama with as many layers as fit in ``size_mb`` (float32)."""
    per_layer = 4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTER + 2 * HIDDEN
    fixed = VOCAB * HIDDEN + HIDDEN
    layers = max(1, round((size_mb * 2**20 / 4 - fixed) / per_layer))
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{n}.weight"] = (HIDDEN, HIDDEN)
        shapes[p + "mlp.gate_proj.weight"] = (INTER, HIDDEN)
        shapes[p + "mlp.up_proj.weight"] = (INTER, HIDDEN)
        shapes[p + "mlp.down_proj.weight"] = (HIDDEN, INTER)
        shapes[p + "input_layernorm.weight"] = (HIDDEN,)
        shapes[p + "post_attention_layernorm.weight"] = (HIDDEN,)
    return layers, shapes


def make_checkpoint(path: str, size_mb: float, seed: int, shard_size: str) -> None:
    """Write one random checkpoint tensor by tensor (runs in a child process)."""
    import torch

    from merit_core.merge.io import TensorInfo
    from merit_core.merge.shards import ShardWriter

    layers, shapes = llama_shapes(size_mb)
    out = Path(path)
    out.mkdir(parents=True)
    infos = {n: TensorInfo(s, torch.float32, "") for n, s in shapes.items()}
    writer = ShardWriter(out, infos, shard_size)
    g = torch.Generator().manual_seed(seed)
    for n, s in shapes.items():
        writer.add(n, torch.randn(s, generator=g) * 0.02)
    writer.close()
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": INTER, "num_hidden_layers": layers, "num_attention_heads": 8,
        "num_key_value_heads": 8, "vocab_size": VOCAB, "tie_word_embeddings": True,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "torch_dtype": "float32",
    }
    (out / "config.json").write_text(json.dumps(cfg, indent=2))


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=float, default=100, help="size of one input checkpoint (MiB, float32)")
    ap.add_argument("--k", type=int, default=4, help="number of inputs")
    ap.add_argument("--shard-size", default="2GB", help="max_shard_size of the merged output")
    ap.add_argument("--input-shard-size", default="2GB", help="max_shard_size of the generated inputs")
    ap.add_argument("--method", default="token_weighted")
    ap.add_argument("--workdir", default=None, help="where to build inputs (default: a temp dir, removed)")
    args = ap.parse_args(argv)

    import torch

    from merit_core.merge import merge_checkpoints

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="merge-bench-") as tmp:
        root = Path(tmp)
        ctx = mp.get_context("spawn")
        t0 = time.perf_counter()
        inputs = []
        for k in range(args.k + 1):  # the extra one is θ(0) for task-vector methods
            p = root / (f"branch{k}" if k < args.k else "base")
            proc = ctx.Process(target=make_checkpoint, args=(str(p), args.size_mb, k, args.input_shard_size))
            proc.start()
            proc.join()
            if proc.exitcode != 0:
                sys.exit(f"building {p} failed")
            inputs.append(p)
        base = inputs.pop()
        build_s = time.perf_counter() - t0

        rss_before = rss_mb()
        t0 = time.perf_counter()
        out = merge_checkpoints(
            inputs, [1000 * (k + 1) for k in range(args.k)], root / "merged", method=args.method,
            base=base, max_shard_size=args.shard_size,
        )
        wall = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        one = dir_bytes(inputs[0]) / 2**20
        n_shards = len(list(out.glob("*.safetensors")))

    given = argv if argv is not None else sys.argv[1:]
    cmd = "python bench/merge_bench.py " + " ".join(shlex.quote(a) for a in given)
    print(f"command:               {cmd}")
    print(f"method / K:            {args.method} / {args.k}  (inputs built in {build_s:.1f} s)")
    print(f"one checkpoint:        {one:.1f} MiB   (K x size = {args.k * one:.1f} MiB)")
    print(f"output shards:         {n_shards} (max_shard_size={args.shard_size})")
    print(f"merge wall time:       {wall:.2f} s   ({args.k * one / wall:.0f} MiB/s read)")
    print(f"RSS before merge:      {rss_before:.0f} MiB")
    print(f"peak RSS (ru_maxrss):  {peak:.0f} MiB   (peak - before = {peak - rss_before:.0f} MiB)")


if __name__ == "__main__":
    main()
