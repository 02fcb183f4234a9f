#!/usr/bin/env bash
# The NEON kernels on an x86-64 machine: cross-built for aarch64 and run under qemu-user.
#   tools/aarch64-cross.sh install   Debian's packages: rustc-web (a rustc with LLVM's AArch64
#                                    backend) and its aarch64 standard library, the aarch64 linker
#                                    and C library, qemu-user. Needs root and apt; CI runs it.
#   tools/aarch64-cross.sh test      the kernel-path checks (crates/kernels/tests/paths.rs) for
#                                    aarch64 under qemu; without the toolchain, says so and skips.
# rustup cannot fetch another target's standard library on these machines, hence Debian's rustc,
# which must match its standard library exactly. It is installed as /usr/bin/rustc-web (a dpkg
# diversion) so that it never shadows rustup's rustc on PATH. qemu-user's threads hang on this
# project's machines, so the checks run on the main thread with a one-thread pool.
set -euo pipefail
cd "$(dirname "$0")/.."

RUSTC_WEB=/usr/bin/rustc-web
STD=/usr/lib/rustlib/aarch64-unknown-linux-gnu/lib
have() { [ -x "$RUSTC_WEB" ] && [ -d "$STD" ] && command -v aarch64-linux-gnu-gcc >/dev/null && command -v qemu-aarch64 >/dev/null; }

case "${1:-}" in
install)
    if have; then echo "aarch64 cross toolchain: present"; exit 0; fi
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        echo "aarch64 cross toolchain: not installed (needs root and apt-get)"; exit 1
    fi
    for f in rustc rustdoc; do
        dpkg-divert --quiet --local --rename --divert /usr/bin/$f-web --add /usr/bin/$f
    done
    dpkg --add-architecture arm64
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        rustc-web libstd-rust-web-dev:arm64 gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user >/dev/null
    have && echo "aarch64 cross toolchain: installed ($($RUSTC_WEB --version))"
    ;;
test)
    if ! have; then
        echo "aarch64 NEON checks skipped: no cross toolchain here (tools/aarch64-cross.sh install)"
        exit 0
    fi
    export RUSTC=$RUSTC_WEB
    export CARGO_TARGET_DIR="${MLASERVE_CACHE:-$HOME/.cache/mlaserve}/target-aarch64"
    export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
    export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
    export MLASERVE_TEST_THREADS=1
    cargo test --release --locked -p mlaserve-kernels --target aarch64-unknown-linux-gnu --test paths
    ;;
*)
    echo "usage: $0 install|test" >&2; exit 2
    ;;
esac
