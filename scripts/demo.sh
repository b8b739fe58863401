#!/usr/bin/env bash
# The main job on the embedded default: make a synthetic model with the shape of Qwen2.5-0.5B
# (seeded random weights, real tokenizer) and stream it layer by layer, straight from its own
# weight files, to generate text; prints the text, per-token time and peak memory.
# Extra arguments go to `rabbit generate` (e.g. --device cuda --max-new-tokens 64).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
cargo build --release -p rabbit-cli
rabbit="$CARGO_TARGET_DIR/release/rabbit"
model="$RABBIT_CACHE/demo/qwen2.5-0.5b-synthetic"
"$rabbit" synth --arch qwen2 --preset qwen2.5-0.5b --dtype bf16 --seed 7 --out "$model"
# --resident-layers 0: stream every layer (the planner would keep a model this small resident).
"$rabbit" generate --model "$model" --prompt "The quick brown fox" --max-new-tokens 24 --resident-layers 0 "$@"
