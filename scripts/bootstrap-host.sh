#!/usr/bin/env bash
# Installs the host packages the agent and its tests need on Debian 12, links kernel headers
# for BCC when the running kernel ships none, and mounts bpffs. Idempotent and quiet when
# nothing changed: the stamp records the package list, the header links are checked each run.
set -euo pipefail

PACKAGES=(python3-bpfcc python3-venv bpftool iproute2 iputils-ping procps curl linux-headers-amd64 iperf3 tcpdump socat util-linux make containernetworking-plugins)
STAMP=/var/lib/ambient-agent/host-packages.stamp

if [ "$(id -u)" -ne 0 ]; then
  echo "bootstrap-host: must run as root (apt, kernel headers, bpffs)" >&2
  exit 1
fi

wanted="${PACKAGES[*]}"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$wanted" ] || ! dpkg -s "${PACKAGES[@]}" >/dev/null 2>&1; then
  echo "bootstrap-host: installing ${wanted}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
  mkdir -p "$(dirname "$STAMP")"
  echo "$wanted" >"$STAMP"
fi

# BCC compiles against /lib/modules/$(uname -r)/build. Kernels without their own headers get
# Debian's generic ones: our programs use only UAPI headers, which are stable across versions.
kdir=/lib/modules/$(uname -r)
if [ ! -e "$kdir/build/Makefile" ]; then
  arch_dir=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
  common_dir=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n 1)
  if [ -z "$arch_dir" ] || [ -z "$common_dir" ]; then
    echo "bootstrap-host: no kernel headers for $(uname -r) and no Debian linux-headers-amd64 to fall back on" >&2
    exit 1
  fi
  mkdir -p "$kdir"
  ln -sfn "$arch_dir" "$kdir/build"
  ln -sfn "$common_dir" "$kdir/source"
  echo "bootstrap-host: kernel $(uname -r) has no headers; linked Debian's $(basename "$arch_dir") as $kdir/build and source"
fi

if ! mountpoint -q /sys/fs/bpf; then
  mount -t bpf bpf /sys/fs/bpf
fi
