#!/usr/bin/env bash
# Create (or update) the merit work pools on the Prefect server at $PREFECT_API_URL.
#
#   bash deployments/create-pools.sh            process pool only (CPU, nothing extra)
#   bash deployments/create-pools.sh --gpu      also the Docker and Kubernetes GPU pools
#
# Pool names match prefect.yaml: merit-process, merit-docker-gpu, merit-k8s-gpu.
# The GPU pools' base job templates (deployments/docker-gpu.json, deployments/k8s-gpu.json)
# request GPUs through the job variable `gpu_count` (default 1; override it per
# deployment in prefect.yaml or per run with --job-variable gpu_count=4).
set -euo pipefail
cd "$(dirname "$0")/.."
PREFECT=${PREFECT:-prefect}

"$PREFECT" work-pool create merit-process --type process --overwrite

if [ "${1:-}" = "--gpu" ]; then
  "$PREFECT" work-pool create merit-docker-gpu --type docker \
    --base-job-template deployments/docker-gpu.json --overwrite
  "$PREFECT" work-pool create merit-k8s-gpu --type kubernetes \
    --base-job-template deployments/k8s-gpu.json --overwrite
  echo "GPU workers need the worker packages: pip install prefect-docker prefect-kubernetes"
fi
