"""Wall time of the merge-readiness diagnostics (paper appendix B; eval.diagnostics) alone,
on the stored branches of a finished (or stopped after its merge) run of a config.

Reads θ(0), the mixture, the K MERIT branches, θ̄ and the joint model of ``RUN_ID`` from the
config's store, runs :func:`merit_core.pipeline.readiness.merge_readiness` with the given
number of LMC path points and held-out examples, and prints the wall time, the number of
forward passes (K·(points − 1) + 1 + 3, + 4 with a joint model), the seconds per pass, the
CPU, and the report section.

Run: .venv/bin/python bench/readiness_cost.py RUN_ID [--config configs/quick.yaml]
         [--points 3] [--examples 8]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from merit_core.config import load_config
from merit_core.pipeline.base import prepare_base
from merit_core.pipeline.branches import read_branch
from merit_core.pipeline.layout import branch_key, merged_key
from merit_core.pipeline.mixture import resolve_mixture
from merit_core.pipeline.readiness import merge_readiness, readiness_markdown
from merit_core.refs import ModelRef
from merit_core.store import open_store


def _cpu() -> str:
    flags = set()
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == (platform.processor() or "unknown CPU"):
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{model}, {os.cpu_count()} CPUs, {' '.join(isa) or 'no AVX2'}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_id")
    ap.add_argument("--config", default="configs/quick.yaml")
    ap.add_argument("--points", type=int, default=3, help="eval.lmc_points")
    ap.add_argument("--examples", type=int, default=8, help="eval.diagnostics_examples")
    args = ap.parse_args()
    cfg = load_config(args.config, [f"eval.lmc_points={args.points}", f"eval.diagnostics_examples={args.examples}",
                                    "eval.diagnostics=true"])
    store = open_store(cfg.store)
    base = prepare_base(cfg, store)
    mixture = resolve_mixture(cfg, store, base)
    k = 2 ** cfg.split.r
    branches = [read_branch(store, branch_key(args.run_id, "merit", i)) for i in range(k)]
    merged = ModelRef(key=merged_key(args.run_id, "merit"), uri="", label="merit")
    joint_key = branch_key(args.run_id, "joint", 0)
    joint = ModelRef(key=joint_key, uri="", label="joint") if store.is_complete(joint_key) else None
    t0 = time.perf_counter()
    d = merge_readiness(cfg, store, base, branches, merged, mixture, joint)
    wall = time.perf_counter() - t0
    passes = k * (args.points - 1) + 1 + 3 + (4 if joint else 0)
    print(readiness_markdown(d))
    print(f"\nK = {k}, lmc_points = {args.points}, examples = {d['examples']}: {passes} forward passes, "
          f"{wall:.1f} s wall ({wall / passes:.1f} s per pass, loading and contraction included); "
          f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}; {_cpu()}")
    print(f"reproduce: .venv/bin/python bench/readiness_cost.py {args.run_id} --config {args.config} "
          f"--points {args.points} --examples {args.examples}")


if __name__ == "__main__":
    main()
