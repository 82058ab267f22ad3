#!/usr/bin/env bash
# Build the aiflow node image without any registry: a rootfs with flow-node, the shared
# libraries `ldd` lists, minimal /etc files, the CA bundle and models/small, then
# `docker import` (see `flow-node testbed image --help`).
#
#   testbed/build-image.sh                     # release build (default for users)
#   testbed/build-image.sh target/debug/flow-node   # an existing binary (CI: the debug build)
#   AIFLOW_IMAGE=my/tag:1 testbed/build-image.sh
set -euo pipefail
cd "$(dirname "$0")/.."
binary="${1:-}"
if [ -z "$binary" ]; then
  cargo build --release -p flow-node
  binary=target/release/flow-node
fi
exec "$binary" testbed image --binary "$binary" --tag "${AIFLOW_IMAGE:-aiflow-node:dev}"
