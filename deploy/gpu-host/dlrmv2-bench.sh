#!/usr/bin/env bash
# Issue 9's H200 benchmark in one command on the GPU host (see README.md beside this file):
# full-size dlrmv2 (seeded random weights, built there), the engine-only figures, then the
# monolith and the sharded stacks through gRPC, each at the workload's request sizes.
#
#   . deploy/gpu-host/unpack.sh && bash deploy/gpu-host/dlrmv2-bench.sh OUT [SHARDS...]
#
# SHARDS: shard counts of the load-balanced plan to serve (default "2 4"); each plan's package
# is built, served, then deleted (two 29 GB int8 packages do not fit the 64 GiB disk at once).
# Env: DTYPE (int8), RATES (offered req/s), DURATION (s per rate), ROUTERS (router replicas),
# TOWERS (tower replicas), SERVE_ARGS (more `recserve serve` flags), ENGINE=0 to skip it.
set -euo pipefail
OUT=${1:?usage: dlrmv2-bench.sh OUT [SHARDS...]}; shift
SHARDS=${*:-2 4}
DTYPE=${DTYPE:-int8}; RATES=${RATES:-100,200,300,400}; DURATION=${DURATION:-8}
ROUTERS=${ROUTERS:-4}; TOWERS=${TOWERS:-2}; ART=${ART:-/tmp/recserve-art}
DEVICE=${DEVICE:-cuda}; WORKLOAD=${WORKLOAD:-dlrmv2}; MAX_ROWS=${MAX_ROWS:-0}  # a CPU smoke run: DEVICE=cpu WORKLOAD=tiny
rows=(); [ "$MAX_ROWS" != 0 ] && rows=(--max-rows "$MAX_ROWS")
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
first=1
for n in $SHARDS; do
  pkg="$ART/$WORKLOAD-$([ "$MAX_ROWS" = 0 ] && echo full || echo "rows$MAX_ROWS")-$DTYPE-random/packages/load-$n"
  python3 -m recserve.cli export --init random --seed 0 --gen-device "$DEVICE" --workload "$WORKLOAD" "${rows[@]}" \
      --dtype "$DTYPE" --strategy load --shards "$n" --out "$pkg" --force 2>&1 | tee "$OUT/export-load-$n.log"
  if [ "$first" = 1 ] && [ "${ENGINE:-1}" = 1 ]; then
    python3 -m recserve.cli bench --engine --package "$pkg" --device "$DEVICE" ${ENGINE_ARGS:-} --out "$OUT" 2>&1 | tee "$OUT/engine.log"
  fi
  configs="load-$n"; [ "$first" = 1 ] && configs="monolith,load-$n"
  python3 -m recserve.cli bench --workload "$WORKLOAD" --max-rows "$MAX_ROWS" --dtype "$DTYPE" --init random --device "$DEVICE" \
      --artifacts "$ART" --configs "$configs" --rates "$RATES" --duration "$DURATION" --closed-concurrency 32 \
      --timeout 1 --serve-arg="--router-replicas=$ROUTERS" --serve-arg="--tower-replicas=$TOWERS" ${SERVE_ARGS:-} \
      --out "$OUT/load-$n" 2>&1 | tee "$OUT/bench-load-$n.log"
  rm -rf "$pkg"
  first=0
done
