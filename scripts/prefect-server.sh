#!/usr/bin/env bash
# Start a Prefect server whose UI works on any host and port.
#
#   bash scripts/prefect-server.sh                          http://127.0.0.1:4200 (this machine)
#   bash scripts/prefect-server.sh --port 4300              http://127.0.0.1:4300
#   bash scripts/prefect-server.sh --host 0.0.0.0           all interfaces; browsers and workers
#                                                           use http://<this host's IP>:4200
#   bash scripts/prefect-server.sh --host 0.0.0.0 --public-url https://prefect.example.com
#                                                           behind a proxy / DNS name / tunnel
#   bash scripts/prefect-server.sh --port 4300 -- --background   extra args go to `prefect server start`
#
# Why: the UI in the browser asks the server for its API address (/ui-settings) and calls
# that. Prefect takes it from PREFECT_UI_API_URL, else PREFECT_API_URL, else
# http://$PREFECT_SERVER_API_HOST:$PREFECT_SERVER_API_PORT/api (default
# 127.0.0.1:4200) -- never from the --host/--port flags. So `prefect server start --port
# 4300` serves a UI that calls 127.0.0.1:4200 ("Something went wrong", no deployments),
# and `--host 0.0.0.0` serves one that calls 127.0.0.1 on the browser's own machine.
# This script sets PREFECT_SERVER_API_HOST/PORT, PREFECT_UI_API_URL=<public URL>/api and
# PREFECT_UI_URL=<public URL>, prints the line every client machine needs
# (export PREFECT_API_URL=<public URL>/api) and execs `prefect server start`.
#
# Environment: PREFECT (the prefect command, default `prefect`), PREFECT_HOME (database and
# settings, default ~/.prefect), PREFECT_API_DATABASE_CONNECTION_URL (PostgreSQL).
set -euo pipefail

HOST=${PREFECT_SERVER_API_HOST:-127.0.0.1}
PORT=${PREFECT_SERVER_API_PORT:-4200}
PUBLIC_URL=""
PREFECT=${PREFECT:-prefect}

usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case "$1" in
    --host) HOST=${2:?--host needs a value}; shift 2 ;;
    --port) PORT=${2:?--port needs a value}; shift 2 ;;
    --public-url) PUBLIC_URL=${2:?--public-url needs a value}; shift 2 ;;
    --host=*) HOST=${1#*=}; shift ;;
    --port=*) PORT=${1#*=}; shift ;;
    --public-url=*) PUBLIC_URL=${1#*=}; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "error: unknown argument $1 (extra arguments for prefect server start go after --)" >&2; usage >&2; exit 2 ;;
  esac
done

if ! [[ "$PORT" =~ ^[0-9]+$ ]]; then
  echo "error: --port $PORT is not a number" >&2
  exit 2
fi

if [ -z "$PUBLIC_URL" ]; then
  case "$HOST" in
    0.0.0.0|::|"[::]")
      # listening everywhere: the address other machines reach this one at
      ADDR=$(hostname -I 2>/dev/null | awk '{print $1}' || true)
      ADDR=${ADDR:-$(hostname)}
      ;;
    *:*) ADDR="[$HOST]" ;;  # an IPv6 literal
    *) ADDR=$HOST ;;
  esac
  PUBLIC_URL="http://$ADDR:$PORT"
fi
PUBLIC_URL=${PUBLIC_URL%/}

export PREFECT_SERVER_API_HOST=$HOST
export PREFECT_SERVER_API_PORT=$PORT
export PREFECT_UI_API_URL=$PUBLIC_URL/api
export PREFECT_UI_URL=$PUBLIC_URL

cat <<EOF
merit: Prefect server on $HOST:$PORT
  UI (browser):   $PUBLIC_URL
  UI calls API:   $PREFECT_UI_API_URL
  on every machine that runs workers, deploys or runs flows:
export PREFECT_API_URL=$PUBLIC_URL/api
(another address in a browser? pass --public-url URL)
EOF

exec "$PREFECT" server start --host "$HOST" --port "$PORT" "$@"
