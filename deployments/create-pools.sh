#!/usr/bin/env bash
# Create (or update) the merit work pools on the Prefect server at $PREFECT_API_URL.
#
#   bash deployments/create-pools.sh            process pool only (CPU, nothing extra)
#   bash deployments/create-pools.sh --gpu      also the Docker and Kubernetes GPU pools
#   bash deployments/create-pools.sh --docker   also the Docker CPU pool (images/Dockerfile.cpu)
#
# Pool names match prefect.yaml: merit-process, merit-docker-cpu, merit-docker-gpu, merit-k8s-gpu.
# deployments/docker-cpu.json: prefect-docker's default template with image merit-cpu:latest
# and network_mode host; image, network_mode, volumes and env are its job variables.
# The GPU pools' base job templates (deployments/docker-gpu.json, deployments/k8s-gpu.json)
# request GPUs through the job variable `gpu_count` (default 1; override it per
# deployment in prefect.yaml or per run with --job-variable gpu_count=4).
#
# Pool concurrency limits (flow runs Pending or Running in the pool, over all its workers;
# later runs wait in Scheduled). Override by environment variable; `none` clears a limit:
#
#   MERIT_PROCESS_POOL_LIMIT=4      merit/full parents + merit-branch/process branches on the
#                                   CPU workers. A waiting parent holds one slot, so this must
#                                   be >= 2 (1 would wait forever); 4 = one parent + 3 branches,
#                                   the README's `prefect worker start ... --limit 4`
#   MERIT_DOCKER_CPU_POOL_LIMIT=2   CPU branch containers at once on the Docker host
#   MERIT_DOCKER_GPU_POOL_LIMIT=8   GPU branch containers at once (8 = K of configs/full.yaml);
#                                   set it to the GPUs you have / gpu_count per branch
#   MERIT_K8S_GPU_POOL_LIMIT=8      GPU branch Jobs at once, same reasoning
set -euo pipefail
cd "$(dirname "$0")/.."
PREFECT=${PREFECT:-prefect}

PROCESS_LIMIT=${MERIT_PROCESS_POOL_LIMIT:-4}
DOCKER_CPU_LIMIT=${MERIT_DOCKER_CPU_POOL_LIMIT:-2}
DOCKER_GPU_LIMIT=${MERIT_DOCKER_GPU_POOL_LIMIT:-8}
K8S_GPU_LIMIT=${MERIT_K8S_GPU_POOL_LIMIT:-8}

check_limit() {  # NAME VALUE MIN
  if [ "$2" != none ] && ! { [[ "$2" =~ ^[0-9]+$ ]] && [ "$2" -ge "$3" ]; }; then
    echo "error: $1=$2: expected an integer >= $3, or 'none' for no limit" >&2
    exit 2
  fi
}
check_limit MERIT_PROCESS_POOL_LIMIT "$PROCESS_LIMIT" 2
check_limit MERIT_DOCKER_CPU_POOL_LIMIT "$DOCKER_CPU_LIMIT" 1
check_limit MERIT_DOCKER_GPU_POOL_LIMIT "$DOCKER_GPU_LIMIT" 1
check_limit MERIT_K8S_GPU_POOL_LIMIT "$K8S_GPU_LIMIT" 1

set_limit() {  # POOL VALUE
  if [ "$2" = none ]; then
    "$PREFECT" work-pool clear-concurrency-limit "$1"
  else
    "$PREFECT" work-pool set-concurrency-limit "$1" "$2"
  fi
}

"$PREFECT" work-pool create merit-process --type process --overwrite
set_limit merit-process "$PROCESS_LIMIT"

if [ "${1:-}" = "--docker" ]; then
  "$PREFECT" work-pool create merit-docker-cpu --type docker \
    --base-job-template deployments/docker-cpu.json --overwrite
  set_limit merit-docker-cpu "$DOCKER_CPU_LIMIT"
  echo "The Docker worker needs prefect-docker: pip install -e '.[docker]'"
fi

if [ "${1:-}" = "--gpu" ]; then
  "$PREFECT" work-pool create merit-docker-gpu --type docker \
    --base-job-template deployments/docker-gpu.json --overwrite
  set_limit merit-docker-gpu "$DOCKER_GPU_LIMIT"
  "$PREFECT" work-pool create merit-k8s-gpu --type kubernetes \
    --base-job-template deployments/k8s-gpu.json --overwrite
  set_limit merit-k8s-gpu "$K8S_GPU_LIMIT"
  echo "GPU workers need the worker packages: pip install prefect-docker prefect-kubernetes"
fi
