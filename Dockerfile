# syntax=docker/dockerfile:1.7
# dicomnode: receivers, workers and the status page in one container (one supervisor process, `dicomnode serve`).
#
# PyTorch is the version the test suite runs (scripts/test.sh pins torch==2.13.0), installed with pip into the
# image's Python. By default the PyPI build, which brings its CUDA libraries and runs on the GPU when the container
# is given one (NVIDIA container toolkit), else on the CPU. For a smaller CPU-only image, the exact build the tests
# use:   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t dicomnode-server .
FROM python:3.11-slim-bookworm

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://pypi.org/simple
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# dcmtk gives operators echoscu/storescu inside the container.
RUN apt-get update \
 && apt-get install -y --no-install-recommends dcmtk \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/dicomnode
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md ./
COPY dicomnode ./dicomnode
# torch is already the pinned version; pip keeps it (the pyproject range accepts it).
RUN pip install "torch==${TORCH_VERSION}" . && python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '${TORCH_VERSION}')"

# Non-root user. Data (spool, outbox, SQLite store) live on the volume: DICOMNODE_HOME is the storage path of
# every verb that runs without a storage.path in its configuration, so `docker exec ... dicomnode status` works.
RUN useradd --system --uid 10001 --home-dir /var/lib/dicomnode --create-home dicomnode \
 && mkdir -p /etc/dicomnode /var/lib/dicomnode/data \
 && chown -R dicomnode:dicomnode /var/lib/dicomnode
ENV DICOMNODE_HOME=/var/lib/dicomnode/data
VOLUME ["/var/lib/dicomnode/data"]
USER dicomnode

# Without a configuration the node runs its embedded default (`dicomnode config --print-defaults`), here on
# every interface. To configure it, mount a file and name it in DICOMNODE_CONFIG (compose.yaml does): `serve`,
# the health check and every other verb then read the same file.
# 11112: DICOM (C-ECHO, C-STORE). 8110: the status page, which the default keeps on the container's loopback
# (publish it by setting ui.host 0.0.0.0 and ui.token in your configuration, as compose.yaml does).
EXPOSE 11112
# `dicomnode health` reads the configuration and asks the node's /health where it is served (metrics server,
# else the status page, with its token), else C-ECHOes the node: no fixed port.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 CMD ["dicomnode", "health", "--timeout", "8"]

ENTRYPOINT ["dicomnode"]
CMD ["serve", "--set", "node.host=0.0.0.0", "--set", "logging.json=true"]
