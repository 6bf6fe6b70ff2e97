# Source this at the start of a command on the GPU host, from the repository root, with
# .gpuhost/ carried along:   . deploy/gpu-host/unpack.sh [.gpuhost]
# Unpacks Ray and the wheels into /tmp/site (files there do not outlive the host) and puts
# them and the repository on PYTHONPATH / PATH. UNPACK_RAY=0: the wheels only (grpcio,
# protobuf, pydantic: enough for `recserve export` and `recserve bench --engine`, ~5 s less).
_GH="${1:-.gpuhost}"
mkdir -p /tmp/site
[ "${UNPACK_RAY:-1}" = 0 ] || [ -d /tmp/site/ray ] || tar -xJf "$_GH/ray-2.60.0-strip.tar.xz" -C /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site "$_GH"/whl/*.whl 2>&1 | grep -v "^WARNING: Target directory" || true
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/site/bin:$PATH RAY_USAGE_STATS_ENABLED=0
unset _GH
