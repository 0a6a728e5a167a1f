#!/bin/sh
# pip install "$@" during an image build. PIP_* build args say where pip looks; when
# PIP_CERT_URL is set (scripts/build-images.sh: the CA bundle this machine's pip trusts,
# served on 127.0.0.1), it is fetched for this one command and removed afterwards, so no
# build-host certificate stays in the image.
set -eu
if [ -n "${PIP_CERT_URL:-}" ]; then
  python3 -c 'import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], "/tmp/pip-build-ca.pem")' "$PIP_CERT_URL"
  export PIP_CERT=/tmp/pip-build-ca.pem
fi
status=0
pip install "$@" || status=$?
rm -f /tmp/pip-build-ca.pem
exit "$status"
