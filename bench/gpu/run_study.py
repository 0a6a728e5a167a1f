"""Run study seeds on a machine without Prefect (a lent GPU machine): the study protocol
of :mod:`merit_core.pipeline.study` with the bare :mod:`merit_core.pipeline` stage functions —
the same protocol and stages the ``merit-study`` flow runs as Prefect tasks.

The mixture and benchmarks were tokenized on the CPU by the same stages
(bench/gpu/prepare.py) and travel as store directories with manifests; here
``resolve_mixture`` / ``resolve_benchmarks`` return those manifests instead of reading
the task package (not installed on the device). Everything else — θ(0) from the GGUF, source
gradients, conflict matrix, PCA and random splits, branch training, merges, evaluation,
displacement — runs here.

    python bench/gpu/run_study.py configs/study-h200.yaml --bundle /tmp/merit-gpu \\
        --out "$OUT" [--first-seed N] [--set key=value ...]

Writes ``OUT/seeds/seed-<N>.json`` (the seed record; copy it into
bench/results/study-gpu/seeds/ and run ``merit study-report bench/results/study-gpu``)
and a report over this seed and every seed in ``--previous`` into ``--report-dir``
(default BUNDLE/report; OUT/report.md is a copy of its text).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def next_seed(results: Path) -> int:
    """The first seed index not yet in ``results/seeds/`` (seeds accumulate across sessions)."""
    done = [int(p.stem.split("-")[1]) for p in (results / "seeds").glob("seed-*.json")]
    return max(done) + 1 if done else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("--bundle", required=True, help="dir with model.gguf, prepared.json, store/ (run.sh unpacks it)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--first-seed", type=int, help="seed index (default: the next one after --previous)")
    ap.add_argument("--previous", default=str(ROOT / "bench/results/study-gpu"),
                    help="results folder whose finished seeds the report includes")
    ap.add_argument("--report-dir", help="where the combined report goes (default: BUNDLE/report)")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from merit_core.benchmarks import BenchmarkSuite
    from merit_core.config import load_config
    from merit_core.pipeline.study import (
        combine,
        plain_ops,
        read_records,
        run_study,
        write_record,
    )
    from merit_core.refs import MixtureRef
    from merit_core.report import write_study_report
    from merit_core.store import open_store
    from merit_core.study import check_study_config, seeds

    bundle, out, previous = Path(args.bundle), Path(args.out), Path(args.previous)
    os.environ.setdefault("MERIT_CACHE_DIR", str(bundle / "cache"))
    cfg = load_config(args.config, [f"model.source={bundle / 'model.gguf'}", f"store.uri={bundle / 'store'}",
                                    *args.overrides])
    check_study_config(cfg)
    prepared = json.loads((bundle / "prepared.json").read_text())
    mixture = MixtureRef.model_validate(prepared["mixture"])
    suite = BenchmarkSuite.model_validate(prepared["suite"])
    if [s.name for s in mixture.sources] != [s.name for s in cfg.data.sources]:
        raise SystemExit(f"{bundle / 'prepared.json'} was prepared for other sources than {args.config}: "
                         "run bench/gpu/prepare.py --config " + args.config)
    ops = dataclasses.replace(plain_ops(open_store(cfg.store)), resolve_mixture=lambda config, base: mixture,
                              resolve_benchmarks=lambda config, base: suite)
    first = args.first_seed if args.first_seed is not None else next_seed(previous)
    todo = seeds(cfg, first=first)
    t0 = time.perf_counter()
    run_study(cfg, ops, study_id=cfg.study.id or cfg.run.name, seeds=todo,
              on_seed=lambda record: print(f"seed record: {write_record(out, record)}", flush=True))
    print(f"study seeds {[s.index for s in todo]} finished in {time.perf_counter() - t0:.0f} s", flush=True)
    report = Path(args.report_dir) if args.report_dir else bundle / "report"
    (report / "seeds").mkdir(parents=True, exist_ok=True)
    for folder in (previous, out):
        for f in (folder / "seeds").glob("seed-*.json") if (folder / "seeds").is_dir() else []:
            shutil.copy(f, report / "seeds" / f.name)
    data = write_study_report(report, **combine(read_records(report), where=str(report)))
    shutil.copy(report / "report.md", out / "report.md")
    for c in data["summary"]["comparisons"]:
        if c["metric_key"] in ("bench_acc", "heldout_loss"):
            print(f"- {c['verdict']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
