#!/usr/bin/env bash
# On a lent GPU machine (python3 with torch, no network): install the wheels carried in .whl/
# (bench/gpu/prepare.sh made them here), then run bench/gpu/driver.py with these arguments.
# kdgraph itself runs from the tree (PYTHONPATH): nothing is built there.
#   device run: carry [".whl", ".gpu"], command: bash bench/gpu/run.sh [--parts ...]
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
SITE=/tmp/kdgraph-site
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
        || { echo "installing the carried wheels failed" >&2; exit 3; }
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PY" bench/gpu/driver.py "$@"
