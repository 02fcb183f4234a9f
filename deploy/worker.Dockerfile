# syntax=docker/dockerfile:1.7
# mlaserve worker image: the binary built with `--features cuda` on a CUDA base image, with libtorch
# and its CUDA libraries (cuBLAS, cuDNN, NCCL, ...) from the PyPI torch wheel.
#
# Build from the repository root (BuildKit picks up worker.Dockerfile.dockerignore):
#
#   docker build -f deploy/worker.Dockerfile -t mlaserve-worker:0.1.0 .
#
# torch 2.11.0 on PyPI is built for CUDA 13.0 (cuda-toolkit 13.0.2): nodes need an NVIDIA driver
# >= 580 and the NVIDIA container toolkit / GPU operator.

ARG TORCH_VERSION=2.11.0
ARG RUST_IMAGE=rust:1.95-bookworm
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-base-ubuntu24.04

# The full wheel with its nvidia-* dependencies; --target keeps the relative layout
# (torch/lib -> ../../nvidia/*/lib) that the libraries' $ORIGIN RPATHs rely on.
FROM python:3.12-slim-bookworm AS torch
ARG TORCH_VERSION
RUN pip install --no-cache-dir --no-compile --target /opt/torch torch==${TORCH_VERSION}

FROM ${RUST_IMAGE} AS build
COPY --from=torch /opt/torch /opt/torch
ENV LIBTORCH=/opt/torch/torch
WORKDIR /src
COPY . .
RUN --mount=type=cache,id=mlaserve-cargo-registry,target=/usr/local/cargo/registry \
    --mount=type=cache,id=mlaserve-target-cuda,target=/src/target \
    cargo build --release --locked -p mlaserve --features cuda \
 && install -D -m 0755 target/release/mlaserve /out/mlaserve

FROM ${CUDA_IMAGE}
ARG TARGETARCH=amd64
ARG GRPC_HEALTH_PROBE_VERSION=v0.4.39
# Kubelet gRPC probes speak plaintext only; with TLS on, the chart probes with grpc_health_probe.
ADD --chmod=0755 https://github.com/grpc-ecosystem/grpc-health-probe/releases/download/${GRPC_HEALTH_PROBE_VERSION}/grpc_health_probe-linux-${TARGETARCH} /usr/local/bin/grpc_health_probe
# Only the shared libraries: the wheel's Python parts (triton, sympy, ...) are not needed by the binary.
COPY --from=torch /opt/torch/torch/lib /opt/torch/torch/lib
COPY --from=torch /opt/torch/nvidia /opt/torch/nvidia
COPY --from=build /out/mlaserve /usr/local/bin/mlaserve
# Ubuntu 24.04 images ship a uid-1000 "ubuntu" user; ours is 10001 like the router's.
RUN groupadd --gid 10001 mlaserve \
 && useradd --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin mlaserve
# HOME on /tmp (an emptyDir in the chart) also holds the CUDA kernel cache (~/.nv/ComputeCache).
ENV LD_LIBRARY_PATH=/opt/torch/torch/lib \
    HOME=/tmp \
    MLASERVE_CACHE=/tmp/mlaserve
USER 10001:10001
WORKDIR /tmp
EXPOSE 50061 9090
ENTRYPOINT ["/usr/local/bin/mlaserve"]
CMD ["--help"]
