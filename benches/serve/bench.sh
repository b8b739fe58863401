#!/usr/bin/env bash
# Throughput of `rabbit serve` with 1 and N concurrent clients on a streamed model: every sweep
# over the weights serves every request in flight, so N clients should get nearly N times the
# tokens per second of one (the sweep is bound by reading the weights, not by the rows).
#
# Env: MODEL (checkpoint dir; default: a synthetic Qwen2.5-0.5B-shape bf16 one made under $OUT),
#      CLIENTS (default "1 16"), REQUESTS (per client, default 2), TOKENS (default 16),
#      SERVE_ARGS (extra `rabbit serve` flags; default --resident-layers 0: every layer streamed),
#      OUT (default /tmp/rabbit-serve-bench). Prints one JSON line per client count.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/rabbit-serve-bench}
RABBIT=${RABBIT:-${CARGO_TARGET_DIR:-$HOME/.cache/rabbitllm/target}/release/rabbit}
CLIENTS=${CLIENTS:-"1 16"}
REQUESTS=${REQUESTS:-2}
TOKENS=${TOKENS:-16}
SERVE_ARGS=${SERVE_ARGS:---resident-layers 0}
mkdir -p "$OUT"
MODEL=${MODEL:-$OUT/qwen2.5-0.5b}
if [ ! -f "$MODEL/config.json" ]; then
    "$RABBIT" synth --arch qwen2 --preset qwen2.5-0.5b --out "$MODEL" >&2
fi
PORT=${PORT:-8765}
# shellcheck disable=SC2086
"$RABBIT" serve --model "$MODEL" --served-model-name bench --port "$PORT" --max-batch 16 \
    $SERVE_ARGS 2> "$OUT/serve.log" &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 600); do
    curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
    sleep 0.5
done
# Warm the page cache and the allocator.
python3 benches/serve/load.py "http://127.0.0.1:$PORT" bench 1 1 4 >/dev/null
for c in $CLIENTS; do
    python3 benches/serve/load.py "http://127.0.0.1:$PORT" bench "$c" "$REQUESTS" "$TOKENS"
done
curl -s "http://127.0.0.1:$PORT/metrics" | grep -E "^rabbit_(sweep_seconds_mean|bytes_streamed_per_token|time_to_first_token)" >&2
kill -TERM $SERVER
wait $SERVER || true
