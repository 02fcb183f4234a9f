# syntax=docker/dockerfile:1.7
# mlaserve router image: the binary on Debian slim with only the CPU part of libtorch.
#
# Build from the repository root (BuildKit picks up router.Dockerfile.dockerignore):
#
#   docker build -f deploy/router.Dockerfile -t mlaserve-router:0.1.0 .
#
# The router does no tensor math, but it is the same binary as the worker and links libtorch_cpu,
# which in the PyPI wheel links libcudart and libcupti: those five libraries (~440 MB) are all the
# runtime needs. The image also runs CPU-only workers (worker.device=cpu: demo, CI, kind).

ARG TORCH_VERSION=2.11.0
ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

# libtorch from the PyPI wheel without its CUDA dependencies, plus the two CUDA libraries that
# libtorch_cpu links. --target keeps the wheel's relative layout (torch/lib, nvidia/cu13/lib), which
# the libraries' $ORIGIN RPATHs rely on.
FROM python:3.12-slim-bookworm AS torch
ARG TORCH_VERSION
RUN pip install --no-cache-dir --no-compile --no-deps --target /opt/torch \
        torch==${TORCH_VERSION} nvidia-cuda-runtime==13.0.96 nvidia-cuda-cupti==13.0.85

FROM ${RUST_IMAGE} AS build
COPY --from=torch /opt/torch /opt/torch
# torch-sys compiles against the wheel's headers; the binary gets a RUNPATH to /opt/torch/torch/lib,
# the same path as in the runtime image.
ENV LIBTORCH=/opt/torch/torch
WORKDIR /src
COPY . .
RUN --mount=type=cache,id=mlaserve-cargo-registry,target=/usr/local/cargo/registry \
    --mount=type=cache,id=mlaserve-target-cpu,target=/src/target \
    cargo build --release --locked -p mlaserve \
 && install -D -m 0755 target/release/mlaserve /out/mlaserve

FROM ${RUNTIME_IMAGE}
ARG TARGETARCH=amd64
ARG GRPC_HEALTH_PROBE_VERSION=v0.4.39
# Kubelet gRPC probes speak plaintext only; with TLS on, the chart probes with grpc_health_probe.
ADD --chmod=0755 https://github.com/grpc-ecosystem/grpc-health-probe/releases/download/${GRPC_HEALTH_PROBE_VERSION}/grpc_health_probe-linux-${TARGETARCH} /usr/local/bin/grpc_health_probe
COPY --from=torch /opt/torch/torch/lib/libtorch_cpu.so /opt/torch/torch/lib/libc10.so /opt/torch/torch/lib/libgomp.so.1 /opt/torch/torch/lib/
COPY --from=torch /opt/torch/nvidia/cu13/lib/libcudart.so.13 /opt/torch/nvidia/cu13/lib/libcupti.so.13 /opt/torch/nvidia/cu13/lib/
COPY --from=build /out/mlaserve /usr/local/bin/mlaserve
# Numeric non-root user (runAsNonRoot can verify it). Everything writable lives under /tmp, an
# emptyDir in the chart, so the root filesystem can be read-only.
RUN groupadd --gid 10001 mlaserve \
 && useradd --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin mlaserve
ENV LD_LIBRARY_PATH=/opt/torch/torch/lib \
    HOME=/tmp \
    MLASERVE_CACHE=/tmp/mlaserve
USER 10001:10001
WORKDIR /tmp
EXPOSE 50051 9090
ENTRYPOINT ["/usr/local/bin/mlaserve"]
CMD ["--help"]
