"""Training throughput of one MERIT branch on any device: tokens/s, model FLOPs
utilisation, peak memory — through the product's own branch trainer
(:func:`merit_core.train.train_branch`: transformers Trainer, bf16 autocast, packed
batches), not a hand-written loop.

    # CPU, the demo's model and mixture (resolved into ./merit-store first):
    .venv/bin/python bench/train_throughput.py --config configs/demo.yaml --batch-size 8 --steps 12
    # GPU, packed vs padded, the study mixture:
    python bench/train_throughput.py --config configs/study-h200.yaml --compare-padding
    # any device, SmolLM2-135M's shape with random weights and tokenized examples from a store:
    python bench/train_throughput.py --model DIR --random-init --examples STORE/data

Timing: the first ``--warmup`` optimizer steps are excluded; the next ``--steps`` are
timed step by step (with ``torch.cuda.synchronize`` on CUDA). Tokens are example tokens
(padding excluded) counted by the branch's batch collator. MFU = 6 · N · tokens/s / peak,
N = the model's parameters (tied embeddings once), the peak as printed: the datasheet's
dense bf16 rate for known GPUs, on a CPU the measured rate of a large matrix product in
the training precision (``--peak-tflops`` overrides both).

Prints one table and the command that reproduces it; ``--json FILE`` also writes the
figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from merit_core.config import TrainConfig  # noqa: E402
from merit_core.refs import read_examples  # noqa: E402

# Dense bf16 tensor-core peak (no sparsity), vendors' datasheets, TFLOP/s.
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0}


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("model name")),
                 platform.processor() or "cpu")
    bf16 = "AVX512-BF16" if "avx512_bf16" in flags else ("AMX" if "amx_bf16" in flags else "no native bf16")
    return f"{model} ({torch.get_num_threads()} threads, {bf16})"


def peak_tflops(bf16: bool, override: float | None) -> tuple[float, str]:
    """(peak TFLOP/s, where it comes from)."""
    if override:
        return override, "--peak-tflops"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        for key, value in GPU_PEAK_TFLOPS.items():
            if key in name:
                return value, f"{key} datasheet, dense bf16"
        raise SystemExit(f"no datasheet peak known for {name}; pass --peak-tflops")
    dtype = torch.bfloat16 if bf16 else torch.float32
    n = 2048
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t0 = time.perf_counter()
    reps = 5
    for _ in range(reps):
        a @ b
    rate = 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12
    return rate, f"measured {n}³ {str(dtype).removeprefix('torch.')} matmul on this CPU"


def load_examples(paths: list[str]) -> list:
    """Tokenized examples from JSONL files or directories (every ``train.jsonl`` below)."""
    out = []
    for p in map(Path, paths):
        files = sorted(p.rglob("train.jsonl")) if p.is_dir() else [p]
        for f in files:
            out += read_examples(f)
    if not out:
        raise SystemExit(f"no tokenized examples under {paths}")
    return out


def from_config(config: str, store: str | None, overrides: list[str]) -> tuple[str, list]:
    """θ(0) dir and the mixture's training examples of a MERIT config (resolved into the store)."""
    from merit_core.config import load_config
    from merit_core.pipeline.base import prepare_base
    from merit_core.pipeline.mixture import load_split, resolve_mixture
    from merit_core.store import open_store

    cfg = load_config(config, overrides + ([f"store.uri={store}"] if store else []))
    st = open_store(cfg.store)
    base = prepare_base(cfg, st)
    mixture = resolve_mixture(cfg, st, base)
    examples = [e for s in mixture.sources for e in load_split(st, s, "train")]
    return str(st.fetch_dir(base.key)), examples


def random_init_copy(model_dir: str, work: Path) -> str:
    """A copy of ``model_dir``'s config and tokenizer with freshly initialised weights
    (throughput does not depend on the weights' values)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    out = work / "random-init"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return str(out)


def n_params(model_dir: str) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(p.numel() for p in model.parameters())  # tied weights are one parameter


def measure(model_dir: str, examples: list, cfg: TrainConfig, warmup: int, steps: int, work: Path) -> dict:
    """Train ``warmup + steps`` optimizer steps through ``train_branch``; time the last ``steps``."""
    from transformers import TrainerCallback

    from merit_core.train import train_branch

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    marks: list[tuple[float, int, int]] = []

    class StepTimer(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):  # noqa: D401 - HF signature
            sync()
            coll = kw["train_dataloader"].collate_fn
            marks.append((time.perf_counter(), coll.real_positions, coll.total_positions))

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    run_cfg = cfg.model_copy(update={"max_steps": warmup + steps, "save_steps": 10**9, "logging_steps": 10**9})
    res = train_branch(model_dir, examples, work / f"out-{int(cfg.packing)}", run_cfg,
                       checkpoint_dir=work / f"ck-{int(cfg.packing)}", resume=False, callbacks=[StepTimer()])
    if len(marks) < warmup + max(steps, 1):
        raise SystemExit(f"only {len(marks)} steps ran; need more examples for {warmup + steps} steps")
    t = [m[0] for m in marks[warmup - 1:]] if warmup else [m[0] for m in marks]
    dt = [b - a for a, b in zip(t, t[1:])]
    first, last = marks[warmup - 1] if warmup else marks[0], marks[-1]
    wall = last[0] - first[0]
    tokens, positions = last[1] - first[1], last[2] - first[2]
    peak_mem = torch.cuda.max_memory_allocated() / 2**30 if cuda else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {
        "packing": res.packed, "timed_steps": len(dt), "step_s_median": statistics.median(dt),
        "tokens_per_s": tokens / wall, "positions_per_s": positions / wall,
        "tokens_per_step": tokens / len(dt), "real_token_fraction": tokens / positions if positions else math.nan,
        "peak_memory_gib": peak_mem, "peak_memory_kind": "torch.cuda.max_memory_allocated" if cuda
        else "process max RSS",
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_argument_group("model and data")
    src.add_argument("--config", help="MERIT config: its model.source and mixture (resolved into --store)")
    src.add_argument("--store", help="artifact store for --config (default: the config's store.uri)")
    src.add_argument("--set", dest="overrides", action="append", default=[], help="config override key.path=value")
    src.add_argument("--model", help="HF model dir (instead of the config's model)")
    src.add_argument("--random-init", action="store_true", help="random weights of --model's shape")
    src.add_argument("--examples", nargs="+", help="tokenized examples: JSONL files or store dirs (train.jsonl)")
    tr = ap.add_argument_group("training")
    tr.add_argument("--batch-size", type=int, default=32)
    tr.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    tr.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps first")
    tr.add_argument("--pack-tokens", type=int, default=2048)
    tr.add_argument("--no-packing", action="store_true")
    tr.add_argument("--compare-padding", action="store_true", help="run packed and padded batches")
    tr.add_argument("--no-bf16", action="store_true")
    tr.add_argument("--no-group-by-length", action="store_true",
                    help="random batches instead of the product's default length-grouped ones")
    tr.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--peak-tflops", type=float, help="the device's peak (default: datasheet / measured)")
    ap.add_argument("--json", help="write the figures to this file")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="merit-throughput-") as tmp:
        work = Path(tmp)
        if args.config:
            model_dir, examples = from_config(args.config, args.store, args.overrides)
        else:
            if not (args.model and args.examples):
                ap.error("give --config, or --model and --examples")
            model_dir, examples = args.model, []
        if args.model:
            model_dir = args.model
        if args.examples:
            examples = load_examples(args.examples)
        if args.random_init:
            model_dir = random_init_copy(model_dir, work)
        bf16 = not args.no_bf16
        cfg = TrainConfig(learning_rate=args.lr, batch_size=args.batch_size, bf16=bf16, packing=not args.no_packing,
                          pack_tokens=args.pack_tokens, group_by_length=not args.no_group_by_length,
                          warmup_ratio=0.0)
        modes = [cfg, cfg.model_copy(update={"packing": False})] if args.compare_padding else [cfg]
        n = n_params(model_dir)
        peak, peak_src = peak_tflops(bf16, args.peak_tflops)
        runs = []
        for c in modes:
            r = measure(model_dir, examples, c, args.warmup, args.steps, work)
            r["mfu"] = 6 * n * r["tokens_per_s"] / (peak * 1e12)
            runs.append(r)
    out = {
        "device": device_name(), "torch": torch.__version__, "params": n, "batch_size": args.batch_size,
        "pack_tokens": args.pack_tokens, "bf16": bf16, "examples": len(examples),
        "mean_example_tokens": statistics.mean(len(e.input_ids) for e in examples),
        "peak_tflops": peak, "peak_source": peak_src, "runs": runs,
        "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__)] + (argv or sys.argv[1:])),
    }
    print(f"device: {out['device']}; torch {out['torch']}; {n / 1e6:.1f} M parameters; batch {args.batch_size} "
          f"examples ({out['mean_example_tokens']:.0f} tokens on average); bf16 {'on' if bf16 else 'off'}")
    print(f"peak: {peak:.1f} TFLOP/s ({peak_src})")
    print("| batches | tokens/s | MFU | real tokens | median step s | peak memory GiB |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in runs:
        kind = f"packed (rows ≤ {args.pack_tokens})" if r["packing"] else "padded"
        print(f"| {kind} | {r['tokens_per_s']:,.0f} | {r['mfu']:.1%} | {r['real_token_fraction']:.1%} | "
              f"{r['step_s_median']:.3f} | {r['peak_memory_gib']:.2f} ({r['peak_memory_kind']}) |")
    print(f"reproduce: {out['command']}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
