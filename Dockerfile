# syntax=docker/dockerfile:1
# Two images from one file (the chart's defaults name them embedjob-operator / embedjob-worker):
#
#   docker build --target operator -t ghcr.io/embedjob/embedjob-operator:0.1.0 .
#   docker build --target worker   -t ghcr.io/embedjob/embedjob-worker:0.1.0 .
#
# The operator image has no torch (the operator never imports it). The worker image starts from
# PyTorch's CUDA runtime image, whose torch satisfies the `worker` extra, so pip keeps that build.
# Both run as the non-root user 10001 with HOME=/tmp (the chart mounts /tmp as an emptyDir and
# makes the root filesystem read-only).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG TORCH_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

# -- the embedjob wheel (built once, installed into both images) ----------------------------------
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY embedjob ./embedjob
# Package data (pyproject.toml maps them to embedjob.crds and embedjob.sample_shards).
COPY crds ./crds
COPY examples/shards ./examples/shards
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# -- operator: kopf + the Kubernetes client, no torch ----------------------------------------------
FROM ${PYTHON_IMAGE} AS operator
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HOME=/tmp
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    pip install "$(ls /wheels/embedjob-*.whl)[operator]" \
 && python -c "import embedjob.operator.handlers, sys; assert 'torch' not in sys.modules and 'pyarrow' not in sys.modules" \
 && groupadd --gid 10001 embedjob \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin embedjob
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["embedjob"]
CMD ["operator"]

# -- worker: CUDA PyTorch + the worker extra -------------------------------------------------------
FROM ${TORCH_IMAGE} AS worker
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HOME=/tmp \
    EMBEDJOB_MODEL_DIR=/models HF_HOME=/models/huggingface
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    python -c "import sys; assert sys.version_info >= (3, 11), 'embedjob needs Python >= 3.11; pick another TORCH_IMAGE'" \
 && pip install "$(ls /wheels/embedjob-*.whl)[worker]" \
 && python -c "import torch, embedjob.worker.runtime.task; print('torch', torch.__version__, 'cuda', torch.version.cuda)" \
 && groupadd --gid 10001 embedjob \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin embedjob \
 && mkdir -p /models && chown 10001:10001 /models
USER 10001:10001
ENTRYPOINT ["embedjob"]
CMD ["worker", "--queue", "embedjob", "--concurrency", "1"]
