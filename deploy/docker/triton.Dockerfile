# syntax=docker/dockerfile:1
# Triton with moodstream's model repository baked in (GPU; the models' config.pbtxt:
# onnxruntime, dynamic batching, warm-up). 24.10 ships Triton 2.51, the server version the
# tests run on CPU. The repository comes from the model-repository image (models.Dockerfile,
# the one `make images` builds and the container test serves); build that first, then, from the
# repository root:
#   docker build -f deploy/docker/models.Dockerfile -t moodstream-models:0.1.0 .
#   docker build -f deploy/docker/triton.Dockerfile -t moodstream-triton:0.1.0 .
# Run (needs the NVIDIA container toolkit):
#   docker run --rm --gpus=1 -p 8000:8000 -p 8001:8001 -p 8002:8002 moodstream-triton:0.1.0
# To serve a repository from an object store instead, pass
#   tritonserver --model-repository=s3://bucket/prefix   (deploy/k8s does it through MODEL_REPOSITORY).
ARG MODELS_IMAGE=moodstream-models:0.1.0
ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:24.10-py3
FROM ${MODELS_IMAGE} AS models
FROM ${TRITON_IMAGE}
COPY --from=models --chown=root:root /models/ /models/
# The image's own unprivileged user (uid 1000).
USER triton-server
EXPOSE 8000 8001 8002
CMD ["tritonserver", "--model-repository=/models", "--strict-readiness=true", "--exit-on-error=true"]
