#!/usr/bin/env bash
# Make a Docker engine answer on this machine, for the Docker tier (tests/test_docker.py,
# marker `docker`) and scripts/build-images.sh.
#
#   bash scripts/docker-engine.sh          install (apt) and start dockerd if none answers
#   bash scripts/docker-engine.sh --stop   stop the dockerd this script started
#
# If `docker info` already answers, nothing is done. Otherwise, as root: apt-get install
# docker.io and debootstrap when missing, start `dockerd` in the background (log:
# $DOCKERD_LOG, default /var/log/merit-dockerd.log; pid in /run/merit-dockerd.pid), wait
# until it answers; if the default storage driver (overlay2) fails, retry once with
# `--storage-driver vfs` (slower, works on any file system). Exit 2 with the reason when
# no engine can be had (not root, no apt, dockerd fails); the Docker tests then skip and
# say why.
set -euo pipefail
LOG=${DOCKERD_LOG:-/var/log/merit-dockerd.log}
PIDFILE=/run/merit-dockerd.pid

if [ "${1:-}" = "--stop" ]; then
  if [ -f "$PIDFILE" ]; then kill "$(cat "$PIDFILE")" && rm -f "$PIDFILE" && echo "docker-engine: dockerd stopped"; fi
  exit 0
fi

answers() { docker info --format '{{.ServerVersion}} {{.Driver}}' 2>/dev/null; }
if v=$(answers); then echo "docker-engine: engine answers ($v)"; exit 0; fi
if [ "$(id -u)" != 0 ]; then echo "docker-engine: no engine answers and not root: cannot start dockerd" >&2; exit 2; fi

T0=$SECONDS
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
  command -v apt-get >/dev/null || { echo "docker-engine: no apt-get to install ${missing[*]}" >&2; exit 2; }
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
  echo "docker-engine: installed ${missing[*]} in $((SECONDS - T0)) s"
fi

start() {  # extra dockerd args
  dockerd "$@" >>"$LOG" 2>&1 &
  echo $! >"$PIDFILE"
  for _ in $(seq 60); do
    if v=$(answers); then echo "docker-engine: dockerd${*:+ $*} answers ($v) after $((SECONDS - T0)) s; log $LOG"; return 0; fi
    kill -0 "$(cat "$PIDFILE")" 2>/dev/null || break
    sleep 0.5
  done
  kill "$(cat "$PIDFILE")" 2>/dev/null || true
  rm -f "$PIDFILE"
  return 1
}
start || start --storage-driver vfs || { echo "docker-engine: dockerd did not start; see $LOG" >&2; exit 2; }
