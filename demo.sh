#!/usr/bin/env bash
set -euo pipefail
# The demo command: install kmsproxy-core into a virtual environment of its
# own (.venv-demo, beside this script) and run `kmsproxy demo`. The demo
# starts an mTLS server and the proxy on 127.0.0.1 and fetches a page
# through the proxy. It prints the client certificate subject the server
# received, then stops both. Nothing is installed outside .venv-demo, except
# python3-venv on a Debian machine whose python3 cannot create a virtual
# environment yet.

cd "$(dirname -- "${BASH_SOURCE[0]}")"

PYTHON=${PYTHON:-python3}
VENV=.venv-demo

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "error: kmsproxy needs Python 3.11 or newer; set PYTHON=python3.11" >&2
    exit 1
fi

# Debian's own python3 has no ensurepip until python3-venv is installed.
if ! "$PYTHON" -c 'import ensurepip' 2>/dev/null; then
    if [ "$(id -u)" -eq 0 ]; then
        sudo=()
    elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
        sudo=(sudo -n)
    else
        echo "error: $PYTHON cannot create a virtual environment;" \
            "install python3-venv (sudo apt-get install python3-venv) and rerun" >&2
        exit 1
    fi
    echo "==> apt-get install python3-venv"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -q update
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -q install -y \
        --no-install-recommends python3-venv
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "==> creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
echo "==> pip install ./packages/kmsproxy-core into $VENV"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    ./packages/kmsproxy-core
exec "$VENV/bin/python" -m kmsproxy demo
