#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs libtorch (cached), builds, tests.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
cargo test --release --workspace --all-targets --no-fail-fast
cargo test --release --workspace --doc
