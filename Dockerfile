# syntax=docker/dockerfile:1
#
# AnimalID: one image for GPU and CPU hosts.
#
#   docker build -t animalid .
#   docker run --rm -p 8000:8000 -e ANIMALID_API_KEYS=... animalid                    # CPU
#   docker run --rm -p 8000:8000 -e ANIMALID_API_KEYS=... --gpus all animalid         # GPU
#
# Base: NVIDIA's CUDA 13.0 runtime on Ubuntu 24.04. The torch==2.14.1 wheel pinned in
# pyproject.toml is the CUDA 13.0 build and brings its own CUDA libraries as pip packages (faiss-gpu
# brings CUDA 12 ones), so nothing is compiled here and no CUDA toolkit is needed. The CUDA base is
# still the right one: its NVIDIA_REQUIRE_CUDA (cuda>=13.0) makes the NVIDIA container toolkit refuse
# to start a GPU container on a driver too old for torch's CUDA (driver >= 580), a clear error at
# start-up instead of a silent fall-back to the CPU, and it sets the NVIDIA_* variables the toolkit
# reads. On a host without a GPU none of that is used and the same image serves on the CPU
# (ANIMALID_DEVICE=auto). The pinned wheels are manylinux x86_64: build for linux/amd64.
FROM nvidia/cuda:13.0.2-runtime-ubuntu24.04

LABEL org.opencontainers.image.title="AnimalID" \
      org.opencontainers.image.description="Recognise individual animals from photos of their faces" \
      org.opencontainers.image.licenses="MIT"

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Python 3.11, the version CI runs, from the deadsnakes PPA (Ubuntu 24.04 itself ships 3.12). The
# tool that adds the PPA is removed again in the same layer. Ubuntu's package versions are not
# pinned: they move with security updates, and the base image tag pins the release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates software-properties-common \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
    && apt-get purge -y --auto-remove software-properties-common \
    && rm -rf /var/lib/apt/lists/*

# A fresh virtual environment, as in CI; first on PATH, so `pip` and `animalid` below are its own.
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN python3.11 -m venv /opt/venv

WORKDIR /app

# Dependency layer, cached apart from the code: the project is installed from pyproject.toml alone,
# with empty placeholder packages standing in for the code, so editing the code does not reinstall
# torch. The install command is CI's, verbatim (tests/test_deploy_files.py compares the two). The
# install is editable: the code copied below replaces the placeholders in place, and `animalid
# migrate` finds migrations/ and alembic.ini beside the packages.
COPY pyproject.toml ./
RUN mkdir service training \
    && touch README.md service/__init__.py training/__init__.py \
    && pip install -e '.[dev]'

COPY . .

# Run as an unprivileged user; it owns only /data (SQLite file, models, stored images).
RUN useradd --create-home --uid 10001 --user-group animalid \
    && mkdir -p /data/models /data/images \
    && chown -R animalid:animalid /data
USER 10001:10001

# Container defaults; compose overrides the database with its Postgres service.
ENV ANIMALID_HOST=0.0.0.0 \
    ANIMALID_PORT=8000 \
    ANIMALID_DATABASE_URL=sqlite:////data/animalid.db \
    ANIMALID_MODELS_DIR=/data/models \
    ANIMALID_IMAGE_STORE_DIR=/data/images

EXPOSE 8000

# Liveness through the API itself; Python's standard library, so no curl in the image.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('ANIMALID_PORT', '8000'), timeout=4)"]

CMD ["animalid", "serve"]
