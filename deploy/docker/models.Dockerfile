# syntax=docker/dockerfile:1
# moodstream's Triton model repository (triton_models/: each model's config.pbtxt for GPU
# servers, configs/cpu.pbtxt for CPU ones, the ONNX files and their metadata) as an image of its
# own: the GPU Triton image copies it in (triton.Dockerfile), and run as an init container it
# copies the repository into a volume that a Triton container serves:
#   docker build -f deploy/docker/models.Dockerfile -t moodstream-models:0.1.0 .
#   docker run --rm --read-only --user 10001 -v models:/repository moodstream-models:0.1.0
# `make images` builds it with podman (deploy/images.py); the container test serves a copy made
# this way with the embedded stack's CPU tritonserver.

# Any image with a POSIX `cp`.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
ARG SOURCE_REVISION=unknown
LABEL org.opencontainers.image.title="moodstream-models" \
      org.opencontainers.image.description="moodstream's Triton model repository, in /models" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0 AND ISC" \
      org.opencontainers.image.revision="${SOURCE_REVISION}"
COPY --chown=root:root triton_models/ /models/
USER 10001:10001
# As an init container: copy the repository into the volume mounted at /repository.
ENTRYPOINT ["cp", "-R", "/models/.", "/repository/"]
