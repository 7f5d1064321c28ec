# syntax=docker/dockerfile:1
# The moodstream worker (and the API: `serve`): CPU torch, non-root, no compilers in the final
# stage, everything installed by hash from the images' lock (requirements/image.txt). Build from
# the repository root:
#   docker build -f deploy/docker/worker.Dockerfile -t moodstream-worker:0.1.0 .
# Run (settings: `docker run --rm moodstream-worker:0.1.0 settings`):
#   docker run --rm -p 9108:9108 -e MOODSTREAM_KAFKA_BOOTSTRAP=kafka:9092 \
#     -e MOODSTREAM_TRITON_URL=triton:8001 -e AWS_REGION=eu-west-1 moodstream-worker:0.1.0
# `make images` builds it with podman from a Debian base made with debootstrap and torch from
# PyPI (deploy/images.py; docs/operations.md#images).

# The runtime's image: a Python 3.11 on Debian bookworm with python3.11 on PATH.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# The build stage's image: the same Python and, when torch comes from PyPI, a C compiler.
ARG BUILD_IMAGE=${PYTHON_IMAGE}
# Where torch and torchaudio come from. PyTorch's CPU index (the default): CPU builds. PyPI
# (https://pypi.org/simple): CUDA builds, installed by hash without their nvidia-* wheels and
# given small stand-in CUDA libraries (cuda_stubs.py) so they load and run on CPU.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

FROM ${BUILD_IMAGE} AS build
ARG TORCH_INDEX
# A CA bundle for pip, where the builder's network needs one (a proxy's); empty: pip's own.
ARG CA_BUNDLE=
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3.11 -m venv /opt/moodstream
COPY requirements/image.txt /tmp/requirements/
# From the CPU index, torch and torchaudio at the lock's versions (+cpu; that index's hashes are
# not in the lock); then every pin of the lock by hash, without resolving anything (--no-deps):
# a torch already installed satisfies its pin (2.9.1+cpu is 2.9.1) and is left alone.
RUN --mount=type=cache,target=/root/.cache/pip \
    set -e; \
    if [ "$TORCH_INDEX" != "https://pypi.org/simple" ]; then \
      torch=$(sed -n 's/^torch==\([^ ]*\).*/\1/p' /tmp/requirements/image.txt); \
      torchaudio=$(sed -n 's/^torchaudio==\([^ ]*\).*/\1/p' /tmp/requirements/image.txt); \
      /opt/moodstream/bin/pip install ${CA_BUNDLE:+--cert "$CA_BUNDLE"} --no-deps --index-url "$TORCH_INDEX" "torch==$torch+cpu" "torchaudio==$torchaudio+cpu"; \
    fi; \
    /opt/moodstream/bin/pip install ${CA_BUNDLE:+--cert "$CA_BUNDLE"} --require-hashes --no-deps -r /tmp/requirements/image.txt; \
    rm -rf /opt/moodstream/lib/python3.11/site-packages/torch/include
COPY deploy/docker/cuda_stubs.py /tmp/
RUN /opt/moodstream/bin/python /tmp/cuda_stubs.py /opt/moodstream/lib/python3.11/site-packages
# The package, with its data: web assets, schemas, moods.toml and the model repository
# (triton_models/, installed beside it). Its dependencies are all in place (--no-deps, --no-index).
COPY pyproject.toml README.md /src/
COPY pipeline/ /src/pipeline/
COPY training/ /src/training/
COPY triton_models/ /src/triton_models/
RUN /opt/moodstream/bin/pip install --no-deps --no-index --no-build-isolation /src \
 && /opt/moodstream/bin/python -m pip uninstall -y -q setuptools \
 && /opt/moodstream/bin/python -c "import torch, pipeline.stages.frontend; assert not torch.cuda.is_available()"

FROM ${PYTHON_IMAGE}
# Runtime libraries only; PyAV, soxr and soundfile wheels bundle their codecs.
RUN useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin moodstream
COPY --from=build /opt/moodstream /opt/moodstream
WORKDIR /tmp
# The root filesystem is read-only on Kubernetes: Faust's table directory (unused: the worker
# has no tables, but Faust creates it) and any cache go to /tmp, a writable emptyDir there.
ENV PATH=/opt/moodstream/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    FAUST_DATADIR=/tmp/faust \
    MOODSTREAM_METRICS_PORT=9108
USER 10001:10001
EXPOSE 9108
# SIGTERM: the worker finishes the batch in flight, then leaves (give it the pod's grace period).
ENTRYPOINT ["python", "-m", "pipeline"]
CMD ["worker"]
# Provenance, from `make images` (deploy/images.py): the commit built and the lock's sha256;
# last, so the layers above stay cached from one commit to the next.
ARG SOURCE_REVISION=unknown
ARG LOCK_SHA256=unknown
LABEL org.opencontainers.image.title="moodstream-worker" \
      org.opencontainers.image.description="moodstream worker and HTTP service (moodstream worker | serve)" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.revision="${SOURCE_REVISION}" \
      io.moodstream.lock.sha256="${LOCK_SHA256}"
