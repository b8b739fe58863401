#!/usr/bin/env bash
# Creates (once) the AirLLM venv the side-by-side benchmark runs AirLLM in, with the exact pins of
# benches/airllm/requirements.txt, and prints its python on stdout.
#
#   benches/airllm/setup_venv.sh            # -> /home/me/.cache/rabbitllm/venv-airllm-4.0.0/bin/python
#
# Location: $AIRLLM_VENV, default ${RABBIT_CACHE:-~/.cache/rabbitllm}/venv-airllm-4.0.0. A venv with
# the marker file .airllm-ok is reused as is; an existing venv without the marker is checked against
# the pins (and completed with pip if something is missing or different), then marked. The first
# install downloads ~4 GB (torch with its CUDA runtime wheels, like scripts/env.sh's venv).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REQ="$HERE/requirements.txt"
RABBIT_CACHE=${RABBIT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/rabbitllm}
AIRLLM_VENV=${AIRLLM_VENV:-$RABBIT_CACHE/venv-airllm-4.0.0}
MARKER="$AIRLLM_VENV/.airllm-ok"

log() { echo "[airllm setup] $*" >&2; }

# Exit status 0 when every pin of requirements.txt is installed at exactly that version.
pins_satisfied() {
    "$AIRLLM_VENV/bin/python" - "$REQ" <<'PY' 2>/dev/null
import importlib.metadata as md, sys
for line in open(sys.argv[1]):
    line = line.split("#", 1)[0].strip()
    if not line:
        continue
    name, _, version = line.partition("==")
    try:
        have = md.version(name)
    except md.PackageNotFoundError:
        sys.exit(1)
    if have.split("+")[0] != version:
        sys.exit(1)
PY
}

if [ -x "$AIRLLM_VENV/bin/python" ] && [ -f "$MARKER" ] && cmp -s "$REQ" "$MARKER"; then
    echo "$AIRLLM_VENV/bin/python"
    exit 0
fi

if [ ! -x "$AIRLLM_VENV/bin/python" ]; then
    py=$(command -v python3 || true)
    if [ -z "$py" ]; then
        log "python3 not found: install Python 3.10+"
        exit 1
    fi
    mkdir -p "$(dirname "$AIRLLM_VENV")"
    log "creating $AIRLLM_VENV"
    "$py" -m venv "$AIRLLM_VENV"
    "$AIRLLM_VENV/bin/python" -m pip install --quiet --progress-bar off --upgrade pip
fi

if ! pins_satisfied; then
    log "pip install -r $REQ into $AIRLLM_VENV (one-time download, ~4 GB with torch's CUDA wheels)"
    "$AIRLLM_VENV/bin/python" -m pip install --progress-bar off -r "$REQ"
    pins_satisfied || { log "installed versions still differ from $REQ"; exit 1; }
fi
# The marker holds the requirements it was made for: editing the pins re-checks the venv.
cp "$REQ" "$MARKER"
log "AirLLM venv ready: $AIRLLM_VENV"
echo "$AIRLLM_VENV/bin/python"
