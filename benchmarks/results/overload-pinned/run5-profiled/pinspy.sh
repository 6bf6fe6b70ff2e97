#!/bin/bash
OUT=$1; FACTORS=$2
P=$PWD/artifacts/bench/criteo-kaggle-rows100000-fp32/packages/singular-1
PORT=$(.venv/bin/python -c "from serving.ops.ports import free_port; print(free_port())")
taskset -c 1 .venv/bin/python -m recserve.cli serve --monolith $P --port $PORT --feature-filter none > $OUT.server.log 2>&1 &
for i in $(seq 60); do grep -q listening $OUT.server.log && break; sleep 1; done
SPID=$(pgrep -f "serve --monolith" | head -1)
( for k in 1 2 3 4; do while [ "$(grep -c "^offering" $OUT.log 2>/dev/null)" -lt $k ] 2>/dev/null || [ ! -f $OUT.log ]; do sleep 0.2; done; sleep 2; taskset -c 0 /tmp/pyspy/bin/py-spy record --nonblocking --threads -p $SPID -d 7 -r 100 --format raw -o $OUT.step$k.txt > /dev/null 2>&1; done ) &
taskset -c 0 timeout 900 .venv/bin/python benchmarks/overload.py --target monolith --package $P --address 127.0.0.1:$PORT --factors $FACTORS --duration 10 --out $OUT > $OUT.log 2>&1
pkill -INT -f "serve --monolith"; sleep 3
grep -A6 "| offered" $OUT.log
