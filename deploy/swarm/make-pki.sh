#!/usr/bin/env bash
# CA + one node certificate per tier (cloud, edge, device) for deploy/swarm/stack.yml, with
# `flow-node certs` run from the node image (no flow-node needed on the host). Idempotent:
# an existing CA and existing certificates are kept.
#   AIFLOW_PKI=$PWD/pki deploy/swarm/make-pki.sh
set -euo pipefail
pki="${AIFLOW_PKI:?set AIFLOW_PKI to the directory for ca/ and nodes/}"
image="${AIFLOW_IMAGE:-aiflow-node:dev}"
mkdir -p "$pki"
pki="$(cd "$pki" && pwd)"
run() { docker run --rm --network none -v "$pki:/pki" "$image" "$@" >/dev/null; }
[ -f "$pki/ca/ca.pem" ] || run certs init --out /pki/ca
for tier in cloud edge device; do
  [ -f "$pki/nodes/$tier.pem" ] || run certs issue --ca /pki/ca --name "$tier" --role "$tier" --out /pki/nodes
done
ls "$pki/ca/ca.pem" "$pki"/nodes/*.pem
