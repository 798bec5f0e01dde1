#!/usr/bin/env bash
# Build Baton's two images from the repository root: the workers' (Dockerfile) as
# REGISTRY/baton:VERSION and the router's and operator's (Dockerfile.control) as
# REGISTRY/baton-control:VERSION, VERSION being the package version (the chart's appVersion).
#
#   scripts/build-images.sh                    # docker, podman or buildah; python:3.12 slim base
#   scripts/build-images.sh --local-base --pip-config --torch-wheels /opt/wheels
#                                              # no registry reachable (as root, buildah/podman)
#
#   --registry R       image prefix (default ghcr.io/baton-dev)
#   --base IMAGE       base image of both (build argument BASE_IMAGE)
#   --local-base       build on localhost/baton-base:bookworm (Debian bookworm, python3, pip),
#                      made first with mmdebstrap and `podman import` unless it exists
#   --pip-config       mount this host's pip configuration and CA certificates into the build
#                      steps, so pip reaches the index the host reaches (buildah, podman)
#   --torch-wheels DIR mount DIR into the worker build and prefer its torch wheels, e.g. a CPU
#                      build (buildah, podman)
#   --torch-version V  torch of the worker image (default: the Dockerfile's)
#   --only worker|control
#   --vfs              buildah/podman storage driver vfs and chroot isolation (inside a
#                      container, where overlay mounts and namespaces are not allowed)
# BUILDER=docker|podman|buildah picks the tool (default: the first one installed).
set -euo pipefail
cd "$(dirname "$0")/.."

registry=ghcr.io/baton-dev base="" local_base=0 pip_config=0 wheels="" torch="" only="" vfs=0
while [ $# -gt 0 ]; do
  case "$1" in
    --registry) registry=$2; shift 2 ;;
    --base) base=$2; shift 2 ;;
    --local-base) local_base=1; shift ;;
    --pip-config) pip_config=1; shift ;;
    --torch-wheels) wheels=$(cd "$2" && pwd); shift 2 ;;
    --torch-version) torch=$2; shift 2 ;;
    --only) only=$2; shift 2 ;;
    --vfs) vfs=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-images: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$only" in ""|worker|control) ;; *) echo "build-images: --only worker|control" >&2; exit 2 ;; esac

builder=${BUILDER:-}
if [ -z "$builder" ]; then
  for tool in docker podman buildah; do
    if command -v "$tool" >/dev/null; then builder=$tool; break; fi
  done
fi
[ -n "$builder" ] || { echo "build-images: install docker, podman or buildah" >&2; exit 1; }
storage=()
[ "$vfs" = 1 ] && storage=(--storage-driver vfs)
build=("$builder" "${storage[@]}" build)
[ "$builder" = buildah ] && build=(buildah "${storage[@]}" bud)
[ "$vfs" = 1 ] && build+=(--isolation chroot)

mounts=()
if [ "$pip_config" = 1 ] || [ -n "$wheels" ]; then
  [ "$builder" != docker ] || { echo "build-images: docker build takes no mounts; use podman or buildah" >&2; exit 2; }
fi
if [ "$pip_config" = 1 ]; then
  for path in /etc/pip.conf /etc/xdg/pip /etc/ssl/certs; do
    [ -e "$path" ] && mounts+=(-v "$path:$path:ro")
  done
fi

if [ "$local_base" = 1 ]; then
  base=localhost/baton-base:bookworm
fi
if [ "$local_base" = 1 ] && podman "${storage[@]}" image exists "$base"; then
  echo "build-images: using the existing $base (podman rmi it to make it again)"
elif [ "$local_base" = 1 ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  echo "build-images: making $base with mmdebstrap"
  # Debian marks its Python as externally managed; this image is Baton's alone, so pip
  # installs into it as into python:slim.
  mmdebstrap --quiet --variant=minbase --include=python3,python3-pip,ca-certificates \
    --customize-hook='rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED' \
    --customize-hook='ln -sf python3 "$1"/usr/bin/python' \
    bookworm "$tmp/base.tar"
  podman "${storage[@]}" import "$tmp/base.tar" "$base" >/dev/null
fi
base_arg=()
[ -n "$base" ] && base_arg=(--build-arg "BASE_IMAGE=$base")

version=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
if [ "$only" != control ]; then
  worker_args=()
  [ -n "$torch" ] && worker_args+=(--build-arg "TORCH_VERSION=$torch")
  [ -n "$wheels" ] && worker_args+=(-v "$wheels:/torch-wheels:ro" --build-arg TORCH_FIND_LINKS=/torch-wheels)
  echo "build-images: $registry/baton:$version"
  "${build[@]}" "${base_arg[@]}" "${mounts[@]}" "${worker_args[@]}" \
    -f Dockerfile -t "$registry/baton:$version" .
fi
if [ "$only" != worker ]; then
  echo "build-images: $registry/baton-control:$version"
  "${build[@]}" "${base_arg[@]}" "${mounts[@]}" -f Dockerfile.control -t "$registry/baton-control:$version" .
fi
