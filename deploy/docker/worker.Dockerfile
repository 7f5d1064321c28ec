# syntax=docker/dockerfile:1
# The moodstream worker: CPU-only torch (PyTorch's CPU index: no CUDA libraries), non-root,
# no compilers in the final stage. Build from the repository root:
#   docker build -f deploy/docker/worker.Dockerfile -t moodstream-worker:0.1.0 .
# Run (settings: `docker run --rm moodstream-worker:0.1.0 settings`):
#   docker run --rm -p 9108:9108 -e MOODSTREAM_KAFKA_BOOTSTRAP=kafka:9092 \
#     -e MOODSTREAM_TRITON_URL=triton:8001 -e AWS_REGION=eu-west-1 moodstream-worker:0.1.0
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG TORCH_VERSION=2.9.1

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/moodstream
COPY requirements/main.txt /tmp/requirements/
# torch and torchaudio first, CPU builds; then the package with its dependencies (pyproject.toml)
# at main.txt's pins (torch's lines and the CUDA libraries are dropped from the constraints: the
# CPU wheels need none). The package carries its data: web assets, schemas, moods.toml and the
# model repository (triton_models/, installed beside it).
RUN /opt/moodstream/bin/pip install --index-url https://download.pytorch.org/whl/cpu \
        "torch==${TORCH_VERSION}" "torchaudio==${TORCH_VERSION}" \
 && grep -vE '^(torch|torchaudio|triton|nvidia-[a-z0-9-]+)==' /tmp/requirements/main.txt > /tmp/requirements/constraints.txt
COPY pyproject.toml README.md /src/
COPY pipeline/ /src/pipeline/
COPY training/ /src/training/
COPY triton_models/ /src/triton_models/
RUN /opt/moodstream/bin/pip install /src -c /tmp/requirements/constraints.txt \
 && /opt/moodstream/bin/python -c "import torch; assert not torch.cuda.is_available() and '+cpu' in torch.__version__, torch.__version__"

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
