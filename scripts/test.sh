#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs libtorch (cached), builds, tests.
# Both the test targets and the doc tests always run; the exit status fails if either did.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
# The `rabbit serve` tests talk to the server with the real OpenAI Python client.
rabbit_ensure_pip openai==3.57.0
status=0
cargo test --release --workspace --all-targets --no-fail-fast || status=1
cargo test --release --workspace --doc || status=1
if [ "$status" -ne 0 ]; then
    echo "[rabbitllm test] some tests failed (see above)" >&2
fi
exit "$status"
