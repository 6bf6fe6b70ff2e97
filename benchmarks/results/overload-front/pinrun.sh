#!/bin/bash
# The monolith on core 1, the load generator on core 0 (as overload-pinned), with extra
# `recserve serve` flags. usage: pinrun.sh OUT FACTORS [serve flags...]
#   bash benchmarks/results/overload-front/pinrun.sh OUT 1,3,5,8,8 --front haproxy   # or --front none
OUT=$1; FACTORS=$2; shift 2
P=$PWD/artifacts/bench/criteo-kaggle-rows100000-fp32/packages/singular-1
PORT=$(.venv/bin/python -c "from serving.ops.ports import free_port; print(free_port())")
taskset -c 1 .venv/bin/python -m recserve.cli serve --monolith $P --port $PORT --feature-filter none \
    --metrics-port -1 "$@" > $OUT.server.log 2>&1 &
for i in $(seq 60); do grep -q listening $OUT.server.log && break; sleep 1; done
taskset -c 0 timeout 1200 .venv/bin/python benchmarks/overload.py --target monolith --package $P \
    --address 127.0.0.1:$PORT --factors $FACTORS --duration 10 --out $OUT > $OUT.log 2>&1
pkill -INT -f "serve --monolith $P"; sleep 3
grep -B2 -A9 "| offered" $OUT.log
