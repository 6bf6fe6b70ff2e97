#!/usr/bin/env bash
# Several serving configurations of one full-size dlrmv2 package in one device call: the
# package is built once (dlrmv2-bench.sh builds one per bench), then each VARIANT is served
# and swept by `recserve bench`, each into OUT/NAME; PROFILE_RATE also records every serving
# process with py-spy (benchmarks/profile_stack.py) at that rate, into OUT/profile.
#
#   . deploy/gpu-host/unpack.sh
#   VARIANTS="r4t2: pipe2:--coalesce-pipeline=2 r6t3:--router-replicas=6,--tower-replicas=3" \
#     MONOLITH=1 PROFILE_RATE=350 bash deploy/gpu-host/dlrmv2-sweep.sh OUT 2
#
# VARIANTS: space-separated NAME:FLAGS, FLAGS comma-separated `recserve serve` flags added to
# the defaults below (--router-replicas=4 --tower-replicas=2; a later flag wins). Env as
# dlrmv2-bench.sh: DTYPE, RATES, DURATION, ART, DEVICE; MONOLITH=1 also runs the monolith
# (beside the first variant, in its table).
set -euo pipefail
OUT=${1:?usage: dlrmv2-sweep.sh OUT SHARDS}; N=${2:-2}
DTYPE=${DTYPE:-int8}; RATES=${RATES:-250,350,450,550}; DURATION=${DURATION:-8}
ART=${ART:-/tmp/recserve-art}; DEVICE=${DEVICE:-cuda}; WORKLOAD=${WORKLOAD:-dlrmv2}; MAX_ROWS=${MAX_ROWS:-0}
VARIANTS=${VARIANTS:-default:}
rows=(); [ "$MAX_ROWS" != 0 ] && rows=(--max-rows "$MAX_ROWS")
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
pkg="$ART/$WORKLOAD-$([ "$MAX_ROWS" = 0 ] && echo full || echo "rows$MAX_ROWS")-$DTYPE-random/packages/load-$N"
python3 -m recserve.cli export --init random --seed 0 --gen-device "$DEVICE" --workload "$WORKLOAD" "${rows[@]}" \
    --dtype "$DTYPE" --strategy load --shards "$N" --out "$pkg" --force > "$OUT/export-load-$N.log" 2>&1
tail -2 "$OUT/export-load-$N.log"
base=(--serve-arg=--router-replicas=4 --serve-arg=--tower-replicas=2)
first=1
for v in $VARIANTS; do
  name=${v%%:*}; flags=${v#*:}
  extra=(); IFS=, read -ra fl <<< "$flags"; for f in "${fl[@]}"; do [ -n "$f" ] && extra+=("--serve-arg=$f"); done
  configs="load-$N"; [ "$first" = 1 ] && [ "${MONOLITH:-0}" = 1 ] && configs="monolith,load-$N"
  echo "== $name: ${base[*]} ${extra[*]}"
  python3 -m recserve.cli bench --workload "$WORKLOAD" --max-rows "$MAX_ROWS" --dtype "$DTYPE" --init random \
      --device "$DEVICE" --artifacts "$ART" --configs "$configs" --rates "$RATES" --duration "$DURATION" \
      --closed-concurrency 32 --timeout 1 "${base[@]}" "${extra[@]}" --out "$OUT/$name" > "$OUT/$name.log" 2>&1 \
    || echo "$name: bench exited $?"
  grep -E "^ +(load-|monolith)" "$OUT/$name.log" | grep -E "open|closed" | head -20 || true
  first=0
done
if [ -n "${PROFILE_RATE:-}" ]; then
  echo "== profile at $PROFILE_RATE req/s"
  python3 benchmarks/profile_stack.py "$pkg" --workload "$WORKLOAD" --max-rows "$MAX_ROWS" --device "$DEVICE" \
      --rate "$PROFILE_RATE" --duration "${PROFILE_S:-15}" --serve-arg=--router-replicas=4 \
      --serve-arg=--tower-replicas=2 --serve-arg=--feature-filter=none --out "$OUT/profile" > "$OUT/profile.log" 2>&1 \
    || echo "profile exited $?"
  grep -E "^load:|^== |%  " "$OUT/profile.log" | head -120 || true
fi
