"""Prepare, on the CPU, what a lent GPU machine needs to run merit (bench/gpu/README.md).

The device machine has torch, transformers, accelerate, safetensors, scikit-learn,
numpy, matplotlib, pyyaml and pytest, reaches no registry, and takes at most 64 MiB of
working tree per call. This writes ``.device-bundle/`` (git-ignored) in two parts, one
per call:

- ``call1/``: the wheels merit needs beyond the image (pydantic and its closure, gguf,
  DeepSpeed built here as a pure-Python wheel, hjson), the first half of the packaged
  SmolLM2 GGUF, and ``data.tar.gz``: the study mixture and benchmarks tokenized by the
  product's own stages (``resolve_mixture`` / ``resolve_benchmarks``) as store
  directories with manifests, their manifests as ``prepared.json``, and θ(0)'s config
  and tokenizer (for the throughput benchmark's random-weight model);
- ``call2/``: the second half of the GGUF.

Then it prints the size of each call — the working tree that travels (tracked and
untracked-not-ignored files) plus the carried folder — and fails if one exceeds 64 MiB.

    .venv/bin/python bench/gpu/prepare.py                 # writes .device-bundle/
    .venv/bin/python bench/gpu/prepare.py --dry-run       # same work in a temp dir; sizes only
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as md
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

LIMIT = 64 * 2**20
PART = 48 * 2**20  # GGUF part size: two parts of the 94 MiB file
DEVICE_PYTHON = "3.12"
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]

# What merit needs at run time that the device image lacks (device README, KINDS.md's
# package list of 2026-11-17): merit_core's imports are torch, transformers, safetensors,
# huggingface_hub, numpy, scikit-learn, scipy, matplotlib, pyyaml (all in the image),
# pydantic (not), gguf (for the GGUF θ(0)); DeepSpeed for the ZeRO tests needs hjson
# besides packages the image has (ninja, psutil, py-cpuinfo, msgpack, einops, nvidia-ml-py).
# Versions: those of this checkout's venv (pydantic stack, gguf), DeepSpeed pinned.
WHEELS = ["pydantic", "pydantic-core", "annotated-types", "typing-inspection", "gguf", "hjson"]
DEEPSPEED = "deepspeed==0.19.8"
IMAGE_HAS = {
    "torch", "transformers", "accelerate", "safetensors", "tokenizers", "huggingface-hub", "numpy", "scipy",
    "scikit-learn", "matplotlib", "pyyaml", "typing-extensions", "tqdm", "packaging", "psutil", "py-cpuinfo",
    "msgpack", "einops", "ninja", "nvidia-ml-py", "pytest", "jinja2", "sentencepiece", "requests", "filelock",
    "fsspec", "regex", "typer", "rich", "pillow",
}


def _norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def download_wheels(dest: Path) -> list[Path]:
    """cp312 manylinux wheels of WHEELS (this venv's versions) and a DeepSpeed wheel built here."""
    dest.mkdir(parents=True, exist_ok=True)
    pins = [f"{n}=={md.version(n)}" for n in WHEELS if _installed(n)] + [n for n in WHEELS if not _installed(n)]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           DEVICE_PYTHON, "--implementation", "cp", *sum((["--platform", p] for p in PLATFORMS), []), "-d",
           str(dest), *pins]
    subprocess.run(cmd, check=True)
    # DeepSpeed ships an sdist only; its ops are compiled just in time, so the wheel is pure Python.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(dest), DEEPSPEED], check=True, env={**__import__("os").environ, "DS_BUILD_OPS": "0"})
    wheels = sorted(dest.glob("*.whl"))
    _check_closure(wheels)
    return wheels


def _installed(name: str) -> bool:
    try:
        md.version(name)
        return True
    except md.PackageNotFoundError:
        return False


def _check_closure(wheels: list[Path]) -> None:
    """Every requirement of the carried wheels is carried or in the image (else exit)."""
    import zipfile

    carried = {_norm(w.name.split("-")[0]) for w in wheels}
    missing = set()
    for w in wheels:
        with zipfile.ZipFile(w) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            for line in z.read(meta).decode().splitlines():
                if line.startswith("Requires-Dist:") and "extra ==" not in line:
                    req = _norm(line.split(":", 1)[1].strip().split(";")[0].split("(")[0].split("[")[0]
                                .split(">")[0].split("<")[0].split("=")[0].split("!")[0].split("~")[0].strip())
                    if req not in carried and req not in IMAGE_HAS:
                        missing.add(f"{req} (needed by {w.name})")
    if missing:
        raise SystemExit("prepare: requirements neither carried nor in the device image: " + ", ".join(sorted(missing)))


def split_model(gguf: Path, parts: list[Path]) -> str:
    """Write ``gguf`` in len(parts) pieces of ≤ PART bytes; return the whole file's sha256."""
    h = hashlib.sha256()
    with gguf.open("rb") as f:
        for p in parts:
            p.parent.mkdir(parents=True, exist_ok=True)
            chunk = f.read(PART)
            h.update(chunk)
            p.write_bytes(chunk)
        if f.read(1):
            raise SystemExit(f"prepare: {gguf} is larger than {len(parts)} × {PART} bytes")
    return h.hexdigest()


def prepare_data(config: str, work: Path, out: Path) -> dict:
    """Resolve the config's mixture and benchmarks with the product's stages into a scratch
    store; pack their store directories, manifests and θ(0)'s config/tokenizer."""
    from merit_core.config import load_config
    from merit_core.pipeline.base import prepare_base
    from merit_core.pipeline.evaluate import resolve_benchmarks
    from merit_core.pipeline.mixture import resolve_mixture
    from merit_core.store import open_store

    cfg = load_config(config, [f"store.uri={work / 'store'}"])
    store = open_store(cfg.store)
    base = prepare_base(cfg, store)
    mixture = resolve_mixture(cfg, store, base)
    suite = resolve_benchmarks(cfg, store, base)
    base_dir = store.fetch_dir(base.key)
    (work / "prepared.json").write_text(json.dumps({
        "config": config, "mixture": mixture.model_dump(), "suite": suite.model_dump(),
        "tokenizer_base_sha256": base.sha256}))
    with tarfile.open(out, "w:gz") as tar:
        tar.add(work / "prepared.json", "prepared.json")
        for key in [s.key for s in mixture.sources] + [b.key for b in suite.benchmarks]:
            tar.add(store.fetch_dir(key), f"store/{key}")
        for f in sorted(base_dir.iterdir()):
            if f.is_file() and not f.name.endswith(".safetensors") and f.name != "manifest.json":
                tar.add(f, f"model-config/{f.name}")
    return {"sources": len(mixture.sources), "benchmarks": len(suite.benchmarks),
            "train_examples": sum(s.train for s in mixture.sources)}


def tree_size() -> int:
    """Bytes of the working tree that travels: tracked + untracked-not-ignored files."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         check=True, capture_output=True).stdout.decode()
    return sum((ROOT / p).stat().st_size for p in out.split("\0") if p and (ROOT / p).is_file())


def dir_size(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/study-h200.yaml", help="study config whose data travels")
    ap.add_argument("--out", default=str(ROOT / ".device-bundle"))
    ap.add_argument("--dry-run", action="store_true", help="build in a temporary dir and print the sizes only")
    args = ap.parse_args(argv)

    from merit_core.models import find_packaged_gguf

    with tempfile.TemporaryDirectory(prefix="merit-bundle-") as tmp:
        out = Path(tmp) / "bundle" if args.dry_run else Path(args.out)
        if out.exists():
            shutil.rmtree(out)
        c1, c2 = out / "call1", out / "call2"
        wheels = download_wheels(c1 / "wheels")
        gguf = find_packaged_gguf()
        sha = split_model(gguf, [c1 / "model.part1", c2 / "model.part2"])
        data = prepare_data(args.config, Path(tmp) / "data", c1 / "data.tar.gz")
        (c1 / "bundle.json").write_text(json.dumps({"gguf": gguf.name, "gguf_sha256": sha, "config": args.config,
                                                    "wheels": [w.name for w in wheels], **data}, indent=1))
        tree = tree_size()
        print(f"working tree that travels with every call: {tree / 2**20:.2f} MiB")
        print(f"wheels: {', '.join(w.name for w in wheels)}")
        print(f"data: {data['sources']} sources ({data['train_examples']} training examples), "
              f"{data['benchmarks']} benchmarks")
        ok = True
        for name, d in (("call 1 (carry .device-bundle/call1)", c1), ("call 2 (carry .device-bundle/call2)", c2)):
            parts = {p.name: dir_size(p) if p.is_dir() else p.stat().st_size for p in sorted(d.iterdir())}
            total = tree + sum(parts.values())
            ok &= total <= LIMIT
            print(f"{name}: {total / 2**20:.2f} MiB of 64 MiB "
                  f"({', '.join(f'{k} {v / 2**20:.2f}' for k, v in parts.items())}, tree {tree / 2**20:.2f})"
                  + ("" if total <= LIMIT else "  <-- OVER THE LIMIT"))
        if not args.dry_run:
            print(f"bundle written to {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
