# vegan_scale on NVIDIA GPUs: CUDA *devel* image (DeepSpeed compiles its ops with nvcc at first use), torch built for
# that CUDA, the package with its tested dependency versions, configs/ and launch/. No cluster settings are baked in
# (NCCL, rendezvous, SLURM come from the job), and no ENTRYPOINT: run `vegan-scale ...` or `accelerate launch ...`.
#
#   docker build -t vegan-scale .
#   docker build -t vegan-scale --build-arg CUDA_IMAGE=nvidia/cuda:12.6.3-devel-ubuntu24.04 \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 .
#
# CUDA_IMAGE and TORCH_INDEX_URL must name the same CUDA version (12.8 and cu128 here). docs/launching.md ("Container") shows
# how to run it with Docker, Apptainer and Enroot.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-devel-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

# Ubuntu's python3 with venv and headers (DeepSpeed's op builds include Python.h); g++ and ninja come with the
# devel image and DeepSpeed. Package versions follow the base image's release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev ca-certificates \
    && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first, from the index of the image's CUDA: its own layer, kept while the code changes. TORCH_SPEC pins it.
# hadolint ignore=DL3013
RUN python3 -m venv /opt/venv \
    && pip install --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"

WORKDIR /opt/vegan_scale
COPY pyproject.toml README.md constraints.txt ./
COPY vegan_scale/ vegan_scale/
RUN pip install -c constraints.txt ".[deepspeed]"
COPY configs/ configs/
COPY launch/ launch/

# A user of its own (uid 1001: the base image's `ubuntu` user has 1000); runs/ and .data/ (shards) are where a run
# writes and reads by default: mount them from the host. Under Apptainer and Enroot the container runs as you.
RUN useradd --create-home --uid 1001 --shell /bin/bash vegan \
    && mkdir -p runs .data \
    && chown vegan:vegan runs .data
USER 1001
