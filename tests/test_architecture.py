"""The architecture's rules, checked on the code (docs/architecture.md):

- the layers flows -> tasks -> merit_core, merit_core free of Prefect, and no import
  cycles between sibling modules: import-linter's contracts in pyproject.toml;
- merit_core works where Prefect cannot even be imported: every module imports, and the
  store and the merge run, in a subprocess whose ``import prefect`` raises;
- size limits: no merit_core module over 400 lines, no function over 60 lines (except
  the ones listed with their reason), flows/merit.py within 100 lines.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("merit_core", "tasks", "flows", "merit_cli")

# Functions allowed over 60 lines, and why.
LONG_FUNCTIONS = {
    ("flows/merit.py", "merit"): "Algorithm 1 of the paper, read top to bottom in one place",
    ("merit_core/pipeline/study.py", "run_study"): "the study protocol, read top to bottom in one place",
}


def _lint_imports() -> Path:
    exe = Path(sys.executable).parent / "lint-imports"
    if not exe.exists():
        pytest.fail(f"{exe} not found: import-linter is a dev dependency (pip install -e '.[dev]')")
    return exe


def test_import_linter_contracts_are_kept():
    """pyproject.toml [tool.importlinter]: layers, merit_core without prefect, no cycles."""
    res = subprocess.run([str(_lint_imports()), "--no-cache"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert "0 broken" in res.stdout and "3 kept" in res.stdout, res.stdout[-2000:]


def test_import_linter_catches_a_forbidden_import(tmp_path):
    """The contracts are live: a copy of the code where merit_core imports prefect breaks them."""
    import shutil

    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with open(tmp_path / "merit_core" / "precision.py", "a") as f:
        f.write("\nimport prefect  # noqa\n")
    res = subprocess.run([str(_lint_imports()), "--no-cache"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300, env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert res.returncode != 0
    assert "merit_core.precision -> prefect" in res.stdout, res.stdout[-2000:]


NO_PREFECT = textwrap.dedent("""
    import importlib, pkgutil, sys

    class NoPrefect:
        def find_spec(self, name, path=None, target=None):
            if name == "prefect" or name.startswith("prefect."):
                raise ImportError("prefect is blocked in this process")
            return None

    sys.meta_path.insert(0, NoPrefect())
    try:
        import prefect  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("the blocker did not work")

    import merit_core
    names = [m.name for m in pkgutil.walk_packages(merit_core.__path__, "merit_core.")]
    for name in names:
        importlib.import_module(name)
    print("imported", len(names))

    # the store and the merge, end to end, without Prefect
    from pathlib import Path
    import torch
    from safetensors.torch import load_file, save_file
    from merit_core.merge import merge_checkpoints
    from merit_core.store import open_store
    from merit_core.config import StoreConfig

    tmp = Path(sys.argv[1])
    store = open_store(StoreConfig(uri=str(tmp / "store")))
    ins = []
    for k, value in enumerate((1.0, 4.0)):
        d = tmp / f"branch{k}"
        d.mkdir()
        save_file({"w": torch.full((2, 3), value)}, str(d / "model.safetensors"))
        (d / "config.json").write_text("{}")
        store.commit_dir(f"branches/{k}", d)
        ins.append(store.fetch_dir(f"branches/{k}"))
    out = merge_checkpoints(ins, [1.0, 3.0], tmp / "merged")
    merged = load_file(str(out / "model.safetensors"))["w"]
    assert torch.allclose(merged, torch.full((2, 3), 0.25 * 1.0 + 0.75 * 4.0)), merged
    assert store.is_complete("branches/1") and not store.is_complete("branches/2")
    print("store and merge ok", float(merged[0, 0]))
    assert not any(m == "prefect" or m.startswith("prefect.") for m in sys.modules)
""")


def test_merit_core_works_without_prefect(tmp_path):
    res = subprocess.run([sys.executable, "-c", NO_PREFECT, str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    n = int(res.stdout.split("imported ")[1].split()[0])
    assert n == len(list((ROOT / "merit_core").rglob("*.py"))) - 1  # every module but merit_core/__init__
    assert "store and merge ok 3.25" in res.stdout


def _py_files(*packages: str):
    for pkg in packages:
        yield from sorted((ROOT / pkg).rglob("*.py"))


def test_module_sizes():
    too_long = {str(p.relative_to(ROOT)): n for p in _py_files("merit_core")
                if (n := len(p.read_text().splitlines())) > 400}
    assert not too_long, f"merit_core modules over 400 lines: {too_long}"
    assert len((ROOT / "flows" / "merit.py").read_text().splitlines()) <= 100


def test_function_sizes():
    found = {}
    for p in _py_files(*PACKAGES):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 60:
                    found[(p.relative_to(ROOT).as_posix(), node.name)] = lines
    unexplained = {k: v for k, v in found.items() if k not in LONG_FUNCTIONS}
    assert not unexplained, f"functions over 60 lines: {unexplained}"
    stale = set(LONG_FUNCTIONS) - set(found)
    assert not stale, f"LONG_FUNCTIONS lists functions that are no longer over 60 lines: {stale}"
