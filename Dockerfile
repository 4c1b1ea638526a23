# One image for every Kshipra process; the command picks which:
#   docker run IMAGE origin --listen 0.0.0.0:8080 --storage s3://bucket --redis redis://redis:6379
#   docker run IMAGE edge --config /etc/kshipra/kshipra.toml --name indore
#   docker run IMAGE worker --redis redis://redis:6379
# Secrets (KSHIPRA_UPLOAD_TOKEN, KSHIPRA_PURGE_TOKEN, KSHIPRA_SIGNING_KEY) come from the
# environment, never from the image.

FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY cdn_config ./cdn_config
COPY common ./common
COPY assets ./assets
COPY edge ./edge
COPY kshipra ./kshipra
COPY origin ./origin
COPY transcode ./transcode
RUN python -m venv /opt/kshipra \
 && /opt/kshipra/bin/pip install --upgrade pip \
 && /opt/kshipra/bin/pip install .

FROM python:3.11-slim-bookworm
RUN groupadd --system kshipra \
 && useradd --system --gid kshipra --home-dir /var/lib/kshipra --create-home kshipra
COPY --from=build /opt/kshipra /opt/kshipra
ENV PATH=/opt/kshipra/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    KSHIPRA_HEALTH_URL=http://127.0.0.1:8080/healthz
USER kshipra
WORKDIR /var/lib/kshipra
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['KSHIPRA_HEALTH_URL'], timeout=2)"]
ENTRYPOINT ["kshipra"]
CMD ["origin", "--listen", "0.0.0.0:8080", "--storage", "/var/lib/kshipra/data"]
