#!/usr/bin/env bash
# Builds the benchmarks' peer, llama.cpp's llama-server, once, into the user cache where bench/peers.py finds it:
#
#   bash bench/build_llama_server.sh        # ~5-20 minutes on two cores; needs cmake and a C++ compiler
#
# The sources are the llama.cpp vendored in the llama-cpp-python sdist of the version cpu-baselines.md measured,
# fetched from PyPI (no other download: the build's web UI and OpenSSL/curl support are switched off). The binary
# is built for this CPU (GGML_NATIVE) and left at $SGL_JAX_PEERS/llama.cpp-<version>/build/bin/llama-server
# (default ~/.cache/sgl_jax/peers); a second run finds it there and does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VERSION=$($PY -c "import sys; sys.path.insert(0, 'bench'); import peers; print(peers.LLAMA_CPP_PYTHON)")
BIN=$($PY -c "import sys; sys.path.insert(0, 'bench'); import peers; print(peers.built_binary())")
if [ -x "$BIN" ]; then
  echo "$BIN (already built)"
  exit 0
fi
SRC=$(dirname "$(dirname "$(dirname "$BIN")")")  # .../llama.cpp-<version>
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
$PY -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$TMP"
tar xzf "$TMP/llama_cpp_python-$VERSION.tar.gz" -C "$TMP"
mkdir -p "$(dirname "$SRC")"
rm -rf "$SRC"
mv "$TMP/llama_cpp_python-$VERSION/vendor/llama.cpp" "$SRC"
run() {  # a step's output to its log; on failure the log's tail and where the whole of it is
  local log=$1
  shift
  if ! "$@" > "$log" 2>&1; then
    tail -n 30 "$log" >&2
    echo "failed: $* (log: $log)" >&2
    exit 1
  fi
}
run "$SRC/cmake.log" cmake -S "$SRC" -B "$SRC/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
  -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF
run "$SRC/build.log" cmake --build "$SRC/build" --target llama-server -j "$(nproc)"
"$BIN" --version 2>&1 | head -1
echo "$BIN"
