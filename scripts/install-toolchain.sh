#!/usr/bin/env bash
# Installs what building and testing the balancer needs on Debian 12, following
# shared/TOOLCHAIN.md. Idempotent: each step checks first and prints nothing when
# there is nothing to do, so `cargo xtask test` can call it on every run.
set -euo pipefail

BPF_LINKER_VERSION=0.13.0
LLVM_PREFIX=/usr/lib/llvm-22
# Debian's compiler builds the eBPF crate: rustup has no rust-src here, so no build-std;
# Debian ships a prebuilt `core` for bpfel-unknown-none instead.
APT_PACKAGES=(
  rustc-web cargo-web libstd-rust-web-dev-bpf llvm-22-dev libpolly-22-dev
  bpftool iproute2 iputils-ping iputils-arping ethtool tcpdump curl nftables
  fakeroot xz-utils chromium chromium-driver
)

log() { echo "install-toolchain: $*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
  log "must run as root (apt-get, bpffs mount); re-run with sudo"
  exit 1
fi

missing=()
for p in "${APT_PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The eBPF build needs Debian's compiler and its prebuilt core for the BPF target.
if [ ! -x /usr/bin/rustc ] || ! ls /usr/lib/rustlib/bpfel-unknown-none/lib/libcore-*.rlib >/dev/null 2>&1; then
  log "Debian rustc-web or its BPF core is missing after apt-get; check libstd-rust-web-dev-bpf"
  exit 1
fi

CARGO_BIN="${CARGO_HOME:-$HOME/.cargo}/bin"
if ! "$CARGO_BIN/bpf-linker" --version 2>/dev/null | grep -q "$BPF_LINKER_VERSION"; then
  log "building bpf-linker $BPF_LINKER_VERSION against LLVM 22 (about a minute)"
  LLVM_PREFIX="$LLVM_PREFIX" cargo install bpf-linker --version "$BPF_LINKER_VERSION" \
    --locked --no-default-features --features llvm-22 --quiet
fi

# bpffs is where lbd pins its maps; a fresh machine does not mount it.
if ! mount | grep -q " /sys/fs/bpf type bpf"; then
  mount -t bpf bpf /sys/fs/bpf
fi
