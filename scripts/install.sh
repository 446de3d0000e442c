#!/usr/bin/env bash
# Install Flow API into the active Python environment with a *portable* llama.cpp build.
#
#   bash scripts/install.sh            # '.[local]'  (the README's quick start)
#   bash scripts/install.sh local,test # '.[local,test]'  (.ci/run)
#
# llama-cpp-python ships on the package index as source only, and pip compiles it with
# -march=native by default. That build can use AVX-512/AMX code paths that crash on another CPU,
# or on a VM whose CPU reports them but does not let processes use them; and pip's wheel cache
# hands the same native wheel to every later install of that version. So this script builds the
# wheel once, with the portable flags below and without pip's cache, into a project-local
# wheelhouse keyed by version and flags, installs it from there, and checks what was built.
#
# Settings (environment):
#   LLAMA_CPP_VERSION  the llama-cpp-python version to build (default below)
#   LLAMA_WHEELHOUSE   where built wheels are kept (default .wheels/ in the checkout)
#   LLAMA_WHEELS       a folder that already holds a portable wheel to use instead of building
set -euo pipefail
cd "$(dirname "$0")/.."

extras="${1:-local}"
version="${LLAMA_CPP_VERSION:-0.3.36}"
# No -march=native. The x86-64 flags name a baseline every AVX2 CPU (2013 on) has; ggml reads
# them only on x86 (ggml/src/ggml-cpu/CMakeLists.txt), so on arm64 GGML_NATIVE=OFF alone gives
# the armv8-a baseline with NEON.
flags="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
key="$(printf '%s' "$version $flags $(uname -m) $(python -c 'import sys; print(sys.implementation.cache_tag)')" | sha256sum | cut -c1-12)"
house="${LLAMA_WHEELHOUSE:-.wheels}/llama-cpp-python-$version-$key"
mkdir -p "$house"

find_wheel() { find "$1" -maxdepth 1 -name "llama_cpp_python-$version-*.whl" 2>/dev/null | head -1; }

python -m pip install --quiet --upgrade pip
wheel="$(find_wheel "$house")"
if [[ -z "$wheel" && -n "${LLAMA_WHEELS:-}" ]]; then
    wheel="$(find_wheel "$LLAMA_WHEELS")"
    [[ -n "$wheel" ]] && cp "$wheel" "$house/" && wheel="$(find_wheel "$house")"
fi
if [[ -z "$wheel" ]]; then
    echo "building llama-cpp-python $version (portable: $flags); about 5 minutes on 2 cores, once"
    # --no-cache-dir: never take (or leave) a natively built wheel from pip's cache;
    # --no-binary: compile from source even if some index offers a prebuilt wheel.
    CMAKE_ARGS="$flags" python -m pip wheel --quiet --no-deps --no-cache-dir \
        --no-binary llama-cpp-python -w "$house" "llama-cpp-python==$version"
    wheel="$(find_wheel "$house")"
fi

# --force-reinstall: a natively built copy of the same version may already be installed.
python -m pip install --quiet --force-reinstall --no-deps "$wheel"
python -m pip install --quiet --find-links "$house" -e ".[$extras]"

# Check the library that was installed, in a child process (a bad build crashes it, not us).
info="$(python -c 'import llama_cpp; print(llama_cpp.llama_print_system_info().decode())')"
echo "llama.cpp: $info"
if grep -Eq 'AVX512[A-Z_0-9]* = 1|AMX[A-Z_0-9]* = 1' <<<"$info"; then
    echo "error: this llama.cpp build uses AVX-512/AMX; remove $house and run this script again" >&2
    exit 1
fi
