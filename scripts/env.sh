# shellcheck shell=bash
# Sourced by scripts/demo.sh and scripts/test.sh: makes libtorch 2.11.0 available to tch 0.24
# without any manual step, and keeps the expensive caches outside the clone.
#
# Order of preference:
#   1. LIBTORCH already set by the user (their own libtorch 2.11 install): used as is.
#   2. LIBTORCH_USE_PYTORCH=1 with a python3 on PATH that has torch 2.11: used as is.
#   3. A private venv under ${RABBIT_CACHE:-~/.cache/rabbitllm}, created on first use with
#      `pip install torch==2.11.0` (about 0.5 GB torch wheel plus about 3 GB of NVIDIA CUDA wheels
#      on x86-64 Linux; 3.4 GB on disk). Later runs reuse it.
#
# Python packages the test fixtures need (transformers) go into the same venv.

set -euo pipefail

RABBIT_TORCH_VERSION=2.11.0
RABBIT_CACHE=${RABBIT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/rabbitllm}
RABBIT_VENV=${RABBIT_VENV:-$RABBIT_CACHE/venv-torch-$RABBIT_TORCH_VERSION}
export RABBIT_CACHE RABBIT_VENV

rabbit_log() { echo "[rabbitllm setup] $*" >&2; }

rabbit_ensure_venv() {
    if [ -x "$RABBIT_VENV/bin/python" ] && [ -f "$RABBIT_VENV/.torch-ok" ]; then
        return 0
    fi
    local py
    py=$(command -v python3 || true)
    if [ -z "$py" ]; then
        rabbit_log "python3 not found: install Python 3.10+ (needed once, to fetch libtorch from PyPI)"
        return 1
    fi
    mkdir -p "$RABBIT_CACHE"
    rabbit_log "creating $RABBIT_VENV and installing torch==$RABBIT_TORCH_VERSION from PyPI"
    rabbit_log "(one-time download: ~0.5 GB torch + ~3 GB CUDA runtime wheels; ~3.4 GB on disk)"
    "$py" -m venv "$RABBIT_VENV"
    "$RABBIT_VENV/bin/python" -m pip install --quiet --progress-bar off --upgrade pip
    "$RABBIT_VENV/bin/python" -m pip install --progress-bar off "torch==$RABBIT_TORCH_VERSION"
    touch "$RABBIT_VENV/.torch-ok"
}

# Installs extra Python packages (e.g. transformers for fixtures) into the venv, once.
rabbit_ensure_pip() {
    rabbit_ensure_venv
    local missing=()
    local pkg
    for pkg in "$@"; do
        "$RABBIT_VENV/bin/python" -c "import importlib.metadata as m, sys; \
n, _, v = '$pkg'.partition('=='); sys.exit(0 if (not v and m.version(n)) or m.version(n) == v else 1)" \
            2>/dev/null || missing+=("$pkg")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        rabbit_log "pip install ${missing[*]}"
        "$RABBIT_VENV/bin/python" -m pip install --progress-bar off "${missing[@]}"
    fi
}

rabbit_setup_libtorch() {
    if [ -n "${LIBTORCH:-}" ]; then
        rabbit_log "using LIBTORCH=$LIBTORCH"
        return 0
    fi
    if [ -n "${LIBTORCH_USE_PYTORCH:-}" ] && python3 -c "import torch, sys; \
sys.exit(0 if torch.__version__.split('+')[0] == '$RABBIT_TORCH_VERSION' else 1)" 2>/dev/null; then
        rabbit_log "using the PyTorch of $(command -v python3)"
        return 0
    fi
    rabbit_ensure_venv
    LIBTORCH=$("$RABBIT_VENV/bin/python" -c 'import torch, os; print(os.path.dirname(torch.__file__))')
    export LIBTORCH
    unset LIBTORCH_USE_PYTORCH
}

rabbit_setup_cargo() {
    if ! command -v cargo >/dev/null; then
        rabbit_log "cargo not found: install Rust (https://rustup.rs)"
        return 1
    fi
    # One target dir per libtorch, outside the clone, so fresh clones reuse the ~5 min
    # torch-sys build.
    export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$RABBIT_CACHE/target}
}

rabbit_setup_libtorch
rabbit_setup_cargo
