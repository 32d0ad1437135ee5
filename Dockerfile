# syntax=docker/dockerfile:1
# auditpipe's container image: every long-running command (process, sink NAME, serve, proxy,
# receive, ingest, demo) and the one-shot ones (topics, sink NAME --migrate).
#
#   docker build -t auditpipe .
#   docker run --rm -e AUDITPIPE_KAFKA_BOOTSTRAP=kafka:9092 auditpipe topics --create
#
# Settings come from AUDITPIPE_* environment variables (docs/deploy.md); no file is baked in.
# Needs BuildKit (the default builder since Docker 23 and in `docker compose`).

ARG PYTHON_IMAGE=python:3.12-slim

# -- build: wheels of auditpipe and its dependencies ------------------------------------------
FROM ${PYTHON_IMAGE} AS build
ARG EXTRAS=processors,s3,mongodb,postgres,serve,proxy,metrics,demo
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY auditpipe ./auditpipe
COPY producer ./producer
COPY processors ./processors
COPY sinks ./sinks
COPY schemas ./schemas
COPY api ./api
RUN pip wheel --wheel-dir /wheels ".[${EXTRAS}]"

# -- runtime: the wheels only, a non-root user ----------------------------------------------
FROM ${PYTHON_IMAGE}
ARG EXTRAS=processors,s3,mongodb,postgres,serve,proxy,metrics,demo
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links /wheels "auditpipe[${EXTRAS}]" \
    && useradd --create-home --uid 10001 --user-group auditpipe
USER auditpipe
WORKDIR /home/auditpipe
ENTRYPOINT ["auditpipe"]
CMD ["--help"]
