"""Short joint-training runs at several learning rates: does joint training on a study's
mixture keep θ(0)'s accuracy on the out-of-mixture benchmarks? (issue: a study should
test the method, not forgetting.)

For each ``--lr`` it trains joint training (K = 1) through the product's stages
(``merit_core.pipeline.branches.train_branch``, the study's train settings) on ``--per-source`` training
examples of every source, with ``--batch-size`` chosen so the run takes as many optimizer
steps as the study's joint model does (the same number of updates, fewer tokens), then
evaluates θ(0) and every model on the first ``--benchmark-examples`` examples of each
benchmark (``merit_core.pipeline.evaluate.evaluate_benchmarks``: option log-likelihood accuracy).

    .venv/bin/python bench/lr_probe.py configs/study-h200.yaml --lr 2e-5 --lr 5e-5 --lr 1e-4

Prints a table (benchmark average, its difference to θ(0) with a 95% t interval over the
benchmarks, and how many benchmarks each model is ahead / behind on) and the command; ``--json`` writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("--lr", type=float, action="append", required=True)
    ap.add_argument("--per-source", type=int, default=8, help="training examples per source")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--benchmark-examples", type=int, default=24)
    ap.add_argument("--store", default="./merit-store")
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    from merit_core.benchmarks import average, score
    from merit_core.config import load_config
    from merit_core.pipeline.base import prepare_base
    from merit_core.pipeline.branches import train_branch
    from merit_core.pipeline.evaluate import evaluate_benchmarks, resolve_benchmarks
    from merit_core.pipeline.mixture import resolve_mixture
    from merit_core.stats import mean_std, t_interval
    from merit_core.store import open_store

    cfg = load_config(args.config, [f"store.uri={args.store}", f"eval.benchmark_max_examples={args.benchmark_examples}",
                                    f"train.batch_size={args.batch_size}", "train.threads=null"])
    held = cfg.data.heldout_max or cfg.data.heldout_min
    sources = [s.model_copy(update={"max_examples": held + args.per_source}) for s in cfg.data.sources]
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"sources": sources})})
    store = open_store(cfg.store)
    base = prepare_base(cfg, store)
    mixture = resolve_mixture(cfg, store, base)
    suite = resolve_benchmarks(cfg, store, base)

    def bench(model) -> dict:
        t0 = time.perf_counter()
        table = evaluate_benchmarks(cfg, store, model, suite)
        print(f"benchmarks of {model.label}: {time.perf_counter() - t0:.0f} s", flush=True)
        return table

    rows = [{"label": "base", "lr": None, "table": bench(base.model_copy(update={"label": "base"}))}]
    for lr in args.lr:
        c = cfg.model_copy(update={"train": cfg.train.model_copy(update={"learning_rate": lr})})
        run_id = f"lr-probe-{lr:g}-b{args.batch_size}-n{args.per_source}"
        t0 = time.perf_counter()
        (branch,) = [train_branch(c, store, base, mixture, mixture.names, run_id, "joint", 0)]
        wall = time.perf_counter() - t0
        from merit_core.refs import ModelRef

        model = ModelRef(key=branch.key, uri=branch.uri, label=f"joint lr {lr:g}")
        rows.append({"label": model.label, "lr": lr, "steps": branch.steps, "train_loss": branch.train_loss,
                     "train_wall_s": wall, "table": bench(model)})

    def per_example(table) -> list[float]:
        return [score(r) for r in table["rows"]]

    base_scores = per_example(rows[0]["table"])
    print(f"\n{len(mixture.sources)} sources × {args.per_source} training examples, batch {args.batch_size}; "
          f"{len(suite.benchmarks)} benchmarks × ≤ {args.benchmark_examples} examples")
    print("| model | steps | train loss | benchmark avg | − θ(0) | 95% interval over benchmarks | ahead / behind |")
    print("|---|---:|---:|---:|---:|---|---|")
    for r in rows:
        avg = average(r["table"], score)
        r["bench_avg"] = avg
        if r["lr"] is None:
            print(f"| θ(0) | – | – | {avg:.3f} | – | – | – |")
            continue
        d = [a - b for a, b in zip(per_example(r["table"]), base_scores)]
        lo, hi = t_interval(d)
        r["diff"], r["ci"] = mean_std(d)[0], [lo, hi]
        ahead, behind = sum(x > 0 for x in d), sum(x < 0 for x in d)
        print(f"| {r['label']} | {r['steps']} | {r['train_loss']:.3f} | {avg:.3f} | {r['diff']:+.3f} | "
              f"[{lo:+.3f}, {hi:+.3f}] | {ahead} / {behind} |")
    cmd = "python " + " ".join(shlex.quote(a) for a in ["bench/lr_probe.py"] + (argv or sys.argv[1:]))
    print(f"reproduce: {cmd}")
    if args.json:
        Path(args.json).write_text(json.dumps({"command": cmd, "rows": rows}, indent=1, default=str))
    return 0 if all(not math.isnan(r["bench_avg"]) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
