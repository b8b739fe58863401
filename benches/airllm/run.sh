#!/usr/bin/env bash
# rabbit vs AirLLM 4.0.0, side by side (issue #6): sets up everything, then runs the matrix.
#
#   benches/airllm/run.sh                                   # full matrix (hours on a 2-core CPU)
#   benches/airllm/run.sh --presets qwen2.5-0.5b --batches 1 --compressions none --reps 3
#   benches/airllm/run.sh --help                            # every option of compare.py
#
# 1. libtorch + CARGO_TARGET_DIR via scripts/env.sh, then `cargo build --release -p rabbit-cli`
#    (skip with RABBIT_BIN=/path/to/rabbit);
# 2. the AirLLM venv with the pins of requirements.txt (setup_venv.sh; reused when present);
# 3. compare.py: synthesizes the checkpoints, times both engines, writes results.json/results.md
#    under $RABBIT_CACHE/airllm-bench/results/<timestamp>/ (or --out DIR).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)

# shellcheck source=../../scripts/env.sh
source "$ROOT/scripts/env.sh"

if [ -z "${RABBIT_BIN:-}" ]; then
    (cd "$ROOT" && cargo build --release -p rabbit-cli)
    RABBIT_BIN="$CARGO_TARGET_DIR/release/rabbit"
fi

AIRLLM_PYTHON=$("$HERE/setup_venv.sh")

exec "$AIRLLM_PYTHON" "$HERE/compare.py" --rabbit "$RABBIT_BIN" --python "$AIRLLM_PYTHON" "$@"
