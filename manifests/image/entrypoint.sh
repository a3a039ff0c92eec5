#!/bin/sh
# The agent image's entrypoint: give BCC kernel headers at /lib/modules/$(uname -r)/build,
# then exec the command (`ambient-agent run ...`).
#
# The node's own headers come first: the DaemonSet mounts the host's /lib/modules and
# /usr/src read-only under /host, and the host's build/source links are followed there
# (an absolute link target is a host path, so it is looked up under /host).
# Otherwise the image's Debian linux-headers-amd64 are linked, as scripts/bootstrap-host.sh
# does on a host: the programs use only UAPI headers, which are stable across versions.
#
# The links are made in the container's own /lib/modules, never on the host.
# AMBIENT_HOST_ROOT, AMBIENT_MODULES_DIR and AMBIENT_HEADERS_DIR exist for the tests.
set -eu

host=${AMBIENT_HOST_ROOT:-/host}
modules=${AMBIENT_MODULES_DIR:-/lib/modules}
headers=${AMBIENT_HEADERS_DIR:-/usr/src}
release=$(uname -r)
kdir=$modules/$release

# host_target PATH: where the host's PATH (seen here as $host$PATH) leads, as a path in this
# container, following up to 8 symlinks.
host_target() {
  path=$1
  hops=0
  while [ -L "$host$path" ] && [ "$hops" -lt 8 ]; do
    target=$(readlink "$host$path")
    case $target in
      /*) path=$target ;;
      *) path=$(dirname "$path")/$target ;;
    esac
    hops=$((hops + 1))
  done
  printf '%s\n' "$host$path"
}

link_headers() {
  mkdir -p "$kdir"
  ln -sfn "$1" "$kdir/build"
  ln -sfn "$2" "$kdir/source"
}

node_build=$(host_target "/lib/modules/$release/build")
if [ -e "$node_build/Makefile" ]; then
  node_source=$(host_target "/lib/modules/$release/source")
  [ -e "$node_source" ] || node_source=$node_build
  link_headers "$node_build" "$node_source"
  echo "ambient-agent-entrypoint: kernel $release: the node's headers, $node_build"
else
  arch_dir=$(ls -d "$headers"/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
  common_dir=$(ls -d "$headers"/linux-headers-*-common 2>/dev/null | sort -V | tail -n 1)
  if [ -z "$arch_dir" ] || [ -z "$common_dir" ]; then
    echo "ambient-agent-entrypoint: no kernel headers for $release on the node and no Debian linux-headers-amd64 in the image to fall back on" >&2
    exit 1
  fi
  link_headers "$arch_dir" "$common_dir"
  echo "ambient-agent-entrypoint: kernel $release: the node has no headers; linked the image's Debian $(basename "$arch_dir") (the programs use UAPI headers only)"
fi

exec "$@"
