# Worker image: prefill, decode and colocated workers (`baton serve-prefill|serve-decode|serve-colocated`).
#
# Installed the way CI installs Baton: a pinned PyTorch first, then the project, whose
# torch range the pinned wheel already satisfies (so pip installs no other torch), here
# with the `ucx` extra for the UCX KV-transfer data plane. Linux torch wheels bundle the
# CUDA runtime; the node provides the NVIDIA driver (NVIDIA container toolkit / GPU
# operator). For another CUDA build pass TORCH_INDEX_URL (PyTorch's wheel index).
# scripts/build-images.sh builds both images (docker, podman or buildah).
#
#   docker build -f Dockerfile -t ghcr.io/baton-dev/baton:0.1.0 .
#   docker push ghcr.io/baton-dev/baton:0.1.0

# The base: any image with Python >= 3.11, pip, and useradd. scripts/build-images.sh can make
# one locally (Debian bookworm's python3 and pip) where no registry is reachable.
ARG BASE_IMAGE=python:3.12.8-slim-bookworm
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.11.0
ARG TORCH_INDEX_URL=""
# A folder (mounted into the build) or page of torch wheels to prefer, e.g. a CPU build.
ARG TORCH_FIND_LINKS=""

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# 1. PyTorch, pinned (the GPU machines run 2.11 with CUDA 13; CI runs the CPU 2.13 build).
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} \
    ${TORCH_FIND_LINKS:+--find-links "$TORCH_FIND_LINKS"} "torch==${TORCH_VERSION}"

# 2. Baton with the ucx extra; every package folder the pyproject maps is copied.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY baton baton
COPY engine engine
COPY kvtransfer kvtransfer
COPY prefill prefill
COPY decode decode
COPY colocated colocated
COPY worker worker
COPY router router
COPY worker worker
COPY colocated colocated
COPY operator operator
RUN pip install ".[ucx]" && rm -rf /src

# The pods run as this user (operator/builders/common.py: RUN_AS) with a read-only root
# filesystem; caches go to /tmp (an emptyDir).
RUN useradd --uid 1000 --user-group --home-dir /tmp --no-create-home baton
USER 1000:1000
WORKDIR /tmp
ENTRYPOINT ["baton"]
CMD ["--help"]
