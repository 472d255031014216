# syntax=docker/dockerfile:1.7
# dicomnode: receiver + GPU workers in one container (supervisor process, `dicomnode serve`).
# Base: the official PyTorch runtime image (CUDA + cuDNN); runs on CPU too when no GPU is given to the container.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1

# dcmtk gives operators echoscu/storescu inside the container; curl serves the HEALTHCHECK.
RUN apt-get update \
 && apt-get install -y --no-install-recommends dcmtk curl \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/dicomnode
COPY pyproject.toml README.md ./
COPY dicomnode ./dicomnode
# torch comes from the base image; pip keeps it (the pyproject range accepts it).
RUN pip install --no-cache-dir .

# Non-root user; spool, outbox and the SQLite store live on a volume.
RUN useradd --system --uid 10001 --home-dir /var/lib/dicomnode --create-home dicomnode \
 && mkdir -p /etc/dicomnode /var/lib/dicomnode/data \
 && chown -R dicomnode:dicomnode /var/lib/dicomnode
# Default configuration: listen on all interfaces, data on the volume, metrics on. Mount your own file over
# /etc/dicomnode/dicomnode.yaml (see config/dicomnode.example.yaml for every key); compose.yaml does.
COPY <<'YAML' /etc/dicomnode/dicomnode.yaml
node:
  ae_title: DICOMNODE
  host: 0.0.0.0
  port: 11112
storage:
  path: /var/lib/dicomnode/data
metrics:
  enabled: true
  host: 0.0.0.0
  port: 9110
logging:
  json: true
YAML
VOLUME ["/var/lib/dicomnode/data"]
USER dicomnode

# 11112: DICOM (C-ECHO, C-STORE); 9110: Prometheus /metrics and /health (metrics.enabled in the config).
EXPOSE 11112 9110
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD curl -fsS http://127.0.0.1:9110/health || exit 1

ENTRYPOINT ["dicomnode"]
CMD ["serve", "--config", "/etc/dicomnode/dicomnode.yaml"]
