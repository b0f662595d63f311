#!/usr/bin/env bash
# The project's test command (README): build and run every test on the CPU reference backend.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --release --all-targets
