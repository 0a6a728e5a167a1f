"""Behaviour fingerprint of the pipeline on a tiny config (refactoring check).

Runs one seed of the study protocol without Prefect (``merit_core.pipeline.study``
with the bare stages) on a tiny random Llama and four synthetic JSONL sources, then
prints a JSON object: the sha256 of every model's weights in the store (branches,
joint, merged), the split, and the
report numbers (held-out losses, benchmark scores, trained tokens, displacement).
Two commits that behave the same print the same object:

    .venv/bin/python scripts/behaviour_fingerprint.py > before.json
    ...refactor...
    .venv/bin/python scripts/behaviour_fingerprint.py > after.json && diff before.json after.json

Takes about a minute on 2 CPU cores. Everything is written under a temporary directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _weights_sha(model_dir: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(model_dir.glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()


def _round(x):
    if isinstance(x, float):
        return round(x, 6)
    if isinstance(x, dict):
        return {k: _round(v) for k, v in sorted(x.items())}
    if isinstance(x, list):
        return [_round(v) for v in x]
    return x


def main() -> int:
    import torch

    from merit_core.config import MeritConfig
    from merit_core.pipeline.study import plain_ops, run_study
    from merit_core.store import open_store
    from merit_core.study import seeds
    from tests.conftest import build_tiny_llama, build_tiny_tokenizer
    from tests.helpers import write_jsonl_sources

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["MERIT_CACHE_DIR"] = str(tmp / "cache")
        tok = build_tiny_tokenizer()
        model = build_tiny_llama(len(tok))
        model.save_pretrained(tmp / "base")
        tok.save_pretrained(tmp / "base")
        bench = write_jsonl_sources(tmp / "bench", ["short_answer"], n=6)
        cfg = MeritConfig.model_validate({
            "run": {"name": "fingerprint"},
            "model": {"source": str(tmp / "base")},
            "data": {"sources": write_jsonl_sources(tmp / "data", ["alpha", "beta", "gamma", "delta"], n=16),
                     "max_length": 64, "heldout_min": 4, "heldout_max": 4},
            "conflict": {"calibration_size": 8, "sketch_dim": 512},
            "split": {"r": 1},
            "train": {"learning_rate": 1e-3, "batch_size": 8, "save_steps": 100, "logging_steps": 100, "threads": 1},
            "eval": {"batch_size": 8, "max_examples_per_source": 4, "max_new_tokens": 2,
                     "benchmark_max_examples": 4, "benchmarks": bench},
            "study": {"id": "fingerprint"},
            "store": {"uri": str(tmp / "store")},
        })
        with contextlib.redirect_stdout(sys.stderr):  # the Trainer prints its logs to stdout
            (record,) = run_study(cfg, plain_ops(open_store(cfg.store)), study_id="fingerprint", seeds=seeds(cfg, 1, first=0))
        weights = {}  # every model directory in the store: branches, joint, merged models
        for d in sorted({f.parent for f in (tmp / "store").rglob("*.safetensors")}):
            weights[d.relative_to(tmp / "store").as_posix()] = _weights_sha(d)
        out = {
            "weights_sha256": weights,
            "results": {r.label: _round({"heldout": r.heldout, "benchmarks": r.benchmarks,
                                         "trained_tokens": r.trained_tokens, "displacement": r.displacement})
                        for r in record.results},
        }
        print(json.dumps(out, indent=1, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
