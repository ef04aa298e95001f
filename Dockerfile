# syntax=docker/dockerfile:1
#
# AnimalID: one image for GPU and CPU hosts.
#
#   docker build -t animalid .
#   docker run --rm -p 8000:8000 -e ANIMALID_API_KEYS=... animalid                    # CPU
#   docker run --rm -p 8000:8000 -e ANIMALID_API_KEYS=... --gpus all animalid         # GPU
#
# Base: the official slim Python 3.11 image (Debian), the version CI runs; no PPA, no CUDA base. The
# torch==2.14.1 wheel pinned in pyproject.toml is the CUDA 13.0 build and brings its own CUDA
# libraries as pip packages (faiss-gpu brings CUDA 12 ones), so nothing is compiled here and no
# CUDA toolkit or runtime image is needed: only the host's NVIDIA driver (>= 580 for CUDA 13), which
# the NVIDIA container toolkit mounts into the container. The pinned wheels are manylinux x86_64:
# build for linux/amd64.
#
# Two stages: `build` installs the runtime dependencies (never the [dev] extra: no pytest, ruff,
# mypy or hadolint in production) into a virtual environment; the final stage copies that
# environment and the code onto a fresh slim base, without pip's build-time leftovers.

FROM python:3.11-slim AS build

ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN python3.11 -m venv /opt/venv

WORKDIR /app

# Dependency layer, cached apart from the code: the project is installed from pyproject.toml alone,
# with empty placeholder packages standing in for the code, so editing the code does not reinstall
# torch. The install is editable, so the final stage's code at /app replaces the placeholders and
# `animalid migrate` finds migrations/ and alembic.ini beside the packages.
COPY pyproject.toml ./
RUN mkdir service training \
    && touch README.md service/__init__.py training/__init__.py \
    && pip install -e .


FROM python:3.11-slim AS runtime

LABEL org.opencontainers.image.title="AnimalID" \
      org.opencontainers.image.description="Recognise individual animals from photos of their faces" \
      org.opencontainers.image.licenses="MIT"

# NVIDIA_*: what the NVIDIA container toolkit reads (the CUDA base images set the same). With
# NVIDIA_REQUIRE_CUDA the toolkit refuses to start a GPU container on a driver too old for torch's
# CUDA 13, a clear error at start-up instead of a silent fall-back to the CPU. On a host without a
# GPU none of it is used and the same image serves on the CPU (ANIMALID_DEVICE=auto).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    NVIDIA_REQUIRE_CUDA="cuda>=13.0"

COPY --from=build /opt/venv /opt/venv

WORKDIR /app
COPY . .

# Run as an unprivileged user; it owns only /data (SQLite file, models, stored images, fine-tune jobs).
# Every folder a compose volume is mounted on is made here: Docker gives an empty named volume the
# owner of the image's folder, and root's where the image has none (the worker could not write jobs).
RUN useradd --create-home --uid 10001 --user-group animalid \
    && mkdir -p /data/models /data/images /data/jobs \
    && chown -R animalid:animalid /data
USER 10001:10001

# Container defaults; compose overrides the database with its Postgres service.
ENV ANIMALID_HOST=0.0.0.0 \
    ANIMALID_PORT=8000 \
    ANIMALID_DATABASE_URL=sqlite:////data/animalid.db \
    ANIMALID_MODELS_DIR=/data/models \
    ANIMALID_IMAGE_STORE_DIR=/data/images

EXPOSE 8000

# Liveness through the API itself; Python's standard library, so no curl in the image. Compose checks
# readiness (/ready) instead: see docker-compose.yml.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('ANIMALID_PORT', '8000'), timeout=4)"]

CMD ["animalid", "serve"]
