# fastserve CPU image: docker build -t fastserve:0.1.0 .
# Build stage: the Rust toolchain and maturin build one release wheel (abi3, any CPython >= 3.10).
FROM rust:1.95-slim-bookworm AS build

# Debian's python3 only drives maturin here; versions come from the pinned Debian release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/maturin && /opt/maturin/bin/pip install --no-cache-dir "maturin==1.16.0"

WORKDIR /src
# Every workspace member must be present for cargo to resolve the workspace.
COPY Cargo.toml Cargo.lock pyproject.toml README.md ./
COPY rust rust
COPY protos protos
# build.rs converts it to the OpenAPI JSON served at /v2/openapi.json.
COPY docs/openapi.yaml docs/openapi.yaml
COPY python python
COPY benches/loadgen benches/loadgen
RUN /opt/maturin/bin/maturin build --release --locked --out /wheels

# Runtime stage: slim Python, the wheel and its dependencies (onnxruntime, numpy); no compilers.
FROM python:3.11-slim-bookworm

COPY --from=build /wheels /wheels
RUN python -m venv /opt/fastserve \
    && /opt/fastserve/bin/pip install --no-cache-dir /wheels/fastserve_engine-*.whl \
    && rm -rf /wheels \
    && useradd --system --uid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin fastserve

# In a container the server must listen on every interface; the model repository is a mount point.
ENV PATH=/opt/fastserve/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    FASTSERVE_HOST=0.0.0.0 \
    FASTSERVE_MODEL_REPOSITORY=/models \
    FASTSERVE_HTTP_PORT=8000 \
    FASTSERVE_GRPC_PORT=8001 \
    FASTSERVE_METRICS_PORT=8002 \
    FASTSERVE_LOG_FORMAT=json

USER 10001:10001
WORKDIR /models
# HTTP, gRPC, Prometheus /metrics.
EXPOSE 8000 8001 8002
# fastserve drains in-flight requests on SIGTERM (up to --drain-timeout-s), then exits 0.
STOPSIGNAL SIGTERM
# For plain Docker; Kubernetes uses the Deployment's probes instead.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('FASTSERVE_HTTP_PORT', '8000') + '/v2/health/live', timeout=2)"]
ENTRYPOINT ["fastserve", "serve"]
